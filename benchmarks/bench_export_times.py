"""Where export time goes, per format, for one model, before and after slimship ran calibration and
parity checks on one intra-op thread (`slimship.exporters.pt2e_calibration.SMALL_OP_THREADS`).

    python benchmarks/bench_export_times.py [--model mobilenet_v2] [--formats onnx tflite-int8 ...]
        [--calibration 32] [--breakdown]
    python benchmarks/bench_export_times.py --release [--formats ...]

Each format is exported twice in one process, side by side: with calibration and parity on torch's own
thread count (before), then on one thread (after); each line gives the total seconds, the file's sha256
(the same file: the same verdict), the verdict's figures and the exporter's stages, then the ratio.
`--breakdown` adds, for tflite-int8 and executorch-int8, the stage-by-stage split (trace, PT2E prepare,
calibration, convert, conversion/lowering) in both modes, with the quantised graph's top-1 agreement and
max|diff| against PyTorch on 16 held-out inputs. `--release` instead times `slimship release` of the model
(as a .pt2) with fresh exports and with `--exports DIR` from `slimship export`. Run it from the
repository root (the model comes from tests/zoo). Times are wall-clock on this machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from slimship.exporters.registry import FORMATS, ExportRequest
from tests.zoo import ZOO


def _stage(times: dict[str, float], name: str, start: float) -> float:
    now = time.perf_counter()
    times[name] = round(now - start, 2)
    return now


def int8_breakdown(
    fmt: str,
    model: torch.nn.Module,
    example: tuple,
    calib: list[tuple],
    threads: int | None,
    held_out: list[tuple],
) -> tuple[dict[str, float], dict[str, float]]:
    """The calibrated int8 path of `fmt` stage by stage (the same calls its exporter makes), calibrated
    on `threads` intra-op threads (None: torch's setting, as before slimship's `calibrate`); its stages and
    the quantised graph's quality against PyTorch on `held_out` (top-1 agreement, max|diff| / scale)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from slimship.exporters import pt2e_calibration
    from slimship.exporters.pt2e_calibration import calibrate

    times: dict[str, float] = {}
    start = time.perf_counter()
    traced = torch.export.export(model, example, strict=False)
    start = _stage(times, "torch.export", start)
    if fmt == "tflite-int8":
        import litert_torch
        from litert_torch.quantize import pt2e_quantizer, quant_config

        quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
            pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)
        )
    else:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config

        from slimship.exporters.executorch_export import _xnnpack_quantizer

        quantizer = _xnnpack_quantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(traced.module(), quantizer)
    start = _stage(times, "prepare", start)
    pt2e_calibration.SMALL_OP_THREADS = threads
    calibrate(prepared, calib)
    start = _stage(times, "calibrate", start)
    converted = convert_pt2e(prepared, fold_quantize=fmt != "tflite-int8")
    start = _stage(times, "convert_pt2e", start)
    quality = _quality(model, converted, held_out)
    start = time.perf_counter()
    if fmt == "tflite-int8":
        litert_torch.convert(
            converted, example, quant_config=quant_config.QuantConfig(pt2e_quantizer=quantizer)
        )
        _stage(times, "litert convert", start)
    else:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

        program = torch.export.export(converted, example, strict=False)
        start = _stage(times, "re-export", start)
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        start = _stage(times, "to_edge_transform_and_lower", start)
        edge.to_executorch()
        _stage(times, "to_executorch", start)
    times["total"] = round(sum(times.values()), 2)
    return times, quality


def _quality(model: torch.nn.Module, quantised: torch.nn.Module, held_out: list[tuple]) -> dict[str, float]:
    """Top-1 agreement and the largest |diff| relative to max(1, max|reference|) of a quantised graph."""
    agree, total, worst = 0, 0, 0.0
    with torch.no_grad():
        for batch in held_out:
            ref, out = model(*batch), quantised(*batch)
            agree += int((ref.argmax(-1) == out.argmax(-1)).sum())
            total += ref.shape[0]
            worst = max(worst, float((ref - out).abs().max() / max(1.0, float(ref.abs().max()))))
    return {"top1_agreement": round(agree / total, 3), "max_rel_diff": round(worst, 4)}


