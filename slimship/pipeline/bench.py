"""The bench stage: every exported format timed and checked on every configured target (`bench_targets`),
and the measurements `slimship release` gates on (`release_bench`). Both return `BenchFigures`, which the
gates, the summary and the manifest read."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimship.pipeline.gates import (
    QUANTISED_FORMATS,
    GateFigures,
    GateResult,
    GatesSpec,
    enforce,
    evaluate_gates,
)
from slimship.pipeline.records import BenchEntry, BenchFigures, ExportResult

EvalPair = tuple[np.ndarray, np.ndarray]  # (one input sample, its label)


@dataclass(frozen=True)
class BenchPlan:
    """What the bench stage runs: the targets, the `bench:` section, the example a device runs, the labelled
    evaluation samples, and the FLOPs (dense, slim) the speedup's efficiency is read against."""

    targets: Sequence[Any]  # runtimes.targets.Target
    runs: int
    warmup: int
    profile: bool
    example: tuple[torch.Tensor, ...]
    eval_pairs: Sequence[EvalPair] = ()
    flops: tuple[int, int] | None = None
    eval_output: int = 0  # which flattened output holds the logits top-1 is read from (`data.output`)


def logits_index(module: Any, example: tuple[torch.Tensor, ...], choice: int | str | None) -> int:
    """The flattened-output index `choice` (the config's `data.output`) selects on `module`'s outputs."""
    from slimship.data import output_index

    with torch.no_grad():
        return output_index(module(*example), choice)


def bench_targets(
    plan: BenchPlan, dense: ExportResult, slim: ExportResult, slim_model: torch.nn.Module, top1: tuple
) -> BenchFigures:
    """Each slim format on each target that runs it: on a device target, timed interleaved with its dense
    export (speedup) and checked once on the evaluation samples; on an emulated target, checked only.
    `top1` is the (dense, slim) torch top-1 on the same samples."""
    from slimship.runtimes.measure import layer_profile, measure, measure_speedup, where_measured, with_flops
    from slimship.runtimes.torch_runner import TorchRunner

    inputs = [t.numpy() for t in plan.example]
    reference = TorchRunner(slim_model)
    pairs = list(plan.eval_pairs)
    entries: list[BenchEntry] = []
    for target in plan.targets:
        for fmt, slim_export in slim.results.items():
            if not runs_on(target, fmt):
                continue
            dense_path, slim_path = dense.results[fmt].path, slim_export.path
            if target.emulated:  # parity and accuracy on its kernels; its timings are not a device's
                evals = pairs[:50] or None
                checked = measure(slim_path, inputs, target, warmup=0, runs=2, eval_batches=evals,
                                  reference=reference, eval_output=plan.eval_output)  # fmt: skip
                entries.append(BenchEntry(target.name, fmt, True, checked))
                continue
            speedup, (dense_m, slim_m) = measure_speedup(
                dense_path, slim_path, inputs, target, warmup=plan.warmup, runs=plan.runs
            )
            speedup = with_flops(speedup, plan.flops, TORCH_FLOPS)
            checked = measure(slim_path, inputs, target, warmup=1, runs=1, eval_batches=pairs or None,
                              reference=reference, eval_output=plan.eval_output)  # fmt: skip
            profile = None
            if plan.profile:
                profile = layer_profile(dense_path, slim_path, inputs, target, f"dense-{fmt}", plan.runs)
            entries.append(BenchEntry(target.name, fmt, False, checked, slim_m, dense_m, speedup,
                                      where_measured(target), profile))  # fmt: skip
    on = f"evaluation data ({len(pairs)} samples)" if pairs else None
    return BenchFigures(tuple(entries), *top1, agreement_on=on)


TORCH_FLOPS = "torch.utils.flop_counter on the dense and slim PyTorch models (example inputs)"


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


def profile_plots(bench: BenchFigures, spaces: Any) -> dict[str, Any]:
    """One report chart per profiled pair with per-layer rows (LiteRT has none: its note is in the JSON)."""
    from slimship.pipeline.report_profile import profile_plot, spaces_by_layer

    channels = spaces_by_layer(spaces)
    return {f"per-layer profile {p['target']}/{p['format']}": profile_plot(p, channels)
            for p in bench.profiles() if p["rows"]}  # fmt: skip


RELEASE_EVAL_SAMPLES = 64


