"""Measurements on a target: latency percentiles, load time, memory, accuracy, parity, speedup.

Memory: `model_rss_kb` is the resident memory one model's load and first run added to a fresh runner
process, measured after its runtime was imported (None where the device cannot tell). `peak_rss_kb` is
the high-water mark of that whole process (interpreter, numpy, runtime, model), kept in the JSON only:
on Linux a runner started from this process keeps its parent's mark across exec, so it says nothing of
one model.

A speedup is measured as interleaved pairs (dense, slim, dense, slim ...) in one process on the
target and reported as the median of the per-pair ratios dense/slim, with p10-p90 and the IQR
(`SPEEDUP_DEFINITION`, the one definition every table, report and JSON states; the record and its text
are in `slimship.runtimes.speedup`, which also says when a measurement was disturbed). It is only
computed between files of the same format and precision (registry format); a dense .pt2 is exported by
`bench` into the format of each slim file. The p50s shown beside a speedup are those of the same pairs.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimship.compare import compare
from slimship.runtimes.execute import as_array_list, run_on_target
from slimship.runtimes.speedup import SPEEDUP_DEFINITION as SPEEDUP_DEFINITION  # re-exported: the
from slimship.runtimes.speedup import Speedup as Speedup  # speedup's record and text live in speedup.py
from slimship.runtimes.speedup import speedup_from_ratios as speedup_from_ratios
from slimship.runtimes.speedup import speedup_text as speedup_text
from slimship.runtimes.speedup import with_flops as with_flops
from slimship.runtimes.speedup import with_waits
from slimship.runtimes.targets import Target

EvalBatch = tuple[Any, Any]  # (inputs: array | list of arrays, labels: int array | None)


@dataclass
class LatencyStats:
    n: int
    mean_ms: float
    std_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float
    samples: tuple[float, ...] = ()  # the per-run latencies (ms) the figures come from, in run order

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> LatencyStats:
        a = np.asarray(samples_ms, dtype=np.float64)
        if a.size == 0:
            raise ValueError("no latency samples: runs must be >= 1")
        p50, p90, p99 = np.percentile(a, [50, 90, 99])
        return cls(int(a.size), float(a.mean()), float(a.std()), float(p50), float(p90), float(p99),
                   float(a.min()), float(a.max()), tuple(float(v) for v in a))  # fmt: skip


@dataclass
class Parity:
    """Outputs of the measured model vs the reference model on the same inputs."""

    max_abs: float
    mean_abs: float
    max_rel: float  # max |a-b| / max(1, max |finite b|) (slimship.compare); inf when NaN/Inf differ


@dataclass
class Measurement:
    model: str
    target: str
    runtime: dict[str, Any]
    precision: str
    load_ms: float
    latency: LatencyStats
    peak_rss_kb: int
    baseline_rss_kb: int
    model_rss_kb: int | None  # what this model's load and first run added (see module doc)
    affinity: list[int] | None
    format: str | None = None  # registry format name, None when the file's format is not known
    accuracy: float | None = None  # top-1 vs labels on the evaluation batches
    agreement: float | None = None  # top-1 agreement with the reference model
    eval_samples: int = 0
    parity: Parity | None = None


@dataclass
class BenchResult:
    target: Target
    measurements: list[Measurement] = field(default_factory=list)
    speedups: list[Speedup] = field(default_factory=list)
    where: str = ""  # "local profile (this machine)", "device (ssh://...)" or "emulated ARM64 ..."
    notes: list[str] = field(default_factory=list)  # why a row has no speedup, what was exported
    profiles: list[dict[str, Any]] = field(default_factory=list)  # per-layer dense vs slim, with --profile


def format_of_file(path: str | Path) -> Any:
    """The registry format record of a model file, or None (`slimship.exporters.registry.format_of_file`;
    imported here on use: the exporters package imports torch)."""
    from slimship.exporters.registry import format_of_file as of_file

    return of_file(path)


def where_measured(target: Target) -> str:
    """What a target's figures are: a local profile, a device's, or emulated (never device timings)."""
    if target.emulated:
        return "emulated ARM64 (qemu; not device timings)"
    if target.scheme == "local":
        return "local profile (this machine)"
    return f"device ({target.transport})"


def _reference_fn(reference: Any) -> Callable[[list[np.ndarray]], list[np.ndarray]] | None:
    if reference is None:
        return None
    run = reference.run if hasattr(reference, "run") else reference
    return lambda xs: [np.asarray(o) for o in run(xs)]


def _top1(outputs: list[np.ndarray], index: int = 0) -> np.ndarray:
    """argmax over the last axis of output `index` per row; -1 for a row holding a NaN (as the device
    runner)."""
    first = np.asarray(outputs[index])
    rows = first.reshape(-1, first.shape[-1])
    top = rows.argmax(-1)
    return np.where(np.isnan(rows).any(-1), -1, top) if rows.dtype.kind in "fc" else top


def parity(outputs: list[np.ndarray], reference: list[np.ndarray]) -> Parity:
    """Worst-case differences between two output lists of the same structure.

    max_abs and max_rel come from `slimship.compare.compare` (a NaN/Inf out of place makes them inf);
    mean_abs is the worst per-output mean over the entries finite in both.
    """
    if len(outputs) != len(reference):
        raise ValueError(f"model has {len(outputs)} outputs, reference has {len(reference)}")
    check = compare(list(reference), list(outputs), 0.0)
    mean_abs = 0.0
    for a, b in zip(outputs, reference, strict=True):
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64).reshape(np.shape(a))
        both = np.isfinite(a64) & np.isfinite(b64)
        if both.any():
            mean_abs = max(mean_abs, float(np.abs(a64 - b64)[both].mean()))
    return Parity(check.max_abs_diff, mean_abs, check.max_rel_diff)


def _accuracy(
    top1: list[list[int]], eval_batches: list[EvalBatch], ref: Any, index: int = 0
) -> tuple[float | None, float | None, int]:
    preds = np.concatenate([np.asarray(t, dtype=np.int64) for t in top1]) if top1 else np.zeros(0, np.int64)
    labels = [b[1] for b in eval_batches]
    accuracy = None
    if all(lab is not None for lab in labels) and preds.size:
        accuracy = float((preds == np.concatenate([np.asarray(lab).reshape(-1) for lab in labels])).mean())
    agreement = None
    if ref is not None and preds.size:
        ref_preds = np.concatenate([_top1(ref(as_array_list(b[0])), index) for b in eval_batches])
        named = ref_preds >= 0  # -1: a NaN reference row names no class, so it never agrees
        agreement = float(((preds == ref_preds) & named).mean())
    return accuracy, agreement, int(preds.size)


def _measurement(model: Path, entry: dict[str, Any], result: dict[str, Any], target: Target) -> Measurement:
    record = format_of_file(model)
    rss = entry.get("model_rss_kb")
    return Measurement(
        model=str(model),
        target=target.name,
        runtime=entry["runtime"],
        precision=record.precision if record else "unknown",
        load_ms=float(entry["load_ms"]),
        latency=LatencyStats.from_samples(entry["latencies_ms"]),
        peak_rss_kb=int(result["peak_rss_kb"]),
        baseline_rss_kb=int(result["baseline_rss_kb"]),
        model_rss_kb=None if rss is None else int(rss),
        affinity=result.get("affinity"),
        format=record.name if record else None,
    )


def measure(
    model_path: str | Path,
    inputs: Any,
    target: Target,
    *,
    warmup: int = 5,
    runs: int = 50,
    eval_batches: list[EvalBatch] | None = None,
    reference: Any = None,
    staging_dir: Path | None = None,
    eval_output: int = 0,
) -> Measurement:
    """Load time, latency stats, peak RSS; accuracy/agreement on `eval_batches` (top-1 of output
    `eval_output`); parity vs `reference`.

    `reference` is a Runner (or a callable) taking a list of arrays and returning a list of arrays,
    run on this host (typically the torch model).
    """
    ref = _reference_fn(reference)
    run = run_on_target(
        target, [Path(model_path)], inputs, warmup=warmup, runs=runs,
        eval_inputs=[as_array_list(b[0]) for b in eval_batches] if eval_batches else None,
        save_outputs=ref is not None, staging_dir=staging_dir,
        extra_args=["--eval-output", str(eval_output)] if eval_batches and eval_output else (),
    )  # fmt: skip
    entry = run.result["models"][0]
    m = _measurement(Path(model_path), entry, run.result, target)
    if eval_batches:
        m.accuracy, m.agreement, m.eval_samples = _accuracy(
            entry["eval_top1"], eval_batches, ref, eval_output
        )
    if ref is not None:
        m.parity = parity(run.outputs[0], ref(as_array_list(inputs)))
    return m


def median_latencies_ms(
    models: Sequence[Path], inputs: Any, target: Target, *, warmup: int = 5, runs: int = 50, repeats: int = 1
) -> list[float]:
    """Median latency (ms) of each model, timed interleaved in one runner process on `target`; with
    `repeats` > 1 the smallest of that many medians (load from other processes only ever adds time)."""
    best = [math.inf] * len(models)
    for _ in range(max(1, repeats)):
        run = run_on_target(target, [Path(m) for m in models], inputs, warmup=warmup, runs=runs)
        medians = [float(np.median(e["latencies_ms"])) for e in run.result["models"]]
        best = [min(b, m) for b, m in zip(best, medians, strict=True)]
    return best


def measure_speedup(
    dense: str | Path,
    slim: str | Path,
    inputs: Any,
    target: Target,
    *,
    warmup: int = 5,
    runs: int = 50,
    flops: tuple[float, float] | None = None,
    staging_dir: Path | None = None,
) -> tuple[Speedup, list[Measurement]]:
    """Interleaved dense/slim pairs in one process on `target`; also returns both measurements."""
    run = run_on_target(
        target, [Path(dense), Path(slim)], inputs, warmup=warmup, runs=runs, staging_dir=staging_dir
    )
    entries = run.result["models"]
    sp = speedup_from_ratios(run.result["pair_ratios"][0], str(dense), str(slim), target.name, flops)
    pair = (Path(dense), Path(slim))
    measured = [_measurement(p, e, run.result, target) for p, e in zip(pair, entries, strict=True)]
    p50s = {"dense_p50_ms": measured[0].latency.p50_ms, "slim_p50_ms": measured[1].latency.p50_ms}
    sp = dataclasses.replace(sp, **p50s)
    if target.threads == 1:  # the runtime computes on the runner's thread: its CPU time shows the waits
        sp = with_waits(sp, entries[0], entries[1])
    return sp, measured


def bench(
    models: list[Path],
    target: Target,
    inputs: Any,
    *,
    dense: Path | None = None,
    warmup: int = 5,
    runs: int = 50,
    eval_batches: list[EvalBatch] | None = None,
    reference: Any = None,
    flops: dict[str, float] | None = None,
    profile: bool = False,
    calibration: list[tuple[Any, ...]] | None = None,
) -> BenchResult:
    """Measure every model on `target`, each in its own runner process; with `dense`, the speedup of each
    model over the dense file of its own format and precision.

    A dense .onnx/.tflite/.pte pairs only with files of its format; a dense .pt2 is exported (through the
    format registry, with parity) into each slim file's format and those are measured too. A file without
    a partner gets no speedup and a note why. `flops` maps a path (as given) to FLOPs for the efficiency;
    `profile` adds a per-layer dense vs slim profile per pair (`slimship.runtimes.profile`); `calibration`
    (tensor batches) calibrates a dense .pt2's full-int8 twins, as the slim files were.
    """
    result = BenchResult(target=target, where=where_measured(target))
    dense = Path(dense) if dense is not None else None
    from_pt2 = dense is not None and dense.suffix.lower() == ".pt2"
    models = [Path(m) for m in models if not (from_pt2 and Path(m) == dense)]
    options = {"warmup": warmup, "runs": runs}
    for model in models:
        result.measurements.append(
            measure(model, inputs, target, **options, eval_batches=eval_batches, reference=reference)
        )
    if dense is None:
        return result
    with tempfile.TemporaryDirectory(prefix="slimship-bench-") as tmp:
        partners = _dense_partners(dense, models, inputs, Path(tmp), result.notes, calibration)
        for model, label in ((p, f"{dense} as {name}") for name, p in partners.items() if from_pt2):
            m = measure(model, inputs, target, **options)
            result.measurements.append(dataclasses.replace(m, model=label))
        for model in models:
            if model == dense:
                continue
            record = format_of_file(model)
            partner = partners.get(record.name) if record else None
            if partner is None:
                result.notes.append(_no_pair_note(model, record, dense))
                continue
            sp, _ = measure_speedup(partner, model, inputs, target, **options)
            counted, source = _flops_of_pair(flops, dense, partner, model)
            if counted is None:
                result.notes.append(f"{model}: efficiency n/a: {source}")
            shown = f"{dense} as {record.name}" if from_pt2 else str(dense)
            sp = with_flops(dataclasses.replace(sp, dense=shown, format=record.name), counted, source)
            result.speedups.append(sp)
            if profile:
                result.profiles.append(layer_profile(partner, model, inputs, target, shown, runs))
    return result


def _flops_of_pair(
    given: dict[str, float] | None, dense: Path, partner: Path, model: Path
) -> tuple[tuple[float, float] | None, str]:
    """(dense FLOPs, slim FLOPs) for a speedup's efficiency and where they come from: the caller's `flops`
    (path as given -> FLOPs) when it names both files, else counted from the two files of the pair
    (`slimship.runtimes.file_flops`: the same counter on both sides)."""
    if given and str(dense) in given and str(model) in given:
        return (given[str(dense)], given[str(model)]), "given by the caller"
    from slimship.runtimes.file_flops import pair_flops

    return pair_flops(partner, model)


def _dense_partners(
    dense: Path, models: list[Path], inputs: Any, folder: Path, notes: list[str], calibration: Any = None
) -> dict[str, Path]:
    """Format name -> dense file of that format: the dense file itself, or the dense .pt2 exported into the
    formats of `models` (registry records, parity checked by each exporter; full-int8 twins calibrated on
    `calibration`, else on the bench inputs, which the notes say)."""
    if dense.suffix.lower() != ".pt2":
        record = format_of_file(dense)
        return {record.name: dense} if record else {}
    wanted = {r.name: r for r in (format_of_file(m) for m in models) if r is not None}
    if not wanted:
        return {}
    import torch

    from slimship.exporters.registry import ExportRequest
    from slimship.loading import load_program

    module = load_program(dense).module
    example = tuple(torch.from_numpy(np.array(x)) for x in as_array_list(inputs))
    request = ExportRequest(module, example, example, calibration=calibration, dynamic_batch=False)
    out = {}
    for name, record in wanted.items():
        out[name] = Path(record.export(request, folder / record.file_name("dense")).path)
        if record.calibrated:
            samples = sum(len(batch[0]) for batch in calibration or [])
            on = f"the {samples} --calibration samples" if calibration else "the bench inputs only"
            hint = "" if calibration else " (give --calibration, the samples the slim file was calibrated on)"
            notes.append(f"{dense} as {name}: calibrated on {on}{hint}")
    return out


def _no_pair_note(model: Path, record: Any, dense: Path) -> str:
    if record is None:
        return (f"{model}: no speedup: its format and precision are unknown (an ExecuTorch file states its "
                "precision in its name, e.g. model.int8.pte)")  # fmt: skip
    dense_record = format_of_file(dense)
    what = dense_record.name if dense_record else "an unknown format"
    return (f"{model}: no speedup: the dense model {dense} is {what}, this file is {record.name}; a speedup "
            f"compares one format and precision: give the dense model as .pt2 (bench exports it) or as "
            f"{record.name}")  # fmt: skip


PROFILE_KEYS = ("layer", "op", "dense_ms", "slim_ms", "speedup", "flops_ratio", "efficiency", "poor", "share")


def layer_profile(
    dense: Path, slim: Path, inputs: Any, target: Target, dense_label: str, runs: int = 20
) -> dict[str, Any]:
    """A per-layer dense vs slim profile of one pair, on this machine with the target's thread count
    (`slimship.runtimes.profile`); a remote target's per-layer view is not measured (noted)."""
    from slimship.runtimes.profile import profile_models

    entry: dict[str, Any] = {"dense": dense_label, "slim": str(slim), "where": "local profile (this machine)"}
    if target.scheme != "local" or target.emulated:
        return entry | {"runtime": None, "rows": [], "note": f"per-layer profiles run on this machine only, "
                        f"not on {target.transport}"}  # fmt: skip
    prof = profile_models(
        dense, slim, as_array_list(inputs), runs=max(5, min(runs, 50)), threads=target.threads or 1
    )
    rows = [{k: row[k] for k in PROFILE_KEYS} for row in prof.rows()]
    return entry | {"runtime": prof.runtime, "rows": rows, "note": prof.note}