def _timed_export(
    fmt: str, request: ExportRequest, tmp: Path, stem: str, label: str, threads: int | None
) -> float:
    """Export `fmt` with SMALL_OP_THREADS = `threads`; print its time, file digest, verdict and stages."""
    from slimship.exporters import pt2e_calibration

    pt2e_calibration.SMALL_OP_THREADS = threads
    record = FORMATS[fmt]
    path = tmp / f"{threads}-{record.file_name(stem)}"
    start = time.perf_counter()
    try:
        result = record.export(request, path)
    except Exception as exc:  # a benchmark reports and goes on
        print(f"{fmt:<18} {label:<24} FAILED: {str(exc)[:120]}", flush=True)
        return 0.0
    total = time.perf_counter() - start
    parity = result.parity
    top1 = "" if parity.top1_agreement is None else f", top-1 agreement {parity.top1_agreement:.3f}"
    verdict = f"max|diff| {parity.max_abs_diff:.4g} (max rel {parity.max_rel_diff:.4g}){top1}"
    stages = ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items())
    print(f"{fmt:<18} {label:<24} {total:>8.1f}  {result.sha256[:12]}  {verdict}; {stages}", flush=True)
    return total


def release_times(case, formats: list[str], tmp: Path) -> None:
    """`slimship release` of the model saved as a .pt2, without and with `--exports` (the folder `slimship
    export` wrote): seconds each, and whether the two bundles are the same bytes."""
    import hashlib

    from slimship.cli import main as cli

    example = tuple(t[:1] for t in case.example_inputs)
    model = tmp / "model.pt2"
    torch.export.save(torch.export.export(case.model, example, strict=False), model)
    start = time.perf_counter()
    assert cli(["export", str(model), "--format", *formats, "--out", str(tmp / "ex")]) == 0
    print(f"release: slimship export {' '.join(formats)}: {time.perf_counter() - start:.1f} s", flush=True)
    digests, seconds = [], []
    for name, extra in (("fresh", []), ("reused", ["--exports", str(tmp / "ex")])):
        start = time.perf_counter()
        args = ["release", str(model), "--name", "m", "--version", "1.0.0", "--out", str(tmp / name)]
        assert cli([*args, "--format", *formats, *extra]) == 0
        seconds.append(time.perf_counter() - start)
        digests.append(hashlib.sha256((tmp / name / "m-1.0.0.tar.gz").read_bytes()).hexdigest())
    same = "the same bundle bytes" if digests[0] == digests[1] else "DIFFERENT bundles"
    print(f"release: fresh exports {seconds[0]:.1f} s, --exports {seconds[1]:.1f} s "
          f"(ratio {seconds[1] / seconds[0]:.2f}), {same}", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2", choices=sorted(ZOO))
    parser.add_argument("--formats", nargs="+", default=list(FORMATS))
    parser.add_argument("--calibration", type=int, default=32, help="calibration batches (batch 1)")
    parser.add_argument("--breakdown", action="store_true", help="also the stage-by-stage int8 split")
    parser.add_argument("--release", action="store_true", help="only: release without and with --exports")
    args = parser.parse_args()
    case = ZOO[args.model]()
    gen = torch.Generator().manual_seed(3)
    calib = [tuple(t[:1] for t in case.random_inputs(gen)) for _ in range(args.calibration)]
    example = tuple(t[:1] for t in case.example_inputs)
    request = ExportRequest(case.model, example, case.example_inputs, calib, calib, dynamic_batch=True)
    if args.release:
        with tempfile.TemporaryDirectory() as tmp:
            release_times(case, args.formats, Path(tmp))
        return
    print(f"{args.model}: {len(calib)} calibration batches, torch threads {torch.get_num_threads()}")
    modes = {f"torch's {torch.get_num_threads()} threads (before)": None, "1 thread (after)": 1}
    print("each format exported with calibration and parity checks on torch's threads, then on one")
    print(f"{'format':<18} {'small ops on':<24} {'total s':>8}  {'sha256':<12}  verdict; stages (s)")
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats:
            totals = [_timed_export(fmt, request, Path(tmp), args.model, label, threads) for label, threads in
                      modes.items()]  # fmt: skip
            if all(totals):
                print(f"{fmt:<18} after / before {totals[1] / totals[0]:.2f}", flush=True)
    held_out = [tuple(t[:1] for t in case.random_inputs(gen)) for _ in range(16)]
    for fmt in [f for f in args.formats if f in ("tflite-int8", "executorch-int8") and args.breakdown]:
        totals = {}
        labels = ((f"calibrated on {torch.get_num_threads()} threads", None), ("calibrated on 1 thread", 1))
        for label, threads in labels:
            parts, quality = int8_breakdown(fmt, case.model, example, calib, threads, held_out)
            totals[label] = parts["total"]
            stages = ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
            print(f"{fmt} {label}: {stages}; on 16 held-out inputs: {quality}", flush=True)
        before, after = totals.values()
        print(f"{fmt}: 1 thread / default, total {after / before:.2f} ({before:.1f} s -> {after:.1f} s)")


if __name__ == "__main__":
    main()
