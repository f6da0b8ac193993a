"""Where export time goes, per format, for one model: each exporter's own stage timings, and for the
calibrated int8 formats a finer split (trace, PT2E prepare, calibration, convert, conversion/lowering).

    python benchmarks/bench_export_times.py [--model mobilenet_v2] [--formats onnx tflite-int8 ...]
        [--calibration 32]

Prints one table: format, total seconds, and the stages the exporter reports (`timings`), then the int8
breakdown. Run it from the repository root (the model comes from tests/zoo). Times are wall-clock on this
machine, all formats in one process, side by side.
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


def int8_breakdown(fmt: str, model: torch.nn.Module, example: tuple, calib: list[tuple]) -> dict[str, float]:
    """The calibrated int8 path of `fmt` stage by stage (the same calls its exporter makes)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

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
    with torch.no_grad():
        for batch in calib:
            prepared(*batch)
    start = _stage(times, f"calibrate ({len(calib)} batches)", start)
    converted = convert_pt2e(prepared, fold_quantize=fmt != "tflite-int8")
    start = _stage(times, "convert_pt2e", start)
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
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2", choices=sorted(ZOO))
    parser.add_argument("--formats", nargs="+", default=list(FORMATS))
    parser.add_argument("--calibration", type=int, default=32, help="calibration batches (batch 1)")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the stage-by-stage int8 split")
    args = parser.parse_args()
    case = ZOO[args.model]()
    gen = torch.Generator().manual_seed(3)
    calib = [tuple(t[:1] for t in case.random_inputs(gen)) for _ in range(args.calibration)]
    example = tuple(t[:1] for t in case.example_inputs)
    request = ExportRequest(case.model, example, case.example_inputs, calib, calib, dynamic_batch=True)
    print(f"{args.model}: {len(calib)} calibration batches, torch threads {torch.get_num_threads()}")
    print(f"{'format':<20} {'total s':>8}  stages (s)")
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats:
            record = FORMATS[fmt]
            start = time.perf_counter()
            try:
                result = record.export(request, Path(tmp) / record.file_name(args.model))
                stages = ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items())
            except Exception as exc:  # a benchmark reports and goes on
                stages = f"FAILED: {str(exc)[:120]}"
            print(f"{fmt:<20} {time.perf_counter() - start:>8.1f}  {stages}", flush=True)
    for fmt in [f for f in args.formats if f in ("tflite-int8", "executorch-int8") and not args.no_breakdown]:
        parts = int8_breakdown(fmt, case.model, example, calib)
        print(f"{fmt} breakdown: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()), flush=True)


if __name__ == "__main__":
    main()