def _fmt(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


BENCH_COLUMNS = (
    "model", "format", "precision", "runtime", "load ms", "p50 ms", "p90 ms", "p99 ms", "mean±std ms",
    "model MB", "top-1", "agree", "max |Δ|", "speedup (p10-p90)", "pair p50 ms", "FLOPs ratio", "efficiency",
)  # fmt: skip
SOLO_RUNS = "p50/p90/p99 ms: each file alone in its own runner process"


def bench_caption(speedups: Sequence[Speedup], notes: Sequence[str] = ()) -> str:
    """The footer of a table of speedups: the one definition, where the FLOPs came from, and the notes."""
    sources = sorted({s.flops_source for s in speedups if s.flops_source})
    lines = [f"{SPEEDUP_DEFINITION}; pair p50 ms: dense -> slim of those pairs", SOLO_RUNS]
    lines += [f"FLOPs: {source}" for source in sources]
    return "\n".join([*lines, *notes])


def format_bench_table(result: BenchResult) -> Any:
    """A rich Table: one row per model with its format and precision, its own memory where measured, and
    the speedup over the dense file of the same format and precision; the definition and notes as the
    caption."""
    from rich.table import Table

    t = result.target
    where = result.where or where_measured(t)
    table = Table(title=f"target {t.name}: {where}, threads={t.threads or 'default'}")
    for col in BENCH_COLUMNS:
        table.add_column(
            col, justify="left" if col in ("model", "format", "precision", "runtime") else "right"
        )
    speedups = {s.slim: s for s in result.speedups}
    for m in result.measurements:
        s = speedups.get(m.model)
        pair_p50 = f"{s.dense_p50_ms:.3f} -> {s.slim_p50_ms:.3f}" if s and s.dense_p50_ms else "-"
        table.add_row(
            m.model,
            m.format or "unknown",
            m.precision,
            f"{m.runtime.get('backend')} {m.runtime.get('version')}",
            f"{m.load_ms:.1f}",
            f"{m.latency.p50_ms:.3f}",
            f"{m.latency.p90_ms:.3f}",
            f"{m.latency.p99_ms:.3f}",
            f"{m.latency.mean_ms:.3f}±{m.latency.std_ms:.3f}",
            _fmt(None if m.model_rss_kb is None else m.model_rss_kb / 1024, ".1f"),
            _fmt(m.accuracy, ".3f"),
            _fmt(m.agreement, ".3f"),
            _fmt(m.parity.max_abs if m.parity else None, ".2e"),
            s.text() if s else "-",
            pair_p50,
            _fmt(s.flops_ratio, ".2f", "n/a") if s else "-",
            _fmt(s.efficiency, ".2f", "n/a") if s else "-",
        )
    if result.speedups:
        table.caption = bench_caption(result.speedups, result.notes)
    elif result.notes:
        table.caption = "\n".join(result.notes)
    return table


def format_profile_table(profile: dict[str, Any], top: int = 12) -> Any:
    """A compact rich Table of one pair's per-layer profile: the `top` layers by dense time."""
    from rich.table import Table

    runtime = profile.get("runtime") or ""
    title = f"per-layer {runtime} {profile['where']}: {profile['slim']} vs {profile['dense']}"
    table = Table(title=title, caption=profile.get("note") or None)
    for col in ("layer", "op", "dense ms", "slim ms", "speedup", "FLOPs ratio", "efficiency", ""):
        table.add_column(col, justify="left" if col in ("layer", "op", "") else "right")
    for row in profile["rows"][:top]:
        table.add_row(
            row["layer"], row["op"], f"{row['dense_ms']:.3f}", f"{row['slim_ms']:.3f}",
            _fmt(row["speedup"], ".2f"), _fmt(row["flops_ratio"], ".2f", "n/a"),
            _fmt(row["efficiency"], ".2f", "n/a"), "poor" if row["poor"] else "",
        )  # fmt: skip
    return table
