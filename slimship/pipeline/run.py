"""The pipeline: compose the stages (train, compress, slim, export, bench, release) from a config."""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from slimship._util import set_seed, sha256_bytes
from slimship.compress.device import (
    broadcast_object_from_rank0,
    gather_object,
    process_group,
    rank,
    resolve_device,
    to_device,
    world_size,
)
from slimship.errors import ConfigError, SlimshipError, StoppedEarly
from slimship.exporters.registry import get_format
from slimship.pipeline.config import PipelineConfig
from slimship.pipeline.gates import QUANTISED_FORMATS, Figures, GateResult, enforce, evaluate_gates
from slimship.runtimes.measure import speedup_text

log = logging.getLogger(__name__)

EVAL_SAMPLES = 200


@dataclass
class PipelineResult:
    """What a pipeline run produced and measured (JSON-convertible)."""

    release_dir: Path | None
    summary: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


class _Stages:
    """Prints one line per stage with its duration."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.timings: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        with self.console.status(f"[bold]{name}[/bold] ..."):
            result = fn(*args, **kwargs)
        self.timings[name] = round(time.perf_counter() - start, 2)
        self.console.print(f"[green]✓[/green] {name} ({self.timings[name]:.1f} s)")
        return result


def _accuracy(model: torch.nn.Module, test: Any) -> float | None:
    if test is None:
        return None
    from slimship.data import evaluate_accuracy

    return round(float(evaluate_accuracy(model, test)), 3)


def _train_dense(model: torch.nn.Module, train: Any, epochs: int, lr: float, seed: int) -> None:
    from slimship.compress.base import train_loop

    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    train_loop(model, train, epochs=epochs, optimizer=optimizer, seed=seed, desc="dense training")


def _export_all(
    model, examples, formats, workdir: Path, stem: str, calib, evals, dynamic: bool
) -> dict[str, Any]:
    """Each format through its registry record (`FormatRecord.export`, parity checked by the exporter)."""
    from slimship.exporters.registry import ExportRequest, export_formats

    example, trace_example = examples
    request = ExportRequest(model, example, trace_example, calib, evals, dynamic)
    return export_formats(formats, request, workdir, stem)


@dataclass
class Trained:
    """What every rank holds after training and compression (on CPU again), for rank 0 to publish."""

    compressed: torch.nn.Module
    result: Any  # the CompressResult, or None without compression
    compress_info: dict[str, Any]
    compress_plots: dict[str, Any]
    dense_acc: float | None
    train: Any  # the data factory's train data, unsharded (calibration, factorisation)
    test: Any
    example: tuple[torch.Tensor, ...]
    trace_example: tuple[torch.Tensor, ...]
    ranks: dict[str, Any] = field(default_factory=dict)  # processes, and whether they ended alike


class OtherRankFailed(SlimshipError):
    """A torchrun rank other than 0 learns that rank 0 failed (its own error is printed by rank 0)."""


def run_pipeline(config: PipelineConfig, console: Console | None = None) -> PipelineResult:
    """Run every configured stage (`config` from `validate` / `load_config`); gates decide before the
    release is written. Returns the release location and the summary figures.

    Training and compression run on `train.device`. Under torchrun (WORLD_SIZE, RANK, LOCAL_RANK set) a
    process group is opened (nccl for cuda, gloo otherwise) and closed at the end, errors included: every
    rank trains its shard of the train data under DistributedDataParallel and takes the same compression
    decisions; rank 0 alone slims, exports, benchmarks, gates and writes the bundle while the others wait,
    then they return a result without a bundle (or raise OtherRankFailed when rank 0 failed)."""
    from slimship.pipeline.release import check_new_version

    rcfg = config.release
    check_new_version(Path(rcfg.out), rcfg.name, rcfg.version)  # fail before any work
    device = resolve_device(config.device)
    with process_group(device), _rank0_voice():
        console = (console or Console()) if rank() == 0 else Console(quiet=True)
        stages = _Stages(console)
        trained = _train_stages(config, stages, device)
        if world_size() == 1:
            return _publish(config, console, stages, trained)
        return _publish_on_rank0(config, console, stages, trained)


@contextlib.contextmanager
def _rank0_voice() -> Iterator[None]:
    """On ranks other than 0, slimship's log says errors only (rank 0 speaks for the job)."""
    logger = logging.getLogger("slimship")
    level = logger.level
    if rank() != 0:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _publish_on_rank0(config: PipelineConfig, console: Console, stages: _Stages, trained: Trained):
    """Rank 0 publishes and then tells the others whether it succeeded; they wait for that word."""
    if rank() != 0:
        if not broadcast_object_from_rank0(None):
            raise OtherRankFailed(f"rank 0 failed after training (see its error); rank {rank()} stops too")
        return PipelineResult(None, {}, stages.timings)
    done = False
    try:
        result = _publish(config, console, stages, trained)
        done = True
        return result
    finally:
        broadcast_object_from_rank0(done)


