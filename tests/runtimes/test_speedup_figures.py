"""One speedup figure: the median of the per-pair ratios it carries, beside the p50s of the same pairs, with
its efficiency from FLOPs counted on the files when `bench` has files only."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch

from slimship._util import dump_json
from slimship.runtimes.execute import DeviceRun
from slimship.runtimes.file_flops import file_flops, onnx_flops, pair_flops, tflite_flops
from slimship.runtimes.measure import (
    SPEEDUP_DEFINITION,
    Speedup,
    bench,
    format_bench_table,
    speedup_from_ratios,
)
from slimship.runtimes.targets import BUILTIN_TARGETS
from slimship.slimming import count_flops

measure_module = importlib.import_module("slimship.runtimes.measure")  # the package re-exports `measure`

# one interleaved run of (dense, slim): bimodal like a shared core (whole time slices lost to others)
PAIR_DENSE = [11.4, 3.2, 11.5, 3.3, 11.3, 11.4, 3.1, 11.6, 3.2]
PAIR_SLIM = [2.2, 10.3, 10.4, 2.1, 10.2, 2.2, 10.3, 2.3, 2.2]
SOLO_MS = {"dense": [48.3] * 9, "slim": [41.3] * 9}  # each file alone, at another time, another load


def _fake_run(models, inputs, **kwargs) -> DeviceRun:
    """run_on_target's result for the given files: solo runs at SOLO_MS, a pair with the PAIR_ timings."""

    def entry(latencies):
        return {"runtime": {"backend": "fake", "version": "0"}, "load_ms": 1.0, "latencies_ms": latencies,
                "model_rss_kb": 10, "eval_top1": []}  # fmt: skip

    if len(models) == 2:
        ratios = [d / s for d, s in zip(PAIR_DENSE, PAIR_SLIM, strict=True)]
        result = {"models": [entry(PAIR_DENSE), entry(PAIR_SLIM)], "pair_ratios": [ratios]}
    else:
        result = {"models": [entry(SOLO_MS["dense" if "dense" in str(models[0]) else "slim"])]}
    return DeviceRun(result | {"peak_rss_kb": 100, "baseline_rss_kb": 50, "affinity": [0]})


@pytest.fixture
def named_files(tiny_models, tmp_path):
    """The tiny dense and slim TFLite files, named dense.tflite and slim.tflite."""
    paths = {}
    for name in ("dense", "slim"):
        paths[name] = tmp_path / f"{name}.tflite"
        paths[name].write_bytes(tiny_models[name]["tflite"].read_bytes())
    return paths


def test_the_p50s_beside_a_speedup_are_those_of_its_pairs(named_files, monkeypatch) -> None:
    """The bench row's speedup is the median of the ratios its JSON carries, and the p50s shown with it
    come from the same interleaved pairs, not from each file's solo run at another time (the mismatch
    that printed 48.3 -> 41.3 ms beside a headline from other runs)."""
    monkeypatch.setattr(
        measure_module, "run_on_target", lambda target, models, inputs, **kw: _fake_run(models, inputs)
    )
    dense, slim = named_files["dense"], named_files["slim"]
    result = bench(
        [dense, slim], BUILTIN_TARGETS["mobile-1t"], [np.zeros((1, 3, 16, 16), np.float32)], dense=dense
    )
    (sp,) = result.speedups
    data = json.loads(dump_json(result))["speedups"][0]
    assert sp.median == data["median"] == float(np.median(data["ratios"]))
    assert data["ratios"] == pytest.approx([d / s for d, s in zip(PAIR_DENSE, PAIR_SLIM, strict=True)])
    assert (sp.dense_p50_ms, sp.slim_p50_ms) == (float(np.median(PAIR_DENSE)), float(np.median(PAIR_SLIM)))
    solo = {m.model: m.latency.p50_ms for m in result.measurements}
    assert solo == {str(dense): 48.3, str(slim): 41.3}  # the solo figures stay in their own columns
    table = format_bench_table(result)
    cells = {col.header: list(col.cells) for col in table.columns}
    assert cells["pair p50 ms"][1] == f"{np.median(PAIR_DENSE):.3f} -> {np.median(PAIR_SLIM):.3f}"
    assert cells["speedup (p10-p90)"][1].startswith(f"{np.median(data['ratios']):.2f}x")
    assert SPEEDUP_DEFINITION in str(table.caption) and "each file alone" in str(table.caption)


def test_a_bimodal_measurement_says_it_was_disturbed() -> None:
    """Median of ratios 1.94x against a p50 ratio 1.17x of the same pairs: the text names both."""
    sp = speedup_from_ratios([1.2, 1.9, 1.94, 2.5, 2.9], "d", "s", "t")
    shown = Speedup(**{**sp.__dict__, "dense_p50_ms": 48.3, "slim_p50_ms": 41.3})
    assert shown.disturbed and shown.p50_ratio == pytest.approx(48.3 / 41.3)
    assert (
        shown.text()
        == "1.94x (1.48-2.74); disturbed: the p50 ratio of the same pairs is 1.17x (rerun on an idle core)"
    )
    steady = Speedup(**{**sp.__dict__, "dense_p50_ms": 19.4, "slim_p50_ms": 10.0})
    assert not steady.disturbed and steady.text() == "1.94x (1.48-2.74)"


