"""Choose the channel multiple to slim a model with for a target: measured per op kind, then confirmed on
the whole model.

The per-kind sweep (`favoured_multiple`) times one-layer models; it is a proxy. In a network a rounded
space pads its producer's outputs and its consumers' inputs, and layers differ from the swept one in
size, so a multiple the sweep favours can still make the whole model slower (LiteRT: ResNet-18 aligned
to 16 ran 7-10% slower than slimmed exactly). So the model is slimmed both ways, exported and timed on
the target, interleaved; the aligned one is kept only when it is not slower.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from slimship.runtimes.targets import Target

log = logging.getLogger(__name__)


def _export(model: Any, example: tuple[Any, ...], path: Path) -> Path:
    from slimship.exporters import export_onnx, export_tflite

    if path.suffix == ".onnx":
        export_onnx(model, example, path, dynamic_batch=False)
    else:
        export_tflite(model, example, path)
    return path


def choose_channel_multiple(
    model: Any,
    trace_example: tuple[Any, ...],
    run_example: tuple[Any, ...],
    target: Target,
    *,
    runs: int = 30,
    **slim_options: Any,
) -> tuple[int | None, dict[str, Any]]:
    """The multiple to pass to `slim(channel_multiple=...)` for `target`, and what was measured.

    `trace_example` is what `slim` traces with, `run_example` what the exported models run on (batch 1,
    as devices run). The one-layer sweep and the whole-model check use ONNX on an onnxruntime target and
    TFLite otherwise. Returns None when no multiple is favoured or the aligned model is slower.
    """
    from slimship.runtimes.alignment import favoured_multiple
    from slimship.runtimes.measure import measure_speedup
    from slimship.slimming import slim

    swept, results = favoured_multiple(model, trace_example, target)
    info: dict[str, Any] = {
        "target": target.name,
        "runtime": target.runtime,
        "swept_multiple": swept,
        "per_kind": {kind: r.multiple for kind, r in results.items()},
        "scores": {kind: {str(m): sc for m, sc in r.scores.items()} for kind, r in results.items()},
        "whole_model": None,
    }
    chosen = swept
    if swept:
        suffix = ".onnx" if target.runtime in ("auto", "onnxruntime") else ".tflite"
        plain = slim(model, trace_example, **slim_options)
        aligned = slim(model, trace_example, channel_multiple=swept, **slim_options)
        with tempfile.TemporaryDirectory(prefix="slimship-align-") as tmp:
            paths = [_export(r.model, run_example, Path(tmp) / f"{n}{suffix}") for n, r in
                     (("plain", plain), ("aligned", aligned))]  # fmt: skip
            inputs = [t.detach().numpy() for t in run_example]
            speedup, (plain_m, aligned_m) = measure_speedup(*paths, inputs, target, runs=runs)
        chosen = swept if speedup.median >= 1.0 else None
        info["whole_model"] = {
            "plain_p50_ms": plain_m.latency.p50_ms,
            "aligned_p50_ms": aligned_m.latency.p50_ms,
            "aligned_speedup": round(speedup.median, 4),
            "flops": [plain.flops_after, aligned.flops_after],
            "kept": "aligned" if chosen else "plain",
        }
        log.info("channel alignment on %s: %d measured %.3fx vs exact slimming, %s kept",
                 target.name, swept, speedup.median, info["whole_model"]["kept"])  # fmt: skip
    info["multiple"] = chosen
    return chosen, info