def _build_model(config: PipelineConfig) -> torch.nn.Module:
    model_cfg = config.model
    model = config.build("model")
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"'model.factory' returned {type(model).__name__}, not an nn.Module")
    if model_cfg.checkpoint is not None:
        from slimship.compress.imports import load_state_checkpoint

        built = model
        model = load_state_checkpoint(
            model_cfg.checkpoint, lambda: built, allow_pickle=model_cfg.allow_pickle
        )
    return model


def _train_stages(config: PipelineConfig, stages: _Stages, device: torch.device) -> Trained:
    """Dense training and compression on `device`, on every rank (each on its shard of the train data);
    the compressed model comes back to CPU once, for slimming and export."""
    from slimship.data import check_train, shard_train

    seed = config.seed
    set_seed(seed)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    model = _build_model(config)
    train = test = None
    if config.data is not None:
        train, test = _train_and_test(config.build("data"), config.data.factory)
        check_train(train, "data.factory")  # single-pass or unsized data: refused before any training
    shard = shard_train(train, rank(), world_size(), "data.factory", seed)  # refused alike on every rank
    generator = torch.Generator().manual_seed(seed)
    example = (torch.randn(1, *config.model.input_shape, generator=generator),)  # what a device runs
    # tracing with batch 2 keeps the batch dim dynamic (a batch of 1 is specialised by torch.export)
    trace_example = (torch.randn(2, *config.model.input_shape, generator=generator),)

    model.to(device)
    tcfg = config.train
    if tcfg is not None and train is not None and tcfg.epochs > 0:
        stages.run("train dense model", _train_dense, model, shard, tcfg.epochs, tcfg.lr, seed)
    model.eval()
    dense_acc = _accuracy(model, test)

    compressed, result, compress_info, compress_plots = model, None, {}, {}
    if config.compress is not None:
        from slimship.compress import compress

        ccfg = config.compress
        result = stages.run(
            f"compress ({ccfg.method})", compress, ccfg.method, model, to_device(trace_example, device),
            shard, test, **ccfg.options.model_dump(exclude_unset=True),
        )  # fmt: skip
        check_completed(ccfg.method, ccfg.options, result)  # an unfinished model is never released
        compressed, compress_info = result.model.eval(), {"method": result.method, **_plain(result.info)}
        compress_plots = _history_plots(result.method, result.history)
        compress_plots |= _search_plots(result.method, result.info)
    compressed.to("cpu")  # slimming, export and benchmarks run on CPU
    return Trained(
        compressed, result, compress_info, compress_plots, dense_acc, train, test, example, trace_example,
        _compare_ranks(compressed),
    )  # fmt: skip


def check_completed(method: str, options: Any, result: Any) -> None:
    """Raise StoppedEarly when `result` ended before its last epoch (the `stop_after` option): the method's
    ``info["completed"]``, else its last epoch record against its `epochs` option."""
    stop, epochs = getattr(options, "stop_after", None), getattr(options, "epochs", None)
    done = int(result.history[-1].get("epoch", 0)) if result.history else 0
    completed = result.info.get("completed")
    if completed is None:
        completed = stop is None or epochs is None or done >= epochs
    if completed:
        return
    checkpoint = getattr(options, "checkpoint", None)
    resume = (
        "raise or remove compress.options.stop_after and run the same command again to resume from "
        f"{checkpoint}"
        if checkpoint is not None
        else "set compress.options.checkpoint to resume a stopped run; without it the run starts afresh"
    )
    raise StoppedEarly(
        f"compress ({method}) stopped after epoch {done} of {epochs} (stop_after={stop}); nothing released; "
        + resume
    )