def _agreement_inputs(
    example: tuple[torch.Tensor, ...], samples: list[tuple[torch.Tensor, ...]] | None
) -> tuple[list[tuple[np.ndarray, ...]], str]:
    """Single-sample inputs for the agreement gate and what they are: the user's samples split one by one
    ("calibration data (N samples)"), else random inputs shaped like `example` (seeded, so a rerun measures
    the same; "random inputs (N seeded samples, not real data)")."""
    if samples:
        rows = [tuple(t[i : i + 1].numpy() for t in batch) for batch in samples for i in range(len(batch[0]))]
        rows = rows[:RELEASE_EVAL_SAMPLES]
        return rows, f"calibration data ({len(rows)} samples)"
    generator = torch.Generator().manual_seed(0)
    rows = [
        tuple(torch.randn(t.shape, generator=generator).numpy() for t in example)
        for _ in range(RELEASE_EVAL_SAMPLES)
    ]
    return rows, f"random inputs ({len(rows)} seeded samples, not real data)"


#: timed runs per file when a release records latency
RELEASE_RUNS = 30


def release_bench(
    module: Any,
    example: tuple[torch.Tensor, ...],
    files: dict[str, Path],
    gates: GatesSpec,
    target: Any,
    runs: int = RELEASE_RUNS,
    samples: list[tuple[torch.Tensor, ...]] | None = None,
) -> BenchFigures:
    """What `slimship release` measures (no labels, no dense model): each file's latency and parity on
    `target`, and quantised files' top-1 agreement with `module` (when `min_agreement` is on) on the user's
    `samples` (the --calibration batches, one sample at a time, at most RELEASE_EVAL_SAMPLES) or, without
    them, on random inputs; `agreement_on` says which."""
    from slimship.runtimes.measure import measure, where_measured

    rows, on = _agreement_inputs(example, samples)
    batches = [(inputs, None) for inputs in rows]
    inputs = [t.numpy() for t in example]
    entries = []
    for fmt, path in files.items():
        quantised = fmt in QUANTISED_FORMATS and gates.min_agreement is not None
        evals = batches if quantised else None
        checked = measure(
            path, inputs, target, warmup=2, runs=runs, eval_batches=evals, reference=_eager(module)
        )
        where = where_measured(target)
        entries.append(BenchEntry(target.name, fmt, bool(target.emulated), checked, where=where))
    scored = any(e.checked.agreement is not None for e in entries)
    return BenchFigures(tuple(entries), agreement_on=on if scored else None)


def release_timed(target: str | None, gates: GatesSpec) -> str | None:
    """The target a standalone release times its files on, or None: only when `--target` names one or a
    latency gate needs the figure. Timings differ from run to run, so an untimed bundle stays byte-identical
    across processes for the same inputs; a timed one records what was measured."""
    if target is not None:
        return target
    return "host" if gates.max_latency_ms is not None else None


def gate_release(
    module: Any,
    example: tuple[torch.Tensor, ...],
    files: dict[str, Path],
    gates: GatesSpec,
    target_name: str = "host",
    runs: int = RELEASE_RUNS,
    samples: list[tuple[torch.Tensor, ...]] | None = None,
) -> list[GateResult]:
    """Gates for `slimship release` on `release_bench`'s figures (`release_gates`)."""
    from slimship.runtimes.targets import get_target

    bench = release_bench(module, example, files, gates, get_target(target_name), runs, samples)
    return release_gates(gates, bench)


def release_gates(gates: GatesSpec, bench: BenchFigures) -> list[GateResult]:
    """The gates of `slimship release` on `release_bench`'s figures; accuracy drop and speedup have no
    figures there: "not evaluated". Each gate's line goes to stderr; raises GateError on a failure."""
    results = bench.agreement_said(evaluate_gates(gates, GateFigures.of(bench)))
    for result in results:
        print(f"gate {result.line()}", file=sys.stderr)  # stdout may carry --json -
    enforce(results)
    return results


def release_slimming(module: Any, example: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """The manifest's `slimming` for a release made from the slim model alone: its parameters and FLOPs
    (the dense model's are unknown there), and where the FLOPs come from."""
    from slimship.slimming import count_flops

    params = sum(int(p.numel()) for p in module.parameters()) if hasattr(module, "parameters") else None
    flops = count_flops(module, example)
    source = "torch.utils.flop_counter on the slim model (example inputs)"
    return {"params_after": params, "flops_after": flops, "flops_source": source}


def _eager(module: Any):
    """A reference runner for any callable module (a torch.export program's module cannot `.eval()`)."""

    def run(arrays: list[np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            out = module(*(torch.from_numpy(np.asarray(a)) for a in arrays))
        return [t.detach().numpy() for t in torch.utils._pytree.tree_leaves(out)]

    return run