def test_bench_of_files_fills_efficiency_from_their_graphs(tiny_models) -> None:
    """Without FLOPs from the caller, a pair of .tflite files is counted from both graphs, by the rule
    torch.utils.flop_counter uses for the models they came from."""
    x = torch.from_numpy(tiny_models["x"])
    dense, slim = tiny_models["dense"]["tflite"], tiny_models["slim"]["tflite"]
    assert tflite_flops(dense) == count_flops(tiny_models["dense"]["module"], (x,))
    assert tflite_flops(slim) == count_flops(tiny_models["slim"]["module"], (x,))
    assert onnx_flops(tiny_models["dense"]["onnx"]) == count_flops(tiny_models["dense"]["module"], (x,))
    result = bench(
        [dense, slim], BUILTIN_TARGETS["mobile-1t"], [tiny_models["x"]], dense=dense, warmup=1, runs=5
    )
    (sp,) = result.speedups
    flops, source = pair_flops(dense, slim)
    assert sp.flops_ratio == flops[0] / flops[1] > 1.5
    assert sp.efficiency == pytest.approx(sp.median / sp.flops_ratio)
    assert sp.flops_source == source and "TFLite graphs" in source
    assert f"FLOPs: {source}" in str(format_bench_table(result).caption)


def test_a_file_without_a_flops_counter_says_why(tmp_path) -> None:
    pte = tmp_path / "model.fp32.pte"
    pte.write_bytes(b"\0" * 16)
    assert file_flops(pte) == (None, "FLOPs of .pte files are not counted (only .pt2, .onnx and .tflite)")


def test_pairs_that_lost_time_to_other_processes_are_counted_and_said() -> None:
    """A run whose wall time exceeds its thread's CPU time lost that time to other processes; when more
    than a quarter of the pairs did, the speedup says so, with the CPU-time ratio of the same pairs."""
    from slimship.runtimes.speedup import lost_time, with_waits

    dense = {"latencies_ms": PAIR_DENSE, "cpu_ms": [3.2] * len(PAIR_DENSE)}
    slim = {"latencies_ms": PAIR_SLIM, "cpu_ms": [2.2] * len(PAIR_SLIM)}
    assert lost_time(PAIR_DENSE, dense["cpu_ms"]) == [w > 5 for w in PAIR_DENSE]
    ratios = [d / s for d, s in zip(PAIR_DENSE, PAIR_SLIM, strict=True)]
    sp = with_waits(speedup_from_ratios(ratios, "d", "s", "mobile-1t"), dense, slim)
    lost = sum(d > 5 or s > 5 for d, s in zip(PAIR_DENSE, PAIR_SLIM, strict=True))
    assert sp.lost_pairs == lost == 7 and sp.cpu_ratio == pytest.approx(3.2 / 2.2)
    assert sp.disturbed and f"{lost} of 9 pairs lost time to other processes" in sp.text()
    assert "their CPU-time ratio 1.45x" in sp.text()
    idle = with_waits(speedup_from_ratios([1.45] * 9, "d", "s", "mobile-1t"),
                      {"latencies_ms": [3.2] * 9, "cpu_ms": [3.19] * 9},
                      {"latencies_ms": [2.2] * 9, "cpu_ms": [2.2] * 9})  # fmt: skip
    assert idle.lost_pairs == 0 and not idle.disturbed and idle.text() == "1.45x (1.45-1.45)"


def test_the_runner_reports_each_runs_cpu_time(tiny_models) -> None:
    from slimship.runtimes.execute import run_on_target

    files = [tiny_models["dense"]["tflite"], tiny_models["slim"]["tflite"]]
    run = run_on_target(BUILTIN_TARGETS["mobile-1t"], files, [tiny_models["x"]], warmup=1, runs=7)
    for entry in run.result["models"]:
        wall, cpu = np.array(entry["latencies_ms"]), np.array(entry["cpu_ms"])
        assert len(cpu) == len(wall) == 7 and (cpu > 0).all() and (cpu <= wall + 0.05).all()


def test_bench_command_on_files_gives_one_speedup_with_its_efficiency(tiny_models, tmp_path, capsys) -> None:
    """`slimship bench` on two .tflite files on disk: the JSON's headline is the median of the ratios it
    carries; efficiency = headline / FLOPs ratio, FLOPs counted on both files; the table states both."""
    from slimship.cli import main

    dense, slim = tiny_models["dense"]["tflite"], tiny_models["slim"]["tflite"]
    out = tmp_path / "bench.json"
    argv = ["bench", str(dense), str(slim), "--dense", str(dense), "--target", "mobile-1t", "--runs", "6"]
    assert main([*argv, "--warmup", "1", "--json", str(out)]) == 0
    (sp,) = json.loads(out.read_text())["speedups"]
    x = torch.from_numpy(tiny_models["x"])
    flops_ratio = count_flops(tiny_models["dense"]["module"], (x,)) / count_flops(
        tiny_models["slim"]["module"], (x,)
    )
    assert sp["median"] == float(np.median(sp["ratios"])) and sp["pairs"] == len(sp["ratios"]) == 6
    assert sp["flops_ratio"] == pytest.approx(flops_ratio) and sp["efficiency"] == pytest.approx(
        sp["median"] / flops_ratio
    )
    shown = capsys.readouterr().out
    assert f"{sp['flops_ratio']:.2f}" in shown and f"{sp['efficiency']:.2f}" in shown and "n/a" not in shown