def _train_and_test(data: Any, factory: str) -> tuple[Any, Any]:
    """The data factory's (train, test) pair; anything else is a ConfigError naming it."""
    if not isinstance(data, tuple | list) or len(data) != 2:
        raise ConfigError(
            f"'data.factory' {factory} returned {type(data).__name__}; return a pair (train, test) "
            "(either may be None)"
        )
    return data[0], data[1]


def _compare_ranks(model: torch.nn.Module) -> dict[str, Any]:
    """{processes, same_model_on_every_rank}: every rank's compressed weights and buffers by digest, so a
    torchrun job whose ranks decided differently says so (rank 0's model is the one published)."""
    digests = gather_object(_state_digest(model))
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        log.warning("ranks %s ended training with another model than rank 0; rank 0's is published", differ)
    return {"processes": len(digests), "same_model_on_every_rank": not differ}


def _state_digest(model: torch.nn.Module) -> str:
    return sha256_bytes(
        b"".join(
            t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            for t in model.state_dict().values()
        )
    )


def _publish(config: PipelineConfig, console: Console, stages: _Stages, trained: Trained) -> PipelineResult:
    """Slim, export, bench, gate and release the compressed model (rank 0 only under torchrun)."""
    from slimship.slimming import slim

    compressed, result, compress_info = trained.compressed, trained.result, trained.compress_info
    compress_plots, dense_acc, train, test = (
        trained.compress_plots,
        trained.dense_acc,
        trained.train,
        trained.test,
    )
    example, trace_example, seed = trained.example, trained.trace_example, config.seed
    slim_source, factorized = compressed, None
    if compress_info.get("slim_step") == "factorize":  # low-rank methods: thin layers replace wide ones
        from slimship.compress.lorita import factorize

        factorized = stages.run(
            "factorize (SVD truncation, verify per layer)", factorize, compressed, trace_example,
            train=train, seed=seed, **result.info["factorize"],
        )  # fmt: skip
        slim_source = factorized.model
    scfg = config.slim
    multiple, alignment = scfg.channel_multiple, None
    if multiple == "auto":
        multiple, alignment = stages.run(
            "measure channel alignment on the first target",
            _measure_alignment,
            config,
            slim_source,
            trace_example,
            example,
        )
    slim_result = stages.run(
        "slim (trace, analyse, rewrite, verify)", slim, slim_source, trace_example,
        merge=scfg.merge, fold_constants=scfg.fold_constants, rtol=scfg.rtol, channel_multiple=multiple,
    )  # fmt: skip
    if factorized is not None:
        slim_result = _from_factorized(slim_result, factorized, compressed)
        compress_info["factorized_layers"] = [
            {"name": f.name, "rank": f.rank, "full_rank": f.full_rank, "rel_output_error": f.rel_output_error}
            for f in factorized.layers
            if f.replaced
        ]
    slim_model = slim_result.model
    slim_acc = _accuracy(slim_model, test)

    formats = config.export.formats
    evals = None
    eval_pairs: list[tuple[np.ndarray, np.ndarray]] = []
    if test is not None:
        xs, ys = [], []
        for x, y in test:
            xs.append(x)
            ys.append(y)
        x_all, y_all = torch.cat(xs)[:EVAL_SAMPLES], torch.cat(ys)[:EVAL_SAMPLES]
        evals = [(x_all[i : i + 1],) for i in range(len(x_all))]
        eval_pairs = [(x_all[i : i + 1].numpy(), y_all[i : i + 1].numpy()) for i in range(len(x_all))]
    calib, calibration = calibration_data(train, test, config.data.factory if config.data else None)
    if not any(get_format(fmt).precision == "int8" for fmt in formats):
        calibration = None  # no calibrated variant: nothing to record

    with tempfile.TemporaryDirectory(prefix="slimship-") as tmp:
        workdir = Path(tmp)
        dynamic = config.export.dynamic_batch
        examples = (example, trace_example)
        export_args = (formats, workdir)
        dense_exports = stages.run(
            "export dense", _export_all, compressed, examples, *export_args, "dense", calib, evals, dynamic
        )
        slim_exports = stages.run(
            "export slim", _export_all, slim_model, examples, *export_args, "slim", calib, evals, dynamic
        )
        latency, accuracy, rows, profiles = stages.run(
            "bench on targets", _bench, config, example, dense_exports, slim_exports, slim_model, eval_pairs,
            (slim_result.flops_before, slim_result.flops_after),
        )  # fmt: skip
        accuracy["dense-torch"] = {"top1": dense_acc}
        accuracy["slim-torch"] = {"top1": slim_acc}
        summary = {
            "params": [slim_result.params_before, slim_result.params_after],
            "flops": [slim_result.flops_before, slim_result.flops_after],
            "flops_ratio": round(slim_result.flops_ratio, 3),
            "accuracy": {"dense": dense_acc, "slim": slim_acc},
            "files": {fmt: [dense_exports[fmt].bytes, slim_exports[fmt].bytes] for fmt in formats},
            "latency": rows,
            "compress": compress_info,
            "channel_multiple": multiple,
            "alignment": alignment,
            "profiles": profiles,
            "ranks": trained.ranks,
        }
        compress_plots |= _profile_plots(profiles, slim_result.report.spaces)
        gates = _gate_results(config, dense_acc, slim_acc, latency, accuracy)
        summary["gates"] = [g.to_dict() for g in gates]
        if any(g.status == "failed" for g in gates):
            console.print(summary_table(summary))
            enforce(gates)  # raises GateError: nothing is published
        summary["calibration"] = calibration
        release_dir = stages.run(
            "write release bundle", _release, config, slim_model, example, slim_result, slim_exports,
            accuracy, latency, compressed, compress_plots,
            {"channel_multiple": multiple, "alignment": alignment}, summary["gates"], calibration,
        )  # fmt: skip
    console.print(summary_table(summary))
    if release_dir is not None:
        console.print(f"release bundle: [bold]{release_dir}[/bold]")
    return PipelineResult(release_dir, summary, stages.timings)


