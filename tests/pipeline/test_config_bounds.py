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
    """`slimship [flags] run CONFIG` on the example with `extra` merged in (a `compress` naming its method
    replaces the example's): exit 2 before any stage, nothing written; returns stderr."""
    path = tmp_path / "bad.yaml"
    raw = merge(EXAMPLE, extra)
    if "method" in extra.get("compress", {}):  # another method: only the options given
        raw["compress"] = extra["compress"]
    path.write_text(yaml.safe_dump(raw))
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


@pytest.mark.parametrize(
    ("method", "options", "key", "message"),
    [
        ("hesso", {"target": 1.5}, "target", "option 'target' must be a number in [0, 1), got 1.5"),
        ("hesso", {"periods": 0}, "periods", "option 'periods' must be an int >= 1, got 0"),
        ("hspg", {"space_targets": {"conv": 1.0}}, "space_targets", "space_targets['conv'] must be"),
        ("hspg", {"criterion": "random"}, "criterion", "criterion='random' is not one of"),
        ("drop", {"pool": 0.5}, "pool", "option 'pool' must be a number >= 1, got 0.5"),
        ("drop", {"drop_in": 1.5}, "drop_in", "option 'drop_in' must be a number in [0, 1], got 1.5"),
        ("csgd", {"centripetal": 0.0}, "centripetal", "option 'centripetal' must be a number > 0"),
        ("csgd", {"clustering": "spectral"}, "clustering", "clustering='spectral' is not one of"),
        ("simguided", {"target": 1.5}, "target", "option 'target' must be a number in [0, 1), got 1.5"),
        ("lorita", {"energy": 1.5}, "energy", "option 'energy' must be a number in (0, 1], got 1.5"),
        ("lorita", {"finetune_lr": 0.0}, "finetune_lr", "option 'finetune_lr' must be a number > 0"),
        ("adc", {"min_keep": 0.0}, "min_keep", "option 'min_keep' must be a number in (0, 1], got 0.0"),
        ("adc", {"search": "grid"}, "search", "search='grid' is not one of"),
        ("hakd", {"alpha": 1.5}, "alpha", "option 'alpha' must be in [0, 1]"),
        ("hakd", {"widths": [1.5]}, "widths", "option 'widths' must be a non-empty list of multipliers"),
        ("magnitude", {"prune_steps": 0}, "prune_steps", "option 'prune_steps' must be an int >= 1, got 0"),
    ],
)
def test_method_option_rules_run_at_config_check(tmp_path, capsys, method, options, key, message) -> None:
    """The rules a method applies when it runs refuse the config before dense training, naming the key."""
    err = run_config(tmp_path, capsys, {"compress": {"method": method, "options": options}})
    assert f"'compress.options.{key}': {message}" in err


def test_training_option_rules_run_at_config_check(tmp_path, capsys) -> None:
    err = run_config(tmp_path, capsys, {"compress": {"options": {"momentum": -0.5}}})
    assert "'compress.options': lr must be > 0 and momentum, weight_decay >= 0" in err


def test_the_same_rule_refuses_the_option_when_the_method_runs() -> None:
    """The run-time path (compress(...) with flat options) applies the very rule the config check does."""
    import torch

    from slimship.compress.registry import check_options, compress
    from slimship.errors import CompressionError
    from slimship.models import lenet5

    with pytest.raises(CompressionError, match=r"option 'target' must be a number in \[0, 1\), got 1.5") as a:
        check_options("hesso", {"target": 1.5})
    batches = [(torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,)))]
    with pytest.raises(CompressionError, match=r"option 'target' must be a number in \[0, 1\), got 1.5") as b:
        compress("hesso", lenet5(), torch.randn(1, 1, 8, 8), batches, target=1.5, epochs=1)
    assert str(a.value) == str(b.value) and a.value.option == b.value.option == "target"
