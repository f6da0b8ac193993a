"""Choose the channel multiple to slim a model with for a target: measured per op kind, then confirmed on
the whole model. Or, per space, the kept count measured fastest there (`latency_counts`).

The per-kind sweep (`favoured_multiple`) times one-layer models; it is a proxy. In a network a rounded
space pads its producer's outputs and its consumers' inputs, and layers differ from the swept one in
size, so a multiple the sweep favours can still make the whole model slower (LiteRT: ResNet-18 aligned
to 16 ran 7-10% slower than slimmed exactly). So the model is slimmed both ways, exported and timed on
the target, interleaved; the aligned one is kept only when it is not slower. The sweep proposes up to two
multiples (the one its strict rule picks, and the larger one a 3% round-up cost would allow); the whole
model decides between them and exact slimming.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from slimship.exporters.registry import format_for_runtime
from slimship.runtimes.alignment import sweep_format
from slimship.runtimes.latency_table import MeasuredLatency
from slimship.runtimes.targets import Target
from slimship.slimming.channel_counts import LatencyAwareCounts

log = logging.getLogger(__name__)


def _export(model: Any, example: tuple[Any, ...], fmt: str, folder: Path, stem: str) -> Path:
    """`model` in format `fmt` through its registry record (with the exporter's parity check)."""
    from slimship.exporters.registry import ExportRequest, get_format

    record = get_format(fmt)
    path = folder / record.file_name(stem)
    record.export(ExportRequest(model, example, example, dynamic_batch=False), path)
    return path


def candidate_multiples(results: dict[str, Any], cost_tols: tuple[float, ...] = (0.01, 0.03)) -> list[int]:
    """The multiples the per-kind sweep proposes: for each round-up tolerance, the largest multiple any
    kind favours (re-derived from the measured latencies, nothing is timed again)."""
    from slimship.runtimes.alignment import derive_multiple

    out = set()
    for tol in cost_tols:
        favoured = [derive_multiple(r.channels, r.p50_ms, cost_tol=tol)[0] for r in results.values()]
        if any(favoured):
            out.add(max(m for m in favoured if m))
    return sorted(out)


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
    as devices run). The one-layer sweep and the whole-model check use the fp32 format the target's runtime
    opens (ONNX for `auto`). Returns None when the sweep proposes no multiple or every proposed one makes the
    whole model slower than exact slimming; otherwise the fastest proposed one.
    """
    from slimship.runtimes.alignment import favoured_multiple
    from slimship.runtimes.execute import run_on_target
    from slimship.runtimes.measure import speedup_from_ratios
    from slimship.slimming import slim

    swept, results = favoured_multiple(model, trace_example, target)
    candidates = candidate_multiples(results)
    info: dict[str, Any] = {
        "target": target.name,
        "runtime": target.runtime,
        "swept_multiple": swept,
        "candidates": candidates,
        "per_kind": {kind: r.multiple for kind, r in results.items()},
        "scores": {kind: {str(m): sc for m, sc in r.scores.items()} for kind, r in results.items()},
        "whole_model": None,
    }
    chosen = None
    if candidates:
        fmt = format_for_runtime(target.runtime).name
        variants = {None: slim(model, trace_example, **slim_options)}
        for m in candidates:
            variants[m] = slim(model, trace_example, channel_multiple=m, **slim_options)
        with tempfile.TemporaryDirectory(prefix="slimship-align-") as tmp:
            paths = [_export(r.model, run_example, fmt, Path(tmp), f"m{m or 0}") for m, r in variants.items()]
            inputs = [t.detach().numpy() for t in run_example]
            run = run_on_target(target, paths, inputs, runs=runs)
        p50 = [float(np.median(e["latencies_ms"])) for e in run.result["models"]]
        speedups = {
            m: speedup_from_ratios(ratios, "exact", f"aligned-{m}", target.name).median
            for m, ratios in zip(candidates, run.result["pair_ratios"], strict=True)
        }
        best = max(candidates, key=lambda m: speedups[m])
        chosen = best if speedups[best] >= 1.0 else None
        info["whole_model"] = {
            "exact_p50_ms": p50[0],
            "aligned": {
                str(m): {"p50_ms": ms, "speedup": round(speedups[m], 4), "flops": variants[m].flops_after}
                for m, ms in zip(candidates, p50[1:], strict=True)
            },
            "exact_flops": variants[None].flops_after,
            "kept": f"aligned-{chosen}" if chosen else "exact",
        }
        log.info("channel alignment on %s: whole-model speedups over exact slimming %s, kept %s",
                 target.name, speedups, info["whole_model"]["kept"])  # fmt: skip
    info["multiple"] = chosen
    return chosen, info


def latency_counts(target: Target, **measure: Any) -> LatencyAwareCounts:
    """`slim(channel_counts=...)` for `target`: per space, the kept count its layers run fastest at there
    (`LatencyAwareCounts`), timed in the format the target's runtime opens (ONNX for `auto`)."""
    return LatencyAwareCounts(MeasuredLatency(target, sweep_format(target.runtime), **measure))


def counts_record(policy: LatencyAwareCounts) -> dict[str, Any]:
    """What a latency-aware policy measured and chose, as JSON: per space the candidate counts, their
    measured latency (ms) and the count kept."""
    source = policy.source
    return {
        "target": source.target.name,
        "runtime": source.target.runtime,
        "format": source.fmt,
        "probes_timed": source.timed,
        "spaces": {
            d.space: {
                "needed": d.needed,
                "total": d.total,
                "candidates": list(d.candidates),
                "p50_ms": [round(t, 4) for t in d.latencies],
                "kept": d.chosen,
            }
            for d in policy.decisions.values()
        },
    }