CALIBRATION_SAMPLES = 64


def calibration_data(
    train: Any, test: Any, factory: str | None, limit: int = CALIBRATION_SAMPLES
) -> tuple[list[tuple[torch.Tensor, ...]] | None, dict[str, Any]]:
    """Calibration batches for int8 (one sample each) and their record {samples, source} for the manifest.

    The first `limit` samples of the data factory's train split (its test split when there is no train
    split); without data, the exporters calibrate on the one random example input, and the record says so.
    """
    for split, batches in (("train", train), ("test", test)):
        if batches is None:
            continue
        samples: list[tuple[torch.Tensor, ...]] = []
        for batch in batches:
            x = batch[0] if isinstance(batch, tuple | list) else batch
            samples += [(x[i : i + 1],) for i in range(min(len(x), limit - len(samples)))]
            if len(samples) >= limit:
                break
        if samples:
            source = f"data.factory {factory}: first {len(samples)} samples of the {split} split"
            return samples, {"samples": len(samples), "source": source}
    return None, {"samples": 1, "source": "the random example input (no data factory given)"}


_GATE_STYLE = {"passed": "green", "failed": "bold red", "not evaluated": "yellow", "off": "dim"}


def _gate_row(table: Table, gate: GateResult) -> None:
    label = f"gate {gate.gate}" + (f" {gate.subject}" if gate.subject else "")
    figure = "" if gate.figure is None else f"{gate.figure:.4g} (limit {gate.limit:.4g})"
    style = _GATE_STYLE.get(gate.status, "")
    table.add_row(label, "", figure, f"[{style}]{gate.status}[/{style}]")


