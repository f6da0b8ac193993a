"""Exact slimming on every zoo architecture: zero groups removed, identical filters merged."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from slimship import make_random_identical, slim, zero_random_groups
from tests.zoo import ZOO, build
from tests.zoo.random_blocks import random_nets

RTOL = 1e-5


def _assert_close(reference, candidate, inputs) -> None:
    with torch.no_grad():
        ref, got = reference(*inputs), candidate(*inputs)
    ref = ref if isinstance(ref, tuple | list) else (ref,)
    got = got if isinstance(got, tuple | list) else (got,)
    for r, g in zip(ref, got, strict=True):
        scale = max(float(r.abs().max()), 1e-8)
        assert float((r - g).abs().max()) <= RTOL * scale


@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize("make_structure", [zero_random_groups, make_random_identical])
def test_zoo_slims_exactly(name: str, make_structure) -> None:
    case = build(name)
    changed = make_structure(case.model, case.example_inputs, fraction=0.4, seed=0)
    assert changed > 0, f"{name}: no removable groups found"
    result = slim(case.model, case.example_inputs)
    assert result.params_after < result.params_before
    assert result.flops_after < result.flops_before
    assert result.report.verification.passed
    assert not result.report.excluded_spaces  # decided on the graph, not rescued by the culprit search
    assert not result.report.unreadable
    # state_dict names are the source's names
    assert set(result.model.state_dict()) <= set(case.model.state_dict())
    # independent check on fresh random inputs
    generator = torch.Generator().manual_seed(123)
    for inputs in (case.example_inputs, case.random_inputs(generator)):
        _assert_close(case.model, result.model, inputs)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=random_nets(max_depth=5))
def test_random_block_nets_slim_exactly(case) -> None:
    zero_random_groups(case.model, case.example_inputs, fraction=0.4, seed=1)
    result = slim(case.model, case.example_inputs)
    assert result.params_after <= result.params_before
    _assert_close(case.model, result.model, case.random_inputs(torch.Generator().manual_seed(5)))
