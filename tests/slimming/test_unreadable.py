"""Unknown means unprunable, at every stage: a rule that cannot read its node pins what the node
touches and is reported; a rewritten model that fails to run is a failed verification."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from torch import nn

from slimship import find_groups, slim, zero_random_groups
from slimship.errors import VerificationError
from slimship.slimming import zero_group
from slimship.slimming.ops import OPS
from tests.zoo import build


class ConvHead(nn.Module):
    """conv -> relu -> conv -> flatten (a view holding the channel count) -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mid(torch.relu(self.conv(x)))
        return self.fc(y.view(y.shape[0], 6 * 4 * 4))


def _zeroed_head() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model, x = ConvHead().eval(), torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        for layer, rows in ((model.conv, [1, 5]), (model.mid, [2])):
            layer.weight[rows] = 0
            layer.bias[rows] = 0
    return model, x


def test_apply_to_refuses_a_module_that_hard_codes_a_size() -> None:
    model, x = _zeroed_head()  # its forward views to 6 * 4 * 4 features: a literal the slim graph changes
    result = slim(model, x)
    with pytest.raises(VerificationError, match=r"apply_to.*hard-code"):
        result.apply_to(model, x)


def _raise(*args, **kwargs):
    raise KeyError("dim0")


def test_reference_slims_both_spaces() -> None:
    model, x = _zeroed_head()
    result = slim(model, x)
    assert list(result.model.conv.weight.shape) == [6, 3, 3, 3]
    assert list(result.model.mid.weight.shape) == [5, 6, 1, 1]
    assert result.report.unreadable == []


@pytest.mark.parametrize(
    ("field", "op", "stage"),
    [
        ("coupling", "aten.relu", "coupling"),
        ("values", "aten.relu", "values"),
        ("sizes", "aten.view", "rewrite"),
    ],
)
def test_a_rule_that_cannot_read_its_node_pins_it(monkeypatch, field, op, stage) -> None:
    model, x = _zeroed_head()
    monkeypatch.setitem(OPS, op, dataclasses.replace(OPS[op], **{field: _raise}))
    result = slim(model, x)  # no KeyError escapes
    entries = [u for u in result.report.unreadable if u.op == op]
    assert entries and entries[0].stage == stage and "KeyError" in entries[0].reason
    assert entries[0].node in {n.name for n in result.model.graph.nodes}
    pinned = result.model.conv.weight if op == "aten.relu" else result.model.mid.weight
    assert pinned.shape[0] == (8 if op == "aten.relu" else 6)  # the space the node touches stays
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-5, atol=1e-6)


def test_rewrite_that_fails_to_run_keeps_the_culprit_space(monkeypatch, caplog) -> None:
    """CoAtNet's failure class: a literal channel count (here in `expand`) that the rewrite does not
    change; the slim model fails to run, and the culprit search keeps that space in place."""
    case = build("coatnet_like")
    assert zero_random_groups(case.model, case.example_inputs, fraction=0.4, seed=0) > 0
    monkeypatch.setitem(OPS, "aten.expand", dataclasses.replace(OPS["aten.expand"], sizes=None))
    with caplog.at_level(logging.WARNING, logger="slimship.slimming.api"):
        result = slim(case.model, case.example_inputs)
    assert any("failed to run" in r.getMessage() for r in caplog.records)
    assert result.report.excluded_spaces  # the space held by the expand literal
    assert result.model.mbconv.gamma.shape == case.model.mbconv.gamma.shape
    assert result.params_after < result.params_before  # the other spaces still slimmed
    with torch.no_grad():
        for inputs in (case.example_inputs, case.random_inputs(torch.Generator().manual_seed(1))):
            torch.testing.assert_close(result.model(*inputs), case.model(*inputs), rtol=1e-5, atol=1e-6)


def test_gpt2_mlp_slims_exactly() -> None:
    case = build("gpt2_lm")
    found = find_groups(case.model, case.example_inputs)
    mlp = next(name for name in found.by_space if "h.0.mlp.c_fc" in name)
    for i in found.by_space[mlp][::3]:
        zero_group(case.model, found.groups[i])
    zeroed = len(found.by_space[mlp][::3])
    result = slim(case.model, case.example_inputs)
    assert not {"aten.addmm", "aten.detach_"} & set(result.report.unsupported_ops)
    layer = result.model.get_submodule("gpt2.transformer.h.0.mlp")
    assert layer.c_fc.weight.shape[1] == 128 - zeroed  # Conv1D: weight [in, out]
    assert layer.c_proj.weight.shape[0] == 128 - zeroed
    assert not result.report.excluded_spaces
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for inputs in (case.example_inputs, case.random_inputs(generator)):
            torch.testing.assert_close(result.model(*inputs), case.model(*inputs), rtol=1e-5, atol=1e-6)