def _measure_alignment(config, model, trace_example, example) -> tuple[int | None, dict[str, Any]]:
    """`slim.channel_multiple: auto`: the multiple the first target's kernels favour for the op kinds the
    model contains, confirmed on the whole model there (see `choose_channel_multiple`), on
    `slim.align_runtime` (default: the target's own runtime, else that of the first export format)."""
    from slimship.pipeline.alignment import choose_channel_multiple

    target = config.target_profiles()[0]  # not emulated: checked with the config
    from slimship.exporters.registry import get_format

    first = get_format(config.export.formats[0])
    scfg = config.slim
    runtime = scfg.align_runtime or (target.runtime if target.runtime != "auto" else first.runtimes[0])
    return choose_channel_multiple(
        model, trace_example, example, target.with_overrides(runtime=runtime), runs=config.bench.runs,
        merge=scfg.merge, fold_constants=scfg.fold_constants, rtol=scfg.rtol,
    )  # fmt: skip


def _from_factorized(slim_result: Any, factorized: Any, source: torch.nn.Module) -> Any:
    """The slim result, with its "before" figures taken from the model the factorisation started from."""
    from slimship.slimming.api import count_bytes

    return replace(
        slim_result,
        params_before=factorized.params_before,
        flops_before=factorized.flops_before,
        bytes_before=count_bytes(source),
    )


def _plain(info: dict[str, Any]) -> dict[str, Any]:
    """Keep JSON-friendly scalars and short lists of a compression method's info."""
    out = {}
    for key, value in info.items():
        scalar = isinstance(value, int | float | str | bool) or value is None
        if scalar or (isinstance(value, list | dict) and len(str(value)) < 4000):
            out[key] = value
    return out


def _bench(config, example, dense_exports, slim_exports, slim_model, eval_pairs, flops):
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


def _profile_plots(profiles: list[dict[str, Any]], spaces: Any) -> dict[str, Any]:
    """One report chart per profiled pair with per-layer rows (LiteRT has none: its note is in the JSON)."""
    from slimship.pipeline.report_profile import profile_plot, spaces_by_layer

    channels = spaces_by_layer(spaces)
    return {f"per-layer profile {p['target']}/{p['format']}": profile_plot(p, channels)
            for p in profiles if p["rows"]}  # fmt: skip


def _percent(fraction: float | None) -> float | None:
    """Runtimes report accuracy as a fraction; the pipeline speaks in percent like evaluate_accuracy."""
    return None if fraction is None else round(100.0 * fraction, 3)


_NOT_PLOTTED = ("epoch", "steps")  # counters, not quantities a person reads off a training plot


def _history_plots(method: str, history: list[dict[str, Any]]) -> dict[str, Any]:
    """One report plot per numeric series a compression method recorded per epoch."""
    keys = sorted(
        {k for rec in history for k, v in rec.items() if isinstance(v, int | float) and k not in _NOT_PLOTTED}
    )
    series = {}
    for key in keys:
        points = [
            (i, float(rec[key])) for i, rec in enumerate(history, 1) if isinstance(rec.get(key), int | float)
        ]
        if len(points) > 1:
            series[key] = {"x": [p[0] for p in points], "y": [p[1] for p in points]}
    if not series:
        return {}
    return {f"{method} training": {"series": series, "xlabel": "epoch", "ylabel": "value"}}


def _search_plots(method: str, info: dict[str, Any]) -> dict[str, Any]:
    """Plots of a policy search (ADC): its reward per episode and the kept fraction it chose per space."""
    plots: dict[str, Any] = {}
    curve = info.get("reward_curve") or []
    if len(curve) > 1:
        plots[f"{method} search reward"] = {
            "series": {"reward": {"x": list(range(1, len(curve) + 1)), "y": [float(r) for r in curve]}},
            "xlabel": "episode",
            "ylabel": "reward",
        }
    policy = info.get("policy") or {}
    if policy:
        plots[f"{method} policy"] = {
            "kind": "barh",
            "labels": list(policy),
            "values": [float(f) for f in policy.values()],
            "xlabel": "kept fraction of the space's channels",
        }
    return plots


