"""The bench stage: every exported format timed and checked on every configured target, and the
measurements `slimship release` gates on."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimship.pipeline.config import PipelineConfig
from slimship.pipeline.gates import QUANTISED_FORMATS, Figures, GateResult, enforce, evaluate_gates


def bench_targets(config, example, dense_exports, slim_exports, slim_model, eval_pairs, flops):
    from slimship.runtimes.measure import layer_profile, measure, measure_speedup, where_measured
    from slimship.runtimes.torch_runner import TorchRunner

    bcfg = config.bench
    inputs = [t.numpy() for t in example]
    reference = TorchRunner(slim_model)
    latency: dict[str, dict[str, Any]] = {}
    accuracy: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    profiles: list[dict[str, Any]] = []  # per-layer dense vs slim, with bench.profile
    for target in config.target_profiles():
        for fmt, slim_export in slim_exports.items():
            if not runs_on(target, fmt):
                continue
            dense_path, slim_path = dense_exports[fmt].path, slim_export.path
            if (
                target.emulated
            ):  # parity and accuracy on the target's own kernels; its timings are not a device's
                evals = eval_pairs[:50] or None
                emulated = measure(
                    slim_path, inputs, target, warmup=0, runs=2, eval_batches=evals, reference=reference
                )
                accuracy[f"slim-{fmt}@{target.name}"] = {
                    "top1": _percent(emulated.accuracy),
                    "agreement": emulated.agreement,
                    "max_abs_diff": emulated.parity.max_abs if emulated.parity else None,
                }
                latency[f"{target.name}/{fmt}"] = {  # the manifest files these under latency.emulated
                    "target": target.name, "format": fmt, "emulated": True,
                    "p50_ms": emulated.latency.p50_ms, "p90_ms": emulated.latency.p90_ms,
                    "p99_ms": emulated.latency.p99_ms,
                }  # fmt: skip
                row = {"target": target.name, "format": fmt, "emulated": True}
                row["accuracy"] = _percent(emulated.accuracy)
                rows.append(row | {"max_abs_diff": accuracy[f"slim-{fmt}@{target.name}"]["max_abs_diff"]})
                continue
            speedup, (dense_m, slim_m) = measure_speedup(
                dense_path, slim_path, inputs, target, warmup=bcfg.warmup, runs=bcfg.runs, flops=flops
            )
            measured = measure(slim_path, inputs, target, warmup=1, runs=1, eval_batches=eval_pairs or None,
                               reference=reference)  # fmt: skip
            key = f"{target.name}/{fmt}"
            latency[key] = {
                "target": target.name,
                "format": fmt,
                "precision": slim_m.precision,
                "where": where_measured(target),  # "local profile (this machine)" or "device (ssh://...)"
                "runtime": slim_m.runtime.get("backend"),
                "emulated": bool(target.emulated),
                "p50_ms": slim_m.latency.p50_ms,
                "p90_ms": slim_m.latency.p90_ms,
                "p99_ms": slim_m.latency.p99_ms,
                "dense_p50_ms": dense_m.latency.p50_ms,
                "speedup": round(speedup.median, 4),
                "speedup_p10": round(speedup.p10, 4),
                "speedup_p90": round(speedup.p90, 4),
                "efficiency": round(speedup.efficiency, 4) if speedup.efficiency else None,
                "model_rss_kb": measured.model_rss_kb,  # its own load and first run, in a fresh process
                "variant": f"slim-{fmt}@{target.name}",
                "dense_variant": "dense-torch",
            }
            accuracy[f"slim-{fmt}@{target.name}"] = {
                "top1": _percent(measured.accuracy),
                "agreement": measured.agreement,
                "max_abs_diff": measured.parity.max_abs if measured.parity else None,
            }
            rows.append(latency[key] | {"accuracy": _percent(measured.accuracy)})
            if bcfg.profile:
                profile = layer_profile(dense_path, slim_path, inputs, target, f"dense-{fmt}", bcfg.runs)
                profiles.append(profile | {"target": target.name, "format": fmt})
    return latency, accuracy, rows, profiles


def runs_on(target: Any, fmt: str) -> bool:
    """Whether the pipeline benches format `fmt` on `target` (from the registries): a target with a reduced
    precision runs the formats of that precision only, a target with a fixed runtime the formats that
    runtime opens (an emulated ARM64 target: the runtime provisioned there, LiteRT for `auto`)."""
    from slimship.exporters.registry import get_format
    from slimship.runtimes.arm64_emu import emulated_runtime

    record = get_format(fmt)
    if target.precision != "fp32" and record.precision != target.precision:
        return False
    runtime = emulated_runtime(target) if target.emulated else target.runtime
    return runtime == "auto" or runtime in record.runtimes


def profile_plots(profiles: list[dict[str, Any]], spaces: Any) -> dict[str, Any]:
    """One report chart per profiled pair with per-layer rows (LiteRT has none: its note is in the JSON)."""
    from slimship.pipeline.report_profile import profile_plot, spaces_by_layer

    channels = spaces_by_layer(spaces)
    return {f"per-layer profile {p['target']}/{p['format']}": profile_plot(p, channels)
            for p in profiles if p["rows"]}  # fmt: skip


def _percent(fraction: float | None) -> float | None:
    """Runtimes report accuracy as a fraction; the pipeline speaks in percent like evaluate_accuracy."""
    return None if fraction is None else round(100.0 * fraction, 3)


def gate_results(config: PipelineConfig, dense_acc, slim_acc, latency, accuracy) -> list[GateResult]:
    """The configured gates on this run's figures (see slimship.pipeline.gates)."""
    figures = Figures(dense_top1=dense_acc, slim_top1=slim_acc)
    for key, entry in latency.items():
        if not entry["emulated"]:
            figures.p50_ms[key] = entry["p50_ms"]
            figures.speedup[key] = entry["speedup"]
    for target in config.target_profiles():
        for fmt in QUANTISED_FORMATS:
            agreement = accuracy.get(f"slim-{fmt}@{target.name}", {}).get("agreement")
            if agreement is not None:
                figures.agreement[f"{target.name}/{fmt}"] = agreement
    return evaluate_gates(config.gates, figures)


