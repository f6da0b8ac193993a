"""The pipeline: compose the stages (train, compress, slim, export, bench, release) from a config."""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from slimship._util import set_seed
from slimship.compress.device import (
    broadcast_object_from_rank0,
    gather_object,
    process_group,
    rank,
    resolve_device,
    to_device,
    training_strategy,
    world_size,
)
from slimship.errors import SlimshipError
from slimship.exporters.registry import get_format
from slimship.pipeline.bench import bench_targets, gate_results, profile_plots
from slimship.pipeline.config import PipelineConfig
from slimship.pipeline.gates import enforce
from slimship.pipeline.publish import calibration_data, export_all, write_run_release
from slimship.pipeline.summary import summary_table
from slimship.pipeline.training import (
    Trained,
    build_model,
    check_completed,
    history_plots,
    plain_info,
    search_plots,
    state_digest,
    top1_accuracy,
    train_and_test,
    train_dense,
)

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
        with training_strategy(config.train.strategy if config.train else "ddp"):
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


def _train_stages(config: PipelineConfig, stages: _Stages, device: torch.device) -> Trained:
    """Dense training and compression on `device`, on every rank (each on its shard of the train data);
    the compressed model comes back to CPU once, for slimming and export."""
    from slimship.data import check_train, shard_train

    seed = config.seed
    set_seed(seed)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    model = build_model(config)
    train = test = None
    if config.data is not None:
        train, test = train_and_test(config.build("data"), config.data.factory)
        check_train(train, "data.factory")  # single-pass or unsized data: refused before any training
    shard = shard_train(train, rank(), world_size(), "data.factory", seed)  # refused alike on every rank
    generator = torch.Generator().manual_seed(seed)
    example = (torch.randn(1, *config.model.input_shape, generator=generator),)  # what a device runs
    # tracing with batch 2 keeps the batch dim dynamic (a batch of 1 is specialised by torch.export)
    trace_example = (torch.randn(2, *config.model.input_shape, generator=generator),)

    model.to(device)
    tcfg = config.train
    if tcfg is not None and train is not None and tcfg.epochs > 0:
        stages.run("train dense model", train_dense, model, shard, tcfg.epochs, tcfg.lr, seed)
    model.eval()
    dense_acc = top1_accuracy(model, test)

    compressed, result, compress_info, compress_plots = model, None, {}, {}
    if config.compress is not None:
        from slimship.compress import compress

        ccfg = config.compress
        result = stages.run(
            f"compress ({ccfg.method})", compress, ccfg.method, model, to_device(trace_example, device),
            shard, test, **ccfg.options.model_dump(exclude_unset=True),
        )  # fmt: skip
        check_completed(ccfg.method, ccfg.options, result)  # an unfinished model is never released
        compressed, compress_info = result.model.eval(), {"method": result.method, **plain_info(result.info)}
        compress_plots = history_plots(result.method, result.history)
        compress_plots |= search_plots(result.method, result.info)
    compressed.to("cpu")  # slimming, export and benchmarks run on CPU
    return Trained(
        compressed, result, compress_info, compress_plots, dense_acc, train, test, example, trace_example,
        _compare_ranks(compressed),
    )  # fmt: skip


def _compare_ranks(model: torch.nn.Module) -> dict[str, Any]:
    """{processes, same_model_on_every_rank}: every rank's compressed weights and buffers by digest, so a
    torchrun job whose ranks decided differently says so (rank 0's model is the one published)."""
    digests = gather_object(state_digest(model))
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        log.warning("ranks %s ended training with another model than rank 0; rank 0's is published", differ)
    return {"processes": len(digests), "same_model_on_every_rank": not differ}


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
    slim_acc = top1_accuracy(slim_model, test)

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
            "export dense", export_all, compressed, examples, *export_args, "dense", calib, evals, dynamic
        )
        slim_exports = stages.run(
            "export slim", export_all, slim_model, examples, *export_args, "slim", calib, evals, dynamic
        )
        latency, accuracy, rows, profiles = stages.run(
            "bench on targets", bench_targets, config, example, dense_exports, slim_exports, slim_model,
            eval_pairs, (slim_result.flops_before, slim_result.flops_after),
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
        compress_plots |= profile_plots(profiles, slim_result.report.spaces)
        gates = gate_results(config, dense_acc, slim_acc, latency, accuracy)
        summary["gates"] = [g.to_dict() for g in gates]
        if any(g.status == "failed" for g in gates):
            console.print(summary_table(summary))
            enforce(gates)  # raises GateError: nothing is published
        summary["calibration"] = calibration
        release_dir = stages.run(
            "write release bundle", write_run_release, config, slim_model, example, slim_result, slim_exports,
            accuracy, latency, compressed, compress_plots,
            {"channel_multiple": multiple, "alignment": alignment}, summary["gates"], calibration,
        )  # fmt: skip
    console.print(summary_table(summary))
    if release_dir is not None:
        console.print(f"release bundle: [bold]{release_dir}[/bold]")
    return PipelineResult(release_dir, summary, stages.timings)


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