def _gate_results(config: PipelineConfig, dense_acc, slim_acc, latency, accuracy) -> list[GateResult]:
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


def _release(
    config, slim_model, example, slim_result, slim_exports, accuracy, latency, source, plots, aligned, gates,
    calibration=None,
):  # fmt: skip
    from slimship.pipeline.explain import target_record
    from slimship.pipeline.release import ReleaseInputs, write_release

    rcfg = config.release
    source_bytes = b"".join(
        t.detach().contiguous().numpy().tobytes()
        for t in source.state_dict().values()
        if t.is_floating_point()
    )
    parity = {}
    files = {}
    for fmt, export in slim_exports.items():
        files[fmt] = export.path
        parity[fmt] = export.parity.record()  # on the reference inputs the bundle stores (verify re-runs)
    slimming = (
        slim_result.summary()
        | aligned
        | {
            "per_layer": {
                s.name: {"channels_before": s.channels_before, "channels_kept": s.channels_after}
                for s in slim_result.report.spaces
                if s.channels_before > 1
            },
            "layers": [
                {"name": layer.name, "before": layer.shape_before, "after": layer.shape_after}
                for layer in slim_result.report.layers
            ],
        }
    )
    inputs = ReleaseInputs(
        name=rcfg.name,
        version=rcfg.version,
        slim_module=slim_model,
        example_inputs=example,
        model_files=files,
        reference={"source_sha256": sha256_bytes(source_bytes)},
        slimming=slimming,
        parity=parity,
        accuracy=accuracy,
        latency=latency,
        config=config.to_dict(),
        extra_plots=plots,
        model_card_notes=rcfg.notes,
        gates=gates,
        calibration=calibration,
        targets={t.name: target_record(t) for t in config.target_profiles()},
    )
    return write_release(inputs, Path(rcfg.out)).bundle_dir


def summary_table(summary: dict[str, Any]) -> Table:
    """The short table printed at the end of a run: accuracy, then each gate, then sizes and timings."""
    table = Table(title="slimship summary", show_lines=False)
    table.add_column("metric")
    table.add_column("dense", justify="right")
    table.add_column("slim", justify="right")
    table.add_column("ratio", justify="right")
    acc = summary["accuracy"]
    if acc["dense"] is not None:
        table.add_row("test top-1 (torch)", f"{acc['dense']:.2f}%", f"{acc['slim']:.2f}%", "")
    else:
        table.add_row("test top-1 (torch)", "no data", "no data", "")
    for gate in summary.get("gates", []):
        _gate_row(table, GateResult(**gate))
    p0, p1 = summary["params"]
    f0, f1 = summary["flops"]
    table.add_row("params", f"{p0:,}", f"{p1:,}", f"{p0 / max(p1, 1):.2f}x")
    table.add_row("FLOPs", f"{f0:,}", f"{f1:,}", f"{f0 / f1:.2f}x" if f0 > 0 and f1 > 0 else "n/a")
    for fmt, (b0, b1) in summary["files"].items():
        table.add_row(f"{fmt} bytes", f"{b0:,}", f"{b1:,}", f"{b0 / max(b1, 1):.2f}x")
    for row in summary["latency"]:
        if row["emulated"]:
            table.add_row(
                f"{row['target']}/{row['format']} (emulated ARM64: parity only)", "",
                f"top-1 {row['accuracy']:.2f}%", f"max|diff| {row['max_abs_diff']:.1e}",
            )  # fmt: skip
            continue
        label = f"p50 {row['target']}/{row['format']}"
        table.add_row(
            label,
            f"{row['dense_p50_ms']:.3f} ms",
            f"{row['p50_ms']:.3f} ms",
            f"speedup {speedup_text(row['speedup'], row['speedup_p10'], row['speedup_p90'])}",
        )
        if row.get("accuracy") is not None:
            table.add_row(f"top-1 {row['target']}/{row['format']}", "", f"{row['accuracy']:.2f}%", "")
    return table
