"""Quality gates: the rules on figures, and `slimship run` / `slimship release` stopping before publishing."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from slimship.cli import main
from slimship.errors import GateError
from slimship.pipeline.gates import (
    FAILED,
    GATE_RULES,
    NOT_EVALUATED,
    OFF,
    PASSED,
    GateFigures,
    GatesSpec,
    enforce,
    evaluate_gates,
)
from slimship.pipeline.records import BenchEntry, BenchFigures

GATES = {"max_accuracy_drop": 1.0, "min_speedup": 1.5, "max_latency_ms": {"a": 2.0}, "min_agreement": 0.9}
SPEC = GatesSpec(**GATES)
FIGS = GateFigures(
    dense_top1=90.0,
    slim_top1=88.5,
    speedup={"a/onnx": 1.6, "b/onnx": 1.2},
    p50_ms={"a/onnx": 1.0, "b/onnx": 9.0},
    agreement={"a/tflite-int8": 0.95},
)


def _status(results, gate, subject=""):
    return next(r.status for r in results if r.gate == gate and r.subject == subject)


def test_each_gate_compares_its_figures_with_its_limit() -> None:
    results = evaluate_gates(SPEC, FIGS)
    assert _status(results, "max_accuracy_drop", "torch top-1") == FAILED  # 1.5 points > 1.0
    assert _status(results, "min_speedup", "a/onnx") == PASSED
    assert _status(results, "min_speedup", "b/onnx") == FAILED
    assert _status(results, "max_latency_ms", "a/onnx") == PASSED
    assert not any(r.subject == "b/onnx" for r in results if r.gate == "max_latency_ms")  # no limit for b
    assert _status(results, "min_agreement", "a/tflite-int8") == PASSED
    with pytest.raises(GateError) as info:
        enforce(results)
    text = str(info.value)
    assert "max_accuracy_drop torch top-1: top-1 drop, slim vs dense 1.5 pt (limit <= 1 pt): failed" in text
    assert "min_speedup b/onnx" in text and "min_speedup a/onnx" not in text


def test_a_gate_without_figures_is_not_evaluated_never_passed() -> None:
    results = evaluate_gates(SPEC, GateFigures())
    assert {r.gate: r.status for r in results} == dict.fromkeys(GATES, NOT_EVALUATED)
    enforce(results)  # nothing failed
    off = evaluate_gates(GatesSpec(**dict.fromkeys(GATES)), FIGS)
    assert {r.status for r in off} == {OFF}


def test_the_boundary_passes() -> None:
    results = evaluate_gates(GatesSpec(max_accuracy_drop=1.5), FIGS)
    assert _status(results, "max_accuracy_drop", "torch top-1") == PASSED


def test_a_gate_is_one_record_its_spec_field_its_rule_and_its_option() -> None:
    """Every gate rule has its GatesSpec field (its limit) and its command-line option, and nothing else."""
    from slimship.cli import build_parser

    assert list(GATE_RULES) == list(GatesSpec.model_fields)
    flags = [x for i, name in enumerate(GATE_RULES) for x in (f"--{name.replace('_', '-')}", str(i + 1))]
    args = build_parser().parse_args(["release", "m.pt2", "--name", "n", "--version", "1.0.0", *flags])
    assert {name: getattr(args, name) for name in GATE_RULES} == {
        n: i + 1.0 for i, n in enumerate(GATE_RULES)
    }


def test_gate_figures_come_from_the_bench_records() -> None:
    """Device targets give p50 and speedup, every target gives the agreement of a quantised format."""

    def measured(p50: float, agreement: float | None = None) -> SimpleNamespace:
        return SimpleNamespace(latency=SimpleNamespace(p50_ms=p50), agreement=agreement, parity=None,
                               model_rss_kb=None)  # fmt: skip

    speedup = SimpleNamespace(median=1.23456)
    bench = BenchFigures(
        (
            BenchEntry("a", "onnx", False, measured(9.0), measured(1.5), measured(3.0), speedup),
            BenchEntry("a", "tflite-int8", False, measured(2.0, 0.97)),
            BenchEntry("emu", "tflite-int8", True, measured(50.0, 0.5)),
        ),
        dense_top1=90.0,
        slim_top1=89.0,
    )
    figures = GateFigures.of(bench)
    assert figures.p50_ms == {"a/onnx": 1.5, "a/tflite-int8": 2.0}  # the interleaved timing, if any
    assert figures.speedup == {"a/onnx": 1.2346}
    assert figures.agreement == {"a/tflite-int8": 0.97, "emu/tflite-int8": 0.5}
    results = evaluate_gates(SPEC, figures)
    assert _status(results, "max_accuracy_drop", "torch top-1") == PASSED
    assert _status(results, "min_agreement", "emu/tflite-int8") == FAILED


# ----------------------------------------------------------------------------------------- end to end

RUN = {
    "seed": 0,
    "model": {
        "factory": "slimship.models:digits_mlp",
        "kwargs": {"hidden": [64, 64]},
        "input_shape": [1, 8, 8],
    },
    "data": {"factory": "slimship.data:digits_loaders", "kwargs": {"batch_size": 64, "seed": 0}},
    "train": {"epochs": 2, "lr": 0.003},
    # 90% of the groups removed without fine-tuning: the slim model loses far more than a point
    "compress": {
        "method": "magnitude",
        "options": {"target": 0.9, "prune_steps": 1, "epochs_per_step": 1, "finetune_epochs": 0},
    },
    "export": {"formats": ["onnx"]},
    "targets": ["host"],
    "bench": {"runs": 3, "warmup": 1},
    "release": {"name": "gated", "version": "1.0.0"},
}


def _write(tmp_path: Path, config: dict) -> Path:
    config = json.loads(json.dumps(config)) | {"release": {**config["release"], "out": str(tmp_path / "out")}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_run_whose_accuracy_drop_exceeds_the_gate_exits_3_and_publishes_nothing(tmp_path, capsys) -> None:
    assert main(["run", str(_write(tmp_path, RUN))]) == 3  # the default gate: 1 point
    captured = capsys.readouterr()
    line = next(ln for ln in captured.err.splitlines() if ln.startswith("slimship: gate failed:"))
    assert (
        "max_accuracy_drop torch top-1: top-1 drop, slim vs dense" in line
        and "(limit <= 1 pt): failed" in line
    )
    drop = float(line.split("slim vs dense ", 1)[1].split(" pt", 1)[0])
    assert drop > 1.0
    assert "gate max_accuracy_drop" in captured.out  # the summary table lists the gates
    out = tmp_path / "out"
    assert not list(out.glob("gated-1.0.0*")) and not list(out.glob(".gated*"))


@pytest.mark.slow
def test_a_passing_run_lists_its_gates_in_the_manifest_card_and_report(tmp_path) -> None:
    """The same job with the gate loosened on the command line is published, its gates recorded."""
    path, out = _write(tmp_path, RUN), tmp_path / "out"
    assert main(["run", str(path), "--max-accuracy-drop", "100", "--min-speedup", "0.01"]) == 0
    bundle = out / "gated-1.0.0"
    gates = {
        (g["gate"], g["subject"]): g for g in json.loads((bundle / "manifest.json").read_text())["gates"]
    }
    assert gates[("max_accuracy_drop", "torch top-1")]["status"] == PASSED
    assert gates[("max_accuracy_drop", "torch top-1")]["figure"] > 1.0
    assert gates[("min_speedup", "host/onnx")]["status"] == PASSED
    assert gates[("min_agreement", "")]["status"] == NOT_EVALUATED  # no quantised variant exported
    assert gates[("max_latency_ms", "")]["status"] == OFF
    card = (bundle / "MODEL_CARD.md").read_text()
    assert card.index("## Accuracy") < card.index("## Quality gates") < card.index("## Intended inputs")
    assert "| max_accuracy_drop | torch top-1 |" in card and "not evaluated (no quantised variant)" in card
    assert "Quality gates" in (bundle / "report.html").read_text()
    assert main(["verify", str(bundle)]) == 0


def _mlp() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    layers = [torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)]
    return torch.nn.Sequential(*layers).eval(), torch.randn(2, 1, 8, 8)


def test_release_command_failing_gate_exits_3_and_publishes_nothing(tmp_path, capsys) -> None:
    model, x = _mlp()
    program, out = tmp_path / "slim.pt2", tmp_path / "rel"
    torch.export.save(torch.export.export(model, (x,), strict=False), program)
    common = ["release", str(program), "--name", "m", "--version", "1.0.0", "--out", str(out)]
    assert main([*common, "--format", "onnx", "--max-latency-ms", "1e-9"]) == 3
    err = capsys.readouterr().err
    assert (
        "slimship: gate failed: max_latency_ms host/onnx: p50 latency" in err and "(limit <= 1e-09 ms)" in err
    )
    assert not out.exists() or not list(out.iterdir())
    assert main([*common, "--min-agreement", "1.5"]) == 2  # checked before any export
    assert "'--min-agreement' is 1.5" in capsys.readouterr().err


def test_release_gates_measure_quantised_agreement(tmp_path) -> None:
    from slimship.exporters import export_tflite
    from slimship.pipeline.bench import gate_release
    from slimship.pipeline.config import gates_from_options

    model, x = _mlp()
    tfl = export_tflite(model, (x[:1],), tmp_path / "m-int8-dynamic.tflite", variant="int8-dynamic")
    results = gate_release(model, (x[:1],), {"tflite-int8-dynamic": tfl.path}, gates_from_options({}))
    by_gate = {r.gate: r for r in results}
    agreement = by_gate["min_agreement"]
    assert agreement.subject == "host/tflite-int8-dynamic" and agreement.limit == 0.9
    assert agreement.status == (PASSED if agreement.figure >= 0.9 else FAILED)
    assert by_gate["max_accuracy_drop"].status == NOT_EVALUATED  # no data: never "passed"
    assert by_gate["min_speedup"].status == OFF


def test_release_agreement_uses_the_users_samples(tmp_path, monkeypatch) -> None:
    """With --calibration samples the agreement gate scores them (one sample at a time, capped); without,
    seeded random inputs of the example's shapes."""
    import importlib

    import numpy as np

    from slimship.pipeline import bench as bench_module
    from slimship.pipeline.config import gates_from_options

    model, _ = _mlp()
    x = torch.randn(100, 1, 8, 8)
    seen: list[list] = []

    def fake_measure(path, inputs, target, *, eval_batches=None, **kw):
        seen.append(eval_batches)
        raise SystemExit  # stop once the gate's inputs are recorded

    monkeypatch.setattr(importlib.import_module("slimship.runtimes.measure"), "measure", fake_measure)
    files, gates = {"tflite-int8": tmp_path / "m.tflite"}, gates_from_options({})
    with pytest.raises(SystemExit):
        bench_module.gate_release(model, (x[:1],), files, gates, samples=[(x[:40],), (x[40:],)])
    rows = [inputs[0] for inputs, _ in seen[-1]]
    assert len(rows) == bench_module.RELEASE_EVAL_SAMPLES < len(x)
    assert all(r.shape == (1, 1, 8, 8) for r in rows)
    assert np.array_equal(np.concatenate(rows), x[: len(rows)].numpy())
    with pytest.raises(SystemExit):
        bench_module.gate_release(model, (x[:1],), files, gates)
    random_rows = [inputs[0] for inputs, _ in seen[-1]]
    assert len(random_rows) == bench_module.RELEASE_EVAL_SAMPLES
    assert not any(np.array_equal(r, x[i : i + 1].numpy()) for i, r in enumerate(random_rows))
