"""The op records are complete and consistent: one record per functional op, in-place variants read
it, and an op whose arguments hold sizes rewrites them or says why they never change."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import slimship
from slimship.slimming.ops import OPS, OpRecord, conv_pool, functional_name, record_for

ATEN = sorted(name for name in OPS if name.startswith("aten."))
#: argument names that hold a size or an index even when typed as a plain int
SIZE_NAMES = {"groups", "num_groups", "chunks", "sections", "split_size", "start", "end", "length", "index"}


def _overloads(name: str) -> list[torch._ops.OpOverload]:
    packet = getattr(torch.ops.aten, name.removeprefix("aten."))
    return [getattr(packet, o) for o in packet.overloads()]


def _held_sizes(name: str) -> set[str]:
    """Arguments of any overload that hold sizes: SymInt-typed (as the schema spells them, the
    parsed type says int), or int-typed with a size's name."""
    held = set()
    for overload in _overloads(name):
        text = str(overload._schema)
        arguments = text[text.index("(") + 1 : text.rindex(") ->")]
        for kind, arg in re.findall(r"([\w\[\]\d?]+(?:\([a-z!]+\))?)\s+(\w+)", arguments):
            if "SymInt" in kind or (arg in SIZE_NAMES and "int" in kind.lower()):
                held.add(arg)
    return held


@pytest.mark.parametrize("name", sorted(OPS))
def test_record_is_complete(name: str) -> None:
    record = OPS[name]
    assert isinstance(record, OpRecord) and record.name == name
    assert callable(record.coupling)  # a value rule or a size rewrite never exists without coupling
    assert record.values is None or callable(record.values)
    assert record.sizes is None or callable(record.sizes)
    assert not (record.sizes and record.fixed_sizes), "a size rewrite and a reason it needs none"
    assert functional_name(name) == name, "in-place variants read their functional op's record"


@pytest.mark.parametrize("name", ATEN)
def test_record_names_a_real_op(name: str) -> None:
    assert hasattr(torch.ops.aten, name.removeprefix("aten.")), f"{name} is not an ATen op"


@pytest.mark.parametrize("name", ATEN)
def test_op_that_holds_sizes_rewrites_them_or_says_why_not(name: str) -> None:
    held = _held_sizes(name)
    record = OPS[name]
    if held:
        assert record.sizes is not None or record.fixed_sizes, f"{name} holds {sorted(held)}"


@pytest.mark.parametrize("name", ATEN)
def test_in_place_variant_writes_into_self_and_reads_the_record(name: str) -> None:
    packet = getattr(torch.ops.aten, name.removeprefix("aten.") + "_", None)
    if packet is None:
        return
    for overload in (getattr(packet, o) for o in packet.overloads()):
        first = overload._schema.arguments[0]
        assert first.alias_info is not None and first.alias_info.is_write, f"{overload} is not in-place"
    assert record_for(name + "_") is OPS[name]


def test_the_size_check_sees_sizes() -> None:
    """The check above can fail: view, split and conv hold sizes; relu and permute hold none."""
    assert "size" in _held_sizes("aten.view") and "split_size" in _held_sizes("aten.split")
    assert "groups" in _held_sizes("aten.conv2d")
    assert not _held_sizes("aten.relu") and not _held_sizes("aten.permute")


def test_pool_and_upsample_ops_are_listed_once() -> None:
    pools = [n for n in OPS if "pool" in n or "upsample" in n]
    assert sorted(pools) == sorted(conv_pool.POOLS)


def test_no_module_of_the_slimming_engine_is_over_600_lines() -> None:
    root = Path(slimship.__file__).parent / "slimming"
    sizes = {p.name: len(p.read_text().splitlines()) for p in root.rglob("*.py")}
    assert max(sizes.values()) <= 600, {k: v for k, v in sizes.items() if v > 600}
