"""The `slimship` command: parses arguments and calls the pipeline or one stage.

Every command takes --json PATH (- for stdout: then stdout holds only that JSON; progress, notes and
tables go to stderr). Progress and notes are on stderr; third-party logs are silenced unless -v.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimship._console import (
    Steps,
    Terminated,
    library_prints_to_stderr,
    native_stderr_quiet,
    note,
    setup_logging,
    stop_signals_interrupt,
    user_stdout,
)
from slimship.budget import set_max_memory
from slimship.cli_bench import cmd_bench as _cmd_bench  # noqa: F401 (COMMANDS names it)
from slimship.cli_io import (
    emit,
    gate_overrides,
    human,
    jsonable,
    print_notes,
    text_generation,
)
from slimship.errors import STOPPED_EXIT, GateError, SlimshipError, StoppedEarly, on_every_rank
from slimship.outputs import check_output_dir, check_output_file, move_all, refuse_existing, writing

if TYPE_CHECKING:
    from slimship.pipeline.records import ExportResult


# ------------------------------------------------------------------------------------------ commands


def _cmd_demo(args: argparse.Namespace) -> int:
    from slimship.pipeline.demo import demo_config
    from slimship.pipeline.run import run_pipeline

    release = {"out": str(args.out)} | ({"version": args.version} if args.version else {})
    result = run_pipeline(demo_config({"release": release, "gates": gate_overrides(args)}), human(args))
    emit(args, result)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from slimship.compress.device import torchrun_env
    from slimship.pipeline.config import load_config
    from slimship.pipeline.run import OtherRankFailed, run_pipeline

    overrides: dict[str, Any] = {"gates": gate_overrides(args)}
    if args.out:
        overrides["release"] = {"out": str(args.out)}
    try:
        config = load_config(args.config, overrides)
    except SlimshipError as exc:  # the same file on every rank: the same refusal
        raise on_every_rank(exc) from exc.__cause__
    try:
        result = run_pipeline(config, human(args), exports=args.exports)
    except OtherRankFailed as exc:  # the failed rank exits 2 naming itself; this one stops cleanly, so
        print(f"slimship: stopped: {exc}", file=sys.stderr)  # torchrun's summary blames that rank alone
        return 0
    env = torchrun_env()
    if env is None or env.rank == 0:  # under torchrun rank 0 speaks for the job (and writes --json)
        emit(args, result)
    return 0


def _cmd_config_schema(args: argparse.Namespace) -> int:
    from slimship._util import atomic_write_bytes
    from slimship.pipeline.config import config_json_schema

    if args.out:
        check_output_file(Path(args.out), "--out")
    schema = config_json_schema()
    text = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    if args.out:
        with writing(Path(args.out), "--out"):
            atomic_write_bytes(args.out, text.encode())
    elif not args.json:
        user_stdout().write(text)
    emit(args, schema)
    return 0


#: `slimship targets`: JSON key -> table header, in column order
TARGET_COLUMNS = {
    "name": "name", "threads": "threads", "affinity": "affinity", "runtime": "runtime",
    "precision": "precision", "transport": "transport", "emulated": "emulated", "from": "from",
    "description": "what",
}  # fmt: skip


def _cmd_targets(args: argparse.Namespace) -> int:
    """Built-in and user targets with what each means."""
    from rich.table import Table

    from slimship.runtimes.targets import BUILTIN_TARGETS, load_targets

    user = load_targets(args.targets_file) if args.targets_file else {}
    rows = [(t, "built-in") for t in BUILTIN_TARGETS.values()] + [
        (t, str(args.targets_file)) for t in user.values()
    ]
    table = Table(title="targets (threads, pinned cores, runtime, where it runs)")
    for header in TARGET_COLUMNS.values():
        table.add_column(header, overflow="fold")
    payload = []
    for target, origin in rows:
        entry = {
            "name": target.name,
            "threads": target.threads,
            "affinity": list(target.affinity),
            "runtime": target.runtime,
            "precision": target.precision,
            "transport": target.transport,
            "emulated": target.emulated,
            "from": origin,
            "description": target.description,
        }
        payload.append(entry)
        table.add_row(*(_cell(entry[key]) for key in TARGET_COLUMNS))
    human(args).print(table)
    emit(args, payload)
    return 0


def _cell(value: Any) -> str:
    if value is None:
        return "runtime default"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "any"
    return str(value)


def _source(args: argparse.Namespace, steps: Steps) -> Any:
    """The model named on the command line (a .pt2 or --model FACTORY [--weights]), with notes on stderr."""
    from slimship.sources import model_from_args

    with steps.step("load model"):
        source = model_from_args(args)
    print_notes(source.notes)
    return source


def _align_target(args: argparse.Namespace) -> Any:
    from slimship.runtimes import get_target, load_targets

    extra = load_targets(args.targets_file) if args.targets_file else None
    return get_target(args.target, extra).with_overrides(runtime=args.align_runtime)


def _channel_multiple(args: argparse.Namespace, module: Any, example: tuple[Any, ...]) -> int | None:
    """--channel-multiple: a number, or 'auto' (measured for the model's op kinds on --target)."""
    spec = args.channel_multiple
    if spec is None or spec == "latency":
        return None
    if spec != "auto":
        if not spec.isdigit() or int(spec) < 1:
            raise SlimshipError(
                f"--channel-multiple is {spec!r}; expected a positive integer, 'auto' or 'latency'"
            )
        return int(spec)
    from slimship.pipeline.alignment import choose_channel_multiple

    target = _align_target(args)
    multiple, info = choose_channel_multiple(module, example, example, target)
    per_kind = ", ".join(f"{k}: {m or 'none'}" for k, m in info["per_kind"].items())
    whole = info["whole_model"]
    tried = ", ".join(f"{m}: {v['speedup']:.3f}x" for m, v in (whole or {}).get("aligned", {}).items())
    check = f"; whole model vs exact slimming {tried}" if whole else ""
    where = f"{target.name} ({args.align_runtime})"
    note(f"channel alignment on {where}: {per_kind}{check} -> {multiple or 'none'}")
    return multiple


def _cmd_slim(args: argparse.Namespace) -> int:
    import torch

    from slimship.slimming import slim

    if getattr(args, "model", None) is not None and Path(args.model).is_dir():
        return _slim_folder(args)  # a checkpoint folder in, a slim checkpoint folder out
    check_output_file(Path(args.out), "--out")
    refuse_existing([Path(args.out)], "--out")
    steps = Steps()
    source = _source(args, steps)
    multiple = _channel_multiple(args, source.module, source.example)
    counts = None
    if args.channel_multiple == "latency":  # per space: the kept count measured fastest on --target
        from slimship.pipeline.alignment import latency_counts

        counts = latency_counts(_align_target(args))
    with steps.step("slim (trace, analyse, rewrite, verify)"):
        result = slim(source.module, source.example, channel_multiple=multiple, channel_counts=counts)
    with steps.step("save the slim program"):
        program = _reexport(result.model, source.example, source.dynamic_shapes, source.origin)
        partial = Path(args.out).with_name(f".{Path(args.out).name}.partial")
        try:
            with writing(Path(args.out), "--out"), open(partial, "wb") as handle:  # OSError: names --out
                torch.export.save(program, handle)
            with writing(Path(args.out), "--out"):
                os.replace(partial, args.out)  # whole or nothing
        finally:
            partial.unlink(missing_ok=True)
    summary = jsonable(result.summary())
    if counts is not None:
        from slimship.pipeline.alignment import counts_record

        summary["channel_counts"] = counts_record(counts)
        rounded = sum(d.chosen != d.needed for d in counts.decisions.values())
        note(f"latency-aware channel counts on {counts.source.target.name} ({args.align_runtime}): "
             f"{rounded} of {len(counts.decisions)} spaces kept extra channels")  # fmt: skip
    _slim_summary(args, summary)
    emit(args, {"out": str(args.out), "source": source.origin, "summary": summary, "seconds": steps.times})
    return 0


def _slim_folder(args: argparse.Namespace) -> int:
    """`slimship slim DIR --out SLIM_DIR`: a Hugging Face checkpoint folder in, a slim folder out."""
    from slimship.hf import read_folder
    from slimship.hf.slim import slim_loaded
    from slimship.hf.write import check_new_folder

    out = check_new_folder(Path(args.out))
    check_output_dir(out, "--out")  # its folder can be written
    read_folder(args.model, allow_pickle=args.allow_pickle)  # a folder that is no checkpoint: named first
    if out.suffix == ".pt2":
        raise SlimshipError(f"--out {out}: a checkpoint folder slims into a folder; give a folder path")
    if args.channel_multiple == "latency":
        raise SlimshipError(
            f"--channel-multiple latency: not for a checkpoint folder ({args.model}); use a number"
        )
    steps = Steps()
    source = _source(args, steps)
    multiple = _channel_multiple(args, source.module, source.example)
    with steps.step("slim (trace, analyse, rewrite, verify), write the folder and load it back"):
        result = slim_loaded(source.checkpoint, source.module, source.example, out, multiple)
    summary = jsonable(result.summary)
    _slim_summary(args, summary)
    before, after = result.weight_bytes_before, result.weight_bytes_after
    human(args).print(
        f"  weight files: {before:,} -> {after:,} bytes; per-layer sizes in config.json 'slimship'"
    )
    emit(args, {**jsonable(result.to_dict()), "seconds": steps.times})
    return 0


def _slim_summary(args: argparse.Namespace, summary: dict[str, Any]) -> None:
    """A few lines: parameters, FLOPs and bytes before -> after, and the verification."""
    console = human(args)
    console.print(f"slim model written to {args.out}")
    for key in ("params", "flops", "bytes"):
        before, after = summary.get(f"{key}_before"), summary.get(f"{key}_after")
        if isinstance(before, int | float) and isinstance(after, int | float) and after:
            console.print(f"  {key}: {before:,} -> {after:,} ({before / after:.2f}x smaller)")
    verification = summary.get("verification")
    if isinstance(verification, dict):
        shown = {k: v for k, v in verification.items() if isinstance(v, str | int | float | bool) and v != ""}
        console.print("  verification: " + ", ".join(f"{k} {v}" for k, v in shown.items()))
    console.print("  (every channel count and the full report: --json PATH)")


def _reexport(module: Any, example: tuple[Any, ...], dynamic_shapes: Any, source: str) -> Any:
    """torch.export of the slim module, keeping the source program's dynamic dims."""
    import torch

    from slimship.errors import SlimmingError

    try:
        return torch.export.export(module, example, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:
        dims = "with the source's dynamic dims " if dynamic_shapes else ""
        raise SlimmingError(
            f"{source}: the slim model could not be exported {dims}({type(exc).__name__}: {str(exc)[:300]})"
        ) from exc


def _export_all(
    args: argparse.Namespace, source: Any, out: Path, stem: str, steps: Steps, reuse: Any = None
) -> tuple[ExportResult, Any]:
    """Export `source` to every --format into `out`, one progress step per format (the pipeline's export
    stage), calibrated on --calibration or the pipeline's one fallback (see slimship.pipeline.calibration);
    with `reuse`, checked files of its index are reused. Returns the result and the export request."""
    import torch

    from slimship.exporters.registry import ExportRequest, describe
    from slimship.pipeline.calibration import calibration, from_file
    from slimship.pipeline.publish import export_stage
    from slimship.sources import output_names

    given = from_file(args.calibration, source.example) if args.calibration else None
    calib = calibration(
        args.format,
        source.example,
        given,
        "no --calibration given",
        "pass --calibration FILE.npz with real samples",
    )
    trace_example = source.example
    if source.kind == "factory":
        trace_example = tuple(torch.cat([t, t]) for t in source.example)  # batch 2: lets the batch be dynamic
    request = ExportRequest(
        source.module,
        source.example,
        trace_example,
        calibration=calib.batches,
        eval_batches=calib.batches,
        output_names=output_names(source.module, source.example),
    )

    said = lambda result: describe(result) + _batch_note(result, request)  # noqa: E731
    exported = export_stage(request, args.format, out, stem, calib, steps.step, said, reuse)
    return exported, request


def _batch_note(result: Any, request: Any) -> str:
    """Why an exported file has a fixed batch, in one clause (empty when its batch is dynamic)."""
    if getattr(result, "dynamic_batch", False):
        return ""
    batch = int(request.example[0].shape[0]) if request.example and request.example[0].dim() else 1
    notes = getattr(result, "notes", None) or []
    reason = (
        getattr(result, "dynamic_batch_reason", None)
        or (notes[0] if notes else None)
        or (
            "LiteRT converts static shapes (the interpreter can resize inputs at run time)"
            if str(result.path).endswith(".tflite")
            else "the model fixes it"
        )
    )
    return f"; batch fixed at {batch}: {reason}"


def _cmd_export(args: argparse.Namespace) -> int:
    from slimship.exporters.registry import get_format
    from slimship.pipeline.export_index import ExportIndex, provenance_of, record_exports

    if args.task == "text-generation":
        return text_generation("export_command", args)

    out = Path(args.out)
    check_output_dir(out, "--out")
    steps = Steps()
    source = _source(args, steps)
    refuse_existing([out / get_format(f).file_name(source.stem) for f in args.format], "--out")
    index = ExportIndex.load(out)  # an index already there must be sound before any work
    with tempfile.TemporaryDirectory(prefix="slimship-export-") as tmp:
        exported, request = _export_all(args, source, Path(tmp), source.stem, steps)
        with writing(out, "--out"):
            out.mkdir(parents=True, exist_ok=True)
        files = {fmt: out / Path(result.path).name for fmt, result in exported.results.items()}
        move_all([(Path(r.path), files[fmt]) for fmt, r in exported.results.items()], "--out")
    provenance = provenance_of(source)
    if provenance is not None and files:  # what `release --exports` / `run --exports` reuse
        record_exports(index, provenance, request, {f: (files[f], r) for f, r in exported.results.items()})
    console = human(args)
    rows = []
    for fmt, result in exported.results.items():
        console.print(
            f"{files[fmt]}  {result.bytes} bytes  parity max|diff| {result.parity.max_abs_diff:.3g}"
        )
        rows.append({"format": fmt, **jsonable(result), "path": str(files[fmt])})
    failures = [{"format": fmt, "reason": reason} for fmt, reason in exported.failures.items()]
    emit(
        args,
        {
            "source": source.origin,
            "formats": rows,
            "failures": failures,
            "calibration": exported.calibration.to_dict(),
            "seconds": steps.times,
        },
    )
    for failure in failures:  # the files that passed are written; each failure is named with its reason
        print(f"slimship: error: {failure['format']} failed: {failure['reason']}", file=sys.stderr)
    return 2 if failures else 0


def _cmd_generate(args: argparse.Namespace) -> int:
    return text_generation("generate_command", args)


def _cmd_verify(args: argparse.Namespace) -> int:
    from slimship.pipeline.verify import verify_bundle

    steps = Steps()
    with steps.step(f"verify {args.bundle}"):
        result = verify_bundle(Path(args.bundle))
    payload = jsonable(result)
    if args.json:
        emit(args, payload)
    else:
        user_stdout().write(json.dumps(payload, indent=2, default=str) + "\n")
    return 0


def _cmd_release(args: argparse.Namespace) -> int:
    """Bundle a slim model with checked exports, timed with --target or a latency gate (a decoder:
    slimship.decoder.release)."""
    if args.task == "text-generation":
        return text_generation("release_command", args)
    from slimship.cli_parser import DEFAULT_FORMATS

    args.format = args.format or list(DEFAULT_FORMATS)
    from slimship._util import sha256_file
    from slimship.pipeline.bench import (
        RELEASE_RUNS,
        release_bench,
        release_gates,
        release_slimming,
        release_timed,
    )
    from slimship.pipeline.config import gates_from_options
    from slimship.pipeline.export_index import ExportIndex, provenance_of
    from slimship.pipeline.publish import ReleaseRequest, Reuse, publish
    from slimship.pipeline.release import check_new_version
    from slimship.runtimes.targets import get_target

    check_new_version(Path(args.out), args.name, args.version)  # before any work
    gates = gates_from_options(gate_overrides(args))  # checked before any export
    index = ExportIndex.load(args.exports, required=True) if args.exports else None  # before any work
    steps = Steps()
    source = _source(args, steps)
    provenance = provenance_of(source) if index is not None else None
    reuse = Reuse(index, provenance) if index is not None and provenance is not None else None
    with tempfile.TemporaryDirectory() as tmp:
        exported, _ = _export_all(args, source, Path(tmp), "model", steps, reuse)
        exported.require_all()  # a release holds every format asked for, or none
        timed = release_timed(args.target, gates)
        what = f"time on {timed}, quality gates" if timed else "check files, quality gates"
        with steps.step(what):
            target, files = get_target(timed or "host"), exported.files()
            samples = exported.calibration.real_batches()
            runs = RELEASE_RUNS if timed else 1
            bench = release_bench(source.module, source.example, files, gates, target, runs, samples)
            results = release_gates(gates, bench)  # GateError
            if not timed:  # figures of this process's load: kept out of a reproducible bundle
                bench = bench.untimed()
        request = ReleaseRequest(
            args.name, args.version, Path(args.out), source.module, source.example,
            sha256_file(args.model) if args.model and source.kind == "pt2" else source.sha256,
            exported, results,
            {"command": "release", "model": source.origin, "gates": gates.model_dump()},
            bench, release_slimming(source.module, source.example),
        )  # fmt: skip
        with steps.step("write release bundle"):
            result = publish(request)
    human(args).print(str(result.bundle_dir))
    emit(args, {"bundle": result, "seconds": steps.times})
    return 0


# ------------------------------------------------------------------------------------------ parser

COMMANDS: dict[str, str] = {
    "demo": "_cmd_demo", "run": "_cmd_run", "config-schema": "_cmd_config_schema", "targets": "_cmd_targets",
    "slim": "_cmd_slim", "export": "_cmd_export", "bench": "_cmd_bench", "release": "_cmd_release",
    "verify": "_cmd_verify", "generate": "_cmd_generate",
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    from slimship.cli_parser import build_parser as build

    return build({name: globals()[function] for name, function in COMMANDS.items()})  # looked up per parse


def _speaks_for_all() -> bool:
    """True outside torchrun and on its rank 0 (the same rule as the rest of slimship: all three of
    torchrun's variables make a rank, not RANK alone)."""
    from slimship.compress.device import torchrun_env

    env = torchrun_env()
    return env is None or env.rank == 0


def _rank_said() -> str:
    """The prefix of a torchrun rank's own error ("rank R: ", two or more processes), else nothing."""
    from slimship.compress.device import torchrun_env

    env = torchrun_env()
    return f"rank {env.rank}: " if env is not None and env.world_size > 1 else ""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    set_max_memory(args.max_memory)
    with stop_signals_interrupt():  # SIGTERM / SIGHUP unwind like Ctrl-C: temporary folders removed
        return _run_command(args)


def _run_command(args: argparse.Namespace) -> int:
    """Run the parsed command; every outcome becomes an exit status (and a message on stderr)."""
    try:
        if args.json and args.json != "-":
            check_output_file(Path(args.json), "--json")
        quiet = not args.verbose
        with native_stderr_quiet(enabled=quiet), library_prints_to_stderr(quiet=quiet):
            return args.fn(args)
    except GateError as exc:
        print(f"slimship: gate failed: {exc}", file=sys.stderr)
        return 3
    except StoppedEarly as exc:
        if _speaks_for_all():  # every rank stops alike (rank 0's checkpoint)
            print(f"slimship: stopped: {exc}", file=sys.stderr)
            emit(args, {"stopped": str(exc), "exit_code": STOPPED_EXIT, "released": False})
        return STOPPED_EXIT
    except SlimshipError as exc:
        if not exc.every_rank:  # under torchrun, the rank that failed names itself
            print(f"slimship: error: {_rank_said()}{exc}", file=sys.stderr)
        elif _speaks_for_all():  # every rank raised it alike: rank 0 speaks for all
            print(f"slimship: error: {exc}", file=sys.stderr)
        return 2
    except Terminated as exc:
        print(f"slimship: terminated ({exc})", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("slimship: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: say so, and show the traceback with -v
        if args.verbose:
            traceback.print_exc(file=sys.stderr)
        hint = "" if args.verbose else " (run with -v for the traceback; please report)"
        print(f"slimship: internal error: {_rank_said()}{type(exc).__name__}: {exc}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