RELEASE_EVAL_SAMPLES = 64


def _agreement_inputs(
    example: tuple[torch.Tensor, ...], samples: list[tuple[torch.Tensor, ...]] | None
) -> list[tuple[np.ndarray, ...]]:
    """Single-sample inputs for the agreement gate: the user's samples split one by one, else random
    inputs shaped like `example` (seeded, so a rerun measures the same)."""
    if samples:
        rows = [tuple(t[i : i + 1].numpy() for t in batch) for batch in samples for i in range(len(batch[0]))]
        return rows[:RELEASE_EVAL_SAMPLES]
    generator = torch.Generator().manual_seed(0)
    return [
        tuple(torch.randn(t.shape, generator=generator).numpy() for t in example)
        for _ in range(RELEASE_EVAL_SAMPLES)
    ]


def gate_release(
    module: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    files: dict[str, Path],
    gates: Any,
    target_name: str = "host",
    runs: int = 30,
    samples: list[tuple[torch.Tensor, ...]] | None = None,
) -> list[GateResult]:
    """Gates for `slimship release` (no labels, no dense model): p50 latency of each file on the target
    when `max_latency_ms` is set, and the top-1 agreement of quantised files with `module` on the user's
    `samples` (the --calibration batches, one sample at a time, at most RELEASE_EVAL_SAMPLES) or, without
    them, on random inputs. Accuracy drop and speedup have no figures there: "not evaluated". Raises
    GateError on a failure."""
    from slimship.runtimes.measure import measure
    from slimship.runtimes.targets import get_target

    target = get_target(target_name)
    figures = Figures()
    batches = [(inputs, None) for inputs in _agreement_inputs(example, samples)]
    inputs = [t.numpy() for t in example]
    for fmt, path in files.items():
        quantised = fmt in QUANTISED_FORMATS and gates.min_agreement is not None
        if not quantised and gates.max_latency_ms is None:
            continue
        m = measure(path, inputs, target, warmup=2, runs=runs, eval_batches=batches if quantised else None,
                    reference=_eager(module))  # fmt: skip
        key = f"{target.name}/{fmt}"
        if not target.emulated:
            figures.p50_ms[key] = m.latency.p50_ms
        if quantised and m.agreement is not None:
            figures.agreement[key] = m.agreement
    results = evaluate_gates(gates, figures)
    for result in results:
        print(f"gate {result.line()}", file=sys.stderr)  # stdout may carry --json -
    enforce(results)
    return results


def _eager(module: Any):
    """A reference runner for any callable module (a torch.export program's module cannot `.eval()`)."""

    def run(arrays: list[np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            out = module(*(torch.from_numpy(np.asarray(a)) for a in arrays))
        return [t.detach().numpy() for t in torch.utils._pytree.tree_leaves(out)]

    return run
