"""The test zoo: every case is deterministic, has matching random inputs and exports with torch.export."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from tests.zoo import BATCH, ZOO, ZooCase, build
from tests.zoo.random_blocks import build_random_net, plan_blocks, random_nets

NAMES = sorted(ZOO)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The zoo models are tiny: one intra-op thread is as fast and avoids contention on busy machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_CACHE: dict[str, ZooCase] = {}


def case_for(name: str) -> ZooCase:
    if name not in _CACHE:
        _CACHE[name] = build(name)
    return _CACHE[name]


def as_tuple(out: object) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, tuple | list) else (out,)


def assert_same(a: object, b: object) -> None:
    a, b = as_tuple(a), as_tuple(b)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def grow_batch(inputs: tuple, gen: torch.Generator, case: ZooCase) -> tuple:
    """Inputs of batch BATCH + 1 built from two random draws of the case."""
    extra = case.random_inputs(gen)
    return tuple(torch.cat([x, e[:1]]) for x, e in zip(inputs, extra))


def test_zoo_has_every_family() -> None:
    families = {case_for(name).family for name in NAMES}
    expected = {"chain", "vgg", "resnet", "mobilenet", "densenet", "convnext", "vit", "bert", "unet"}
    assert expected | {"norms", "shared", "sequence", "mlp"} <= families


def test_unknown_case_names_known_ones() -> None:
    with pytest.raises(KeyError, match="plain_conv"):
        build("no_such_case")


@pytest.mark.parametrize("name", NAMES)
def test_case_is_deterministic_and_in_eval_mode(name: str) -> None:
    case = case_for(name)
    assert case.name == name
    assert not any(m.training for m in case.model.modules())
    again = ZOO[name]()
    for (key, a), (key_b, b) in zip(case.model.state_dict().items(), again.model.state_dict().items()):
        assert key == key_b
        assert torch.equal(a, b), key
    with torch.no_grad():
        first = case.model(*case.example_inputs)
        second = again.model(*case.example_inputs)
    assert_same(first, second)
    for out in as_tuple(first):
        assert out.shape[0] == BATCH
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_random_inputs_match_examples(name: str) -> None:
    case = case_for(name)
    draw_a = case.random_inputs(torch.Generator().manual_seed(123))
    draw_b = case.random_inputs(torch.Generator().manual_seed(123))
    draw_c = case.random_inputs(torch.Generator().manual_seed(124))
    assert len(draw_a) == len(case.example_inputs)
    for example, a, b, c in zip(case.example_inputs, draw_a, draw_b, draw_c):
        assert a.shape == example.shape and a.dtype == example.dtype
        assert torch.equal(a, b)
        assert c.shape == example.shape
    assert any(not torch.equal(a, c) for a, c in zip(draw_a, draw_c))
    with torch.no_grad():
        assert_same(case.model(*draw_a), case.model(*draw_b))


@pytest.mark.parametrize("name", NAMES)
def test_exports_static(name: str) -> None:
    case = case_for(name)
    program = torch.export.export(case.model, case.example_inputs, strict=False)
    inputs = case.random_inputs(torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert_same(program.module()(*inputs), case.model(*inputs))


def export_dynamic_batch(case: ZooCase) -> torch.export.ExportedProgram:
    dims = tuple({0: torch.export.Dim.AUTO} for _ in case.example_inputs)
    return torch.export.export(case.model, case.example_inputs, dynamic_shapes=dims, strict=False)


@pytest.mark.parametrize("name", NAMES)
def test_dynamic_batch_flag_is_true(name: str) -> None:
    case = case_for(name)
    if not case.dynamic_batch_ok:
        with pytest.raises(Exception):  # noqa: B017 - any export failure confirms the flag
            program = export_dynamic_batch(case)
            program.module()(*grow_batch(case.example_inputs, torch.Generator().manual_seed(3), case))
        return
    program = export_dynamic_batch(case)
    bigger = grow_batch(case.example_inputs, torch.Generator().manual_seed(3), case)
    with torch.no_grad():
        assert_same(program.module()(*bigger), case.model(*bigger))


def test_random_net_is_deterministic_and_valid() -> None:
    a, b = build_random_net(5, 4), build_random_net(5, 4)
    assert a.name == "random_s5_d4" and a.notes == b.notes
    assert all(
        torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values())
    )
    with torch.no_grad():
        assert_same(a.model(*a.example_inputs), b.model(*a.example_inputs))
    other = build_random_net(6, 4)
    with torch.no_grad():
        assert other.notes != a.notes or not torch.equal(
            other.model(*a.example_inputs), a.model(*a.example_inputs)
        )
    with pytest.raises(ValueError, match="depth"):
        build_random_net(0, 0)


def test_random_nets_cover_every_block_kind() -> None:
    kinds = set()
    for seed in range(40):
        kinds |= {kind for kind, _, _ in plan_blocks(seed, 6)[0]}
    assert kinds == {"conv", "residual", "concat", "depthwise", "se", "pool"}


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_nets(max_depth=4))
def test_random_nets_run_and_export(case: ZooCase) -> None:
    with torch.no_grad():
        out = case.model(*case.example_inputs)
    assert out.shape == (BATCH, case.model.fc.out_features)
    assert torch.isfinite(out).all()
    program = torch.export.export(case.model, case.example_inputs, strict=False)
    with torch.no_grad():
        assert_same(program.module()(*case.example_inputs), out)
