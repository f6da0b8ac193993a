"""The pipeline: compose the stages (train, compress, slim, export, bench, release) from a config."""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from rich.console import Console

from slimship._util import set_seed
from slimship.compress.device import (
    broadcast_object_from_rank0,
    gather_object,
    process_group,
    rank,
    rank_processes,
    resolve_device,
    to_device,
    training_strategy,
    wait_for_exit,
    world_size,
)
from slimship.errors import SlimshipError
from slimship.exporters.registry import ExportRequest, get_format
from slimship.pipeline.alignment import choose_channel_multiple, counts_record, latency_counts
from slimship.pipeline.bench import BenchPlan, EvalPair, bench_targets, logits_index, profile_plots
from slimship.pipeline.calibration import calibration, from_data
from slimship.pipeline.config import PipelineConfig
from slimship.pipeline.explain import target_record
from slimship.pipeline.export_index import ExportIndex, Provenance, program_sha256
from slimship.pipeline.gates import FAILED, GateFigures, GateResult, enforce, evaluate_gates
from slimship.pipeline.publish import ReleaseRequest, Reuse, export_stage, publish, weights_sha256
from slimship.pipeline.records import BenchFigures, ExportResult
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
from slimship.sources import output_names

log = logging.getLogger(__name__)
T = TypeVar("T")

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

    def run(self, name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        start = time.perf_counter()
        with self.console.status(f"[bold]{name}[/bold] ..."):
            result = fn(*args, **kwargs)
        self.timings[name] = round(time.perf_counter() - start, 2)
        self.console.print(f"[green]✓[/green] {name} ({self.timings[name]:.1f} s)")
        return result


class OtherRankFailed(SlimshipError):
    """A torchrun rank other than 0 learns that rank 0 failed (rank 0 prints its own error, naming itself;
    the CLI stops this rank cleanly, so torchrun's summary names rank 0 as the one that failed)."""


def run_pipeline(
    config: PipelineConfig, console: Console | None = None, exports: Path | None = None
) -> PipelineResult:
    """Run every configured stage (`config` from `validate` / `load_config`); gates decide before the
    release is written. Returns the release location and the summary figures.

    Training and compression run on `train.device`. Under torchrun (WORLD_SIZE, RANK, LOCAL_RANK set) a
    process group is opened (nccl for cuda, gloo otherwise) and closed at the end, errors included: every
    rank trains its shard of the train data under DistributedDataParallel and takes the same compression
    decisions; rank 0 alone slims, exports, benchmarks, gates and writes the bundle while the others wait,
    then they return a result without a bundle (or raise OtherRankFailed when rank 0 failed).

    `exports`: a cache folder of checked exports (see slimship.pipeline.export_index): a format exported
    and checked there before for the same model, options and data is reused, the new ones are added."""
    from slimship.pipeline.release import check_new_version

    rcfg = config.release
    check_new_version(Path(rcfg.out), rcfg.name, rcfg.version)  # fail before any work
    cache = ExportIndex.load(Path(exports), cache=True) if exports is not None else None
    device = resolve_device(config.device)
    with process_group(device), _rank0_voice():
        console = (console or Console()) if rank() == 0 else Console(quiet=True)
        stages = _Stages(console)
        with training_strategy(config.train.strategy if config.train else "ddp"):
            trained = _train_stages(config, stages, device)
        if world_size() == 1:
            return _publish(config, console, stages, trained, cache)
        return _publish_on_rank0(config, console, stages, trained, cache)


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


def _publish_on_rank0(
    config: PipelineConfig, console: Console, stages: _Stages, trained: Trained, cache: ExportIndex | None
) -> PipelineResult:
    """Rank 0 publishes and then tells the others whether it succeeded; they wait for that word. When it
    failed, rank 0 exits after the others have stopped, so torchrun names rank 0 alone."""
    processes = rank_processes()
    if rank() != 0:
        if not broadcast_object_from_rank0(None):
            raise OtherRankFailed(
                f"rank {rank()}: rank 0 failed after training (its error is the one that says 'rank 0'); "
                f"rank {rank()} stops with it, nothing published"
            )
        return PipelineResult(None, {}, stages.timings)
    done = False
    try:
        result = _publish(config, console, stages, trained, cache)
        done = True
        return result
    finally:
        broadcast_object_from_rank0(done)
        if not done:
            wait_for_exit(processes)


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
    dense_acc = top1_accuracy(model, test, config.data.output if config.data else None)

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


@dataclass(frozen=True)
class Slimmed:
    """The slim stage: its SlimResult (the "before" figures of the compressed model), the channel multiple it
    aligned to (and the measurement that chose it), and the layers a low-rank method factorised."""

    result: Any  # slimming.SlimResult
    multiple: int | None
    alignment: dict[str, Any] | None
    factorized_layers: list[dict[str, Any]] | None = None

    def release_summary(self) -> dict[str, Any]:
        """The manifest's `slimming`: the summary, the alignment, channels per space and layer shapes."""
        report = self.result.report
        return self.result.summary() | {
            "channel_multiple": self.multiple,
            "alignment": self.alignment,
            "per_layer": {
                s.name: {"channels_before": s.channels_before, "channels_kept": s.channels_after}
                for s in report.spaces
                if s.channels_before > 1
            },
            "layers": [
                {"name": la.name, "before": la.shape_before, "after": la.shape_after} for la in report.layers
            ],
        }


def _slim_stage(config: PipelineConfig, stages: _Stages, trained: Trained) -> Slimmed:
    """Factorise (low-rank methods), choose the channel multiple (`auto`) and slim the compressed model."""
    from slimship.slimming import slim

    compressed, result = trained.compressed, trained.result
    slim_source, factorized = compressed, None
    if (
        trained.compress_info.get("slim_step") == "factorize"
    ):  # low-rank methods: thin layers replace wide ones
        from slimship.compress.lorita import factorize

        factorized = stages.run(
            "factorize (SVD truncation, verify per layer)", factorize, compressed, trained.trace_example,
            train=trained.train, seed=config.seed, **result.info["factorize"],
        )  # fmt: skip
        slim_source = factorized.model
    scfg = config.slim
    multiple, alignment, counts = scfg.channel_multiple, None, None
    if multiple == "latency":  # per space: the kept count measured fastest on the first target
        multiple, counts = None, latency_counts(_alignment_target(config), runs=config.bench.runs)
    if multiple == "auto":
        multiple, alignment = stages.run(
            "measure channel alignment on the first target", _measure_alignment, config, slim_source,
            trained.trace_example, trained.example,
        )  # fmt: skip
    slim_result = stages.run(
        "slim (trace, analyse, rewrite, verify)", slim, slim_source, trained.trace_example,
        merge=scfg.merge, fold_constants=scfg.fold_constants, rtol=scfg.rtol, channel_multiple=multiple,
        channel_counts=counts,
    )  # fmt: skip
    if counts is not None:
        alignment = counts_record(counts)
    if factorized is None:
        return Slimmed(slim_result, multiple, alignment)
    layers = [
        {"name": f.name, "rank": f.rank, "full_rank": f.full_rank, "rel_output_error": f.rel_output_error}
        for f in factorized.layers
        if f.replaced
    ]
    return Slimmed(_from_factorized(slim_result, factorized, compressed), multiple, alignment, layers)


def _eval_samples(test: Any) -> tuple[list[tuple[torch.Tensor, ...]] | None, list[EvalPair]]:
    """The first EVAL_SAMPLES test samples one by one: as export check inputs, and as (input, label) pairs."""
    if test is None:
        return None, []
    xs, ys = [], []
    for x, y in test:
        xs.append(x)
        ys.append(y)
    x_all, y_all = torch.cat(xs)[:EVAL_SAMPLES], torch.cat(ys)[:EVAL_SAMPLES]
    evals = [(x_all[i : i + 1],) for i in range(len(x_all))]
    return evals, [(x_all[i : i + 1].numpy(), y_all[i : i + 1].numpy()) for i in range(len(x_all))]


def _summary(trained: Trained, slimmed: Slimmed, dense: ExportResult, slim: ExportResult, bench: BenchFigures,
             gates: list[GateResult]) -> dict[str, Any]:  # fmt: skip
    """The run's JSON summary (and what its table shows)."""
    result = slimmed.result
    compress = trained.compress_info
    if slimmed.factorized_layers is not None:
        compress = compress | {"factorized_layers": slimmed.factorized_layers}
    record = slim.calibration.record
    return {
        "params": [result.params_before, result.params_after],
        "flops": [result.flops_before, result.flops_after],
        "flops_ratio": round(result.flops_ratio, 3),
        "accuracy": {"dense": bench.dense_top1, "slim": bench.slim_top1},
        "files": {fmt: [dense.bytes()[fmt], size] for fmt, size in slim.bytes().items()},
        "latency": bench.rows(),
        "compress": compress,
        "channel_multiple": slimmed.multiple,
        "alignment": slimmed.alignment,
        "profiles": bench.profiles(),
        "ranks": trained.ranks,
        "gates": [g.to_dict() for g in gates],
        "calibration": record.to_dict() if record is not None else None,
    }


def _publish(
    config: PipelineConfig,
    console: Console,
    stages: _Stages,
    trained: Trained,
    cache: ExportIndex | None = None,
) -> PipelineResult:
    """Slim, export, bench, gate and release the compressed model (rank 0 only under torchrun)."""
    slimmed = _slim_stage(config, stages, trained)
    slim_model = slimmed.result.model
    choice = config.data.output if config.data else None
    slim_acc = top1_accuracy(slim_model, trained.test, choice)
    evals, eval_pairs = _eval_samples(trained.test)
    formats, example = config.export.formats, trained.example
    data = from_data(trained.train, trained.test, config.data.factory if config.data else None)
    calib = calibration(formats, example, data, "no data factory given", "give a data factory")

    with tempfile.TemporaryDirectory(prefix="slimship-") as tmp:

        def export(model: torch.nn.Module, stem: str) -> ExportResult:
            request = ExportRequest(model, example, trained.trace_example, calib.batches, evals,
                                    config.export.dynamic_batch, output_names(model, example))  # fmt: skip
            digest = program_sha256(model, trained.trace_example) if cache is not None else None
            reuse = Reuse(cache, Provenance(digest), record=True) if cache is not None and digest else None
            exported = export_stage(request, formats, Path(tmp), stem, calib, reuse=reuse)
            exported.require_all()  # a run releases every format it names, or stops naming the failures
            return exported

        dense = stages.run("export dense", export, trained.compressed, "dense")
        slim = stages.run("export slim", export, slim_model, "slim")
        bcfg, result = config.bench, slimmed.result
        logits = logits_index(slim_model, example, choice) if eval_pairs else 0  # no labels: no top-1
        plan = BenchPlan(config.target_profiles(), bcfg.runs, bcfg.warmup, bcfg.profile, example, eval_pairs,
                         (result.flops_before, result.flops_after), logits)  # fmt: skip
        top1 = (trained.dense_acc, slim_acc)
        bench = stages.run("bench on targets", bench_targets, plan, dense, slim, slim_model, top1)
        gates = bench.agreement_said(evaluate_gates(config.gates, GateFigures.of(bench)))
        summary = _summary(trained, slimmed, dense, slim, bench, gates)
        if any(g.status == FAILED for g in gates):
            console.print(summary_table(summary, gates))
            enforce(gates)  # raises GateError: nothing is published
        rcfg = config.release
        request = ReleaseRequest(
            rcfg.name, rcfg.version, Path(rcfg.out), slim_model, example, weights_sha256(trained.compressed),
            slim, gates, config.to_dict(), bench, slimmed.release_summary(),
            trained.compress_plots | profile_plots(bench, result.report.spaces), rcfg.notes,
            {t.name: target_record(t) for t in config.target_profiles()},
        )  # fmt: skip
        release_dir = stages.run("write release bundle", publish, request).bundle_dir
    console.print(summary_table(summary, gates))
    console.print(f"release bundle: [bold]{release_dir}[/bold]")
    return PipelineResult(release_dir, summary, stages.timings)


def _measure_alignment(
    config: PipelineConfig,
    model: torch.nn.Module,
    trace_example: tuple[torch.Tensor, ...],
    example: tuple[torch.Tensor, ...],
) -> tuple[int | None, dict[str, Any]]:
    """`slim.channel_multiple: auto`: the multiple the first target's kernels favour for the op kinds the
    model contains, confirmed on the whole model there (see `choose_channel_multiple`), on
    `slim.align_runtime` (default: the target's own runtime, else that of the first export format)."""
    scfg = config.slim
    return choose_channel_multiple(
        model, trace_example, example, _alignment_target(config), runs=config.bench.runs,
        merge=scfg.merge, fold_constants=scfg.fold_constants, rtol=scfg.rtol,
    )  # fmt: skip


def _alignment_target(config: PipelineConfig) -> Any:
    """The first target (not emulated: checked with the config) on `slim.align_runtime` (default: the
    target's own runtime, else that of the first export format)."""
    target = config.target_profiles()[0]
    first = get_format(config.export.formats[0])
    runtime = config.slim.align_runtime or (target.runtime if target.runtime != "auto" else first.runtimes[0])
    return target.with_overrides(runtime=runtime)


def _from_factorized(slim_result: Any, factorized: Any, source: torch.nn.Module) -> Any:
    """The slim result, with its "before" figures taken from the model the factorisation started from."""
    from slimship.slimming.api import count_bytes

    return replace(
        slim_result,
        params_before=factorized.params_before,
        flops_before=factorized.flops_before,
        bytes_before=count_bytes(source),
    )
