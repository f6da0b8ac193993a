"""Bounds checked before any work: the seed's range, finite numbers, each method's own option rules
(with the key path and the config file named) and the example input against the memory budget."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from slimship.cli import main
from slimship.pipeline.config import merge

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = yaml.safe_load((ROOT / "configs" / "example.yaml").read_text())


def run_config(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: dict, *flags: str) -> str:
    """`slimship [flags] run CONFIG` on the example with `extra` merged in: exit 2 before any stage, nothing
    written; returns stderr."""
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(merge(EXAMPLE, extra)))
    out = tmp_path / "artifacts"
    assert main([*flags, "run", str(path), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "train dense model" not in captured.out and "Traceback" not in captured.err
    assert not out.exists()
    assert captured.err.startswith(f"slimship: error: {path}: ")
    return captured.err


@pytest.mark.parametrize("seed", [2**32, 99999999999999999999999, -1])
def test_seed_out_of_range_is_a_config_error(tmp_path, capsys, seed: int) -> None:
    err = run_config(tmp_path, capsys, {"seed": seed})
    assert f"'seed' is {seed}; expected a non-negative integer up to 4294967295" in err


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("train.lr", math.inf),
        ("train.lr", math.nan),
        ("slim.rtol", -math.inf),
        ("gates.max_latency_ms", math.inf),
        ("gates.min_speedup", math.nan),
        ("compress.options.lr", math.inf),
    ],
)
def test_non_finite_numbers_are_refused_everywhere(tmp_path, capsys, key: str, value: float) -> None:
    extra: dict = {}
    *parents, last = key.split(".")
    node = extra
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    err = run_config(tmp_path, capsys, extra)
    assert f"'{key}' is {value!r}; expected " in err


def test_example_input_over_the_memory_budget_is_refused_before_allocating(tmp_path, capsys) -> None:
    err = run_config(tmp_path, capsys, {"model": {"input_shape": [1, 30000, 30000]}}, "--max-memory", "1GiB")
    assert "'model.input_shape': the example batch of shape [2, 1, 30000, 30000] would take" in err
    assert "over the --max-memory budget of 1.0 GiB; an example input is checked before" in err
