"""The text-generation side of `slimship export`, `slimship bench` and `slimship generate`.

`slimship.cli` parses and dispatches: `export`/`bench` with `--task text-generation` and `generate` come
here with the parsed arguments, a console for humans and the function that writes `--json`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from slimship._console import Steps
from slimship._util import to_jsonable
from slimship.errors import ConfigError
from slimship.exporters.registry import FORMATS, ExportFailures, export_each

TASKS = ("text-generation",)
Emit = Callable[[Any], None]


def add_task_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--task",
        default=None,
        choices=TASKS,
        help="text-generation: a decoder with its KV cache (tokens in, logits out, one call per token); "
        "omitted: one forward pass on the model's own inputs",
    )


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    """`export --task text-generation --max-seq-len N` (formats: executorch-fp32, executorch-8da4w, onnx)."""
    add_task_argument(p)
    group = p.add_argument_group("text generation (--task text-generation)")
    group.add_argument(
        "--max-seq-len", type=int, default=128, help="tokens the KV cache holds (prompt + new)"
    )


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    add_task_argument(p)
    group = p.add_argument_group("text generation (--task text-generation; --runs counts generations)")
    group.add_argument("--prompt-len", type=int, default=32, help="tokens in the (random) prompt")
    group.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run")


def add_release_arguments(p: argparse.ArgumentParser) -> None:
    """`release SLIM_DIR --task text-generation --files ...` (see slimship.decoder.release)."""
    add_task_argument(p)
    group = p.add_argument_group("text generation (--task text-generation)")
    group.add_argument(
        "--files", nargs="+", type=Path, default=None, metavar="FILE",
        help="the .pte / .onnx files `slimship export MODEL --task text-generation` wrote (named by format)",
    )  # fmt: skip
    group.add_argument(
        "--dense", nargs="+", type=Path, default=None, metavar="FILE",
        help="dense files of the same kinds: each file's decode speedup is measured against its kind's",
    )  # fmt: skip
    group.add_argument("--prompt-len", type=int, default=32, help="timed generations: random prompt tokens")
    group.add_argument("--new-tokens", type=int, default=32, help="timed generations: new tokens per run")
    group.add_argument("--runs", type=int, default=10, help="timed generations per file")
    group.add_argument("--warmup", type=int, default=2, help="untimed generations per file first")


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model", type=Path,
        help="a text-generation .pte or .onnx (slimship export --task ...), or a text-generation release "
        "bundle (folder or .tar.gz: its fp32 file unless --format)",
    )  # fmt: skip
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt-ids", metavar="IDS", help="prompt token ids, e.g. 1,2,3")
    prompt.add_argument(
        "--prompt", metavar="TEXT", help="prompt text (needs the bundle's tokenizer or --tokenizer)"
    )
    p.add_argument(
        "--tokenizer", type=Path, default=None, metavar="DIR",
        help="a folder with tokenizer files (read by transformers.AutoTokenizer from local files only)",
    )  # fmt: skip
    p.add_argument("--format", default=None, help="the bundle's file of this format (omitted: its fp32 file)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (fewer at an EOS)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the model's EOS ids")
    p.add_argument(
        "--threads", type=int, default=None, help="runtime threads (omitted: the runtime's default)"
    )


# ------------------------------------------------------------------------------------------ model


def decoder_from_args(args: argparse.Namespace) -> tuple[Any, str, str]:
    """(model, origin, stem) of a decoder: `--model MODULE:FUNCTION` returning a transformers causal LM
    (dense or slim, `--weights` applied), or a checkpoint folder."""
    import torch

    from slimship.pipeline.config import resolve
    from slimship.sources import apply_weights

    factory, path = getattr(args, "factory", None), getattr(args, "model", None)
    if factory and path:
        raise ConfigError(f"give either a checkpoint folder ({path}) or --model {factory}, not both")
    if path is not None:
        return _from_folder(Path(path), bool(getattr(args, "allow_pickle", False)))
    if not factory:
        raise ConfigError("no model given: pass --model package.module:function returning a causal LM")
    if ":" not in factory:
        raise ConfigError(f"--model {factory!r}: expected 'package.module:function'")
    try:
        model = resolve(factory, "--model")()
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"--model {factory}: calling it failed ({type(exc).__name__}: {exc})") from exc
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise ConfigError(f"--model {factory}: returned {type(model).__name__}, not a transformers causal LM")
    origin = factory
    if getattr(args, "weights", None):
        apply_weights(model, args.weights)
        origin = f"{factory} + {args.weights}"
    return model.eval(), origin, factory.rpartition(":")[2] or "model"


def _from_folder(path: Path, allow_pickle: bool) -> tuple[Any, str, str]:
    if not path.is_dir():
        raise ConfigError(
            f"{path}: --task text-generation takes a checkpoint folder or --model FACTORY (a .pt2 holds "
            "no KV cache)"
        )
    try:
        from slimship.hf import load_pretrained  # the checkpoint-folder package (optional here)
    except ImportError:
        raise ConfigError(f"{path}: checkpoint folders need slimship.hf; use --model FACTORY") from None
    return load_pretrained(path, allow_pickle=allow_pickle).eval(), str(path), path.name or "model"


# ------------------------------------------------------------------------------------------ commands


def export_command(args: argparse.Namespace, console: Any, emit: Emit) -> int:
    from slimship.decoder.export import DecoderExporter, DecoderExportOptions, file_name, get_decoder_format
    from slimship.decoder.tokens import load_token_file
    from slimship.outputs import check_output_dir, move_all, refuse_existing, writing

    formats = list(dict.fromkeys(args.format))
    records = [get_decoder_format(name) for name in formats]  # ExportError before any work
    if args.max_seq_len < 2:
        raise ConfigError(f"--max-seq-len {args.max_seq_len}: give at least 2")
    out = Path(args.out)
    check_output_dir(out, "--out")
    steps = Steps()
    with steps.step("load decoder"):
        model, origin, stem = decoder_from_args(args)
    refuse_existing([out / file_name(stem, r) for r in records], "--out")
    calibration, source = None, ""
    if args.calibration:
        vocab = int(model.config.get_text_config().vocab_size)
        calibration = load_token_file(args.calibration, vocab, args.max_seq_len)
        source = f"{len(calibration)} sequences from {args.calibration}"
    new_tokens = min(16, args.max_seq_len // 2)
    options = DecoderExportOptions(
        max_seq_len=args.max_seq_len, calibration=calibration, calibration_source=source,
        prompt_len=min(8, args.max_seq_len - new_tokens), new_tokens=new_tokens,
    )  # fmt: skip
    with steps.step("reference generation (transformers generate)"):
        exporter = DecoderExporter(model, options, formats)  # a static cache's size checked first
    with tempfile.TemporaryDirectory(prefix="slimship-export-") as tmp:
        path_of = lambda name: Path(tmp) / file_name(stem, get_decoder_format(name))  # noqa: E731
        step = lambda name: steps.step(f"export {name} (text-generation, cache {args.max_seq_len})")  # noqa: E731
        failures: dict[str, str] = {}
        try:  # every format is tried; the ones that passed are kept (as for one-pass models)
            results = export_each(
                formats, lambda n: exporter.export(n, Path(tmp), stem), path_of, step, _detail
            )
        except ExportFailures as exc:
            results, failures = exc.results, exc.failures
        if results:
            with writing(out, "--out"):
                out.mkdir(parents=True, exist_ok=True)
            files = {name: out / result.path.name for name, result in results.items()}
            move_all([(result.path, files[name]) for name, result in results.items()], "--out")
            for name, result in results.items():
                result.path = files[name]
    for result in results.values():
        console.print(f"{result.path}  {result.bytes} bytes  {_parity_text(result.parity)}")
        for line in result.notes:
            console.print(f"  note: {line}")
    rows = [{"format": name, "reason": reason} for name, reason in failures.items()]
    emit(
        {
            "source": origin,
            "task": "text-generation",
            "kv_heads": list(exporter.info.layout.heads),
            "formats": [{"format": n, **to_jsonable(r)} for n, r in results.items()],
            "failures": rows,
            "seconds": steps.times,
        }
    )
    for row in rows:  # the files that passed are written; each failure is named with its reason
        print(f"slimship: error: {row['format']} failed: {row['reason']}", file=sys.stderr)
    return 2 if rows else 0


def _detail(result: Any) -> str:
    return _parity_text(result.parity)


def _parity_text(parity: Any) -> str:
    if parity.top1_agreement is not None:
        return (
            f"top-1 agreement {parity.top1_agreement:.3f} on {parity.positions} positions "
            f"(perplexity {parity.perplexity:.3g} vs {parity.reference_perplexity:.3g}; {parity.calibration})"
        )
    same = "same" if parity.tokens_match else "different"
    return f"greedy tokens {same} as transformers generate(); logits max|diff| {parity.max_abs_diff:.3g}"


def local_target(name: str, targets_file: Any = None) -> Any:
    """The target named on the command line, for a release's decode figures (timed on this machine)."""
    from slimship.runtimes.targets import get_target, load_targets

    target = get_target(name, load_targets(targets_file) if targets_file else None)
    if target.transport != "local" or target.emulated:
        raise ConfigError(
            f"--target {target.name}: a text-generation release times its files on this machine (local "
            "targets); measure other targets with `slimship bench --task text-generation --target ...`"
        )
    return target


@contextlib.contextmanager
def pinned(target: Any) -> Iterator[None]:
    """This process (which runs the files) pinned to the target's cores while timing, then unpinned."""
    pin = bool(target.affinity) and hasattr(os, "sched_setaffinity")
    before = os.sched_getaffinity(0) if pin else None
    try:
        if pin:
            os.sched_setaffinity(0, target.affinity)
        yield
    finally:
        if before is not None:
            os.sched_setaffinity(0, before)


def bench_command(args: argparse.Namespace, console: Any, emit: Emit) -> int:
    from slimship.decoder.bench import bench_decode, bench_decode_on_target, format_decode_table
    from slimship.runtimes.measure import format_profile_table
    from slimship.runtimes.targets import get_target, load_targets

    extra = load_targets(args.targets_file) if args.targets_file else None
    target = get_target(args.target, extra)
    settings = dict(dense=args.dense, prompt_len=args.prompt_len, new_tokens=args.new_tokens, runs=args.runs,
                    warmup=args.warmup, profile=args.profile)  # fmt: skip
    steps = Steps()
    what = f"decode {len(args.models)} file(s), {args.runs} generations each"
    if target.transport != "local" or target.emulated:  # the device runner, shipped to the target
        with steps.step(f"{what} on {target.name}"):
            result = bench_decode_on_target(args.models, target, **settings)
    else:
        with pinned(target), steps.step(what):  # this process runs the files: pinned as the target says
            result = bench_decode(args.models, threads=target.threads, target=target, **settings)
    console.print(format_decode_table(result))
    for profile in result.profiles:
        console.print(format_profile_table(profile))
    emit(to_jsonable(result) | {"target": target.name})
    return 0


def generate_command(args: argparse.Namespace, console: Any, emit: Emit) -> int:
    from slimship.decoder.bundle import is_bundle, load_tokenizer, open_bundle, pick_file
    from slimship.decoder.runner import greedy, open_decoder
    from slimship.decoder.tokens import parse_ids

    path, tokenizer_dir = Path(args.model), args.tokenizer
    with contextlib.ExitStack() as stack:
        if is_bundle(path):
            root, manifest = open_bundle(path, stack)  # schema and checksums first
            model = pick_file(root, manifest, args.format, path)
            if tokenizer_dir is None and manifest["text_generation"]["tokenizer_files"]:
                tokenizer_dir = root
        elif args.format is not None:
            raise ConfigError(f"--format {args.format}: picks a file of a release bundle; {path} is a file")
        else:
            model = path
        tokenizer = None
        if args.prompt is not None:
            if tokenizer_dir is None:
                raise ConfigError(
                    f"--prompt: text needs a tokenizer, and {path} has none; pass --tokenizer DIR (a "
                    "folder with tokenizer.json ...), a release bundle that holds one, or --prompt-ids"
                )
            tokenizer = load_tokenizer(Path(tokenizer_dir))
            prompt = [int(t) for t in tokenizer.encode(args.prompt)]
        else:
            prompt = parse_ids(args.prompt_ids)
        decoder = open_decoder(model, args.threads)
        result = greedy(decoder, prompt, args.max_new_tokens, stop_at_eos=not args.ignore_eos)
    text = tokenizer.decode(result.tokens, skip_special_tokens=True) if tokenizer is not None else None
    decode_s = sum(result.step_s)
    rate = len(result.step_s) / decode_s if decode_s > 0 else None
    console.print(text if text is not None else ",".join(map(str, result.tokens)), markup=False)
    speed = f", decode {rate:.1f} tok/s" if rate else ""
    console.print(f"({len(result.tokens)} tokens; first after {result.prefill_s * 1e3:.1f} ms{speed})")
    emit(
        {
            "model": str(model), "prompt": prompt, "tokens": result.tokens, "text": text,
            "ttft_ms": result.prefill_s * 1e3, "decode_tok_s": rate,
        }
    )  # fmt: skip
    return 0


def release_command(args: argparse.Namespace, console: Any, emit: Emit) -> int:
    """`slimship release SLIM_DIR --task text-generation --files ...`: see slimship.decoder.release."""
    from slimship.decoder.release import DecoderReleaseOptions, DecoderReleaseRequest, release_decoder
    from slimship.decoder.tokens import load_token_file
    from slimship.pipeline.config import gates_from_options
    from slimship.pipeline.gates import GATE_RULES
    from slimship.pipeline.release import check_new_version

    check_new_version(Path(args.out), args.name, args.version)  # before any work
    gates = gates_from_options({n: getattr(args, n) for n in GATE_RULES if getattr(args, n) is not None})
    if args.format:
        raise ConfigError(
            "--format: a text-generation release takes the files `slimship export --task text-generation` "
            "wrote (--files), named by format; it exports nothing itself"
        )
    if not args.files:
        raise ConfigError(
            "--task text-generation: give the decoder files with --files (what `slimship export SLIM_DIR "
            "--task text-generation --format ...` wrote)"
        )
    target = local_target(args.target or "host")
    steps = Steps()
    with steps.step("load decoder"):
        model, origin, _ = decoder_from_args(args)
    folder = Path(args.model) if getattr(args, "model", None) is not None else None
    calibration, source = None, ""
    if args.calibration:
        vocab = int(model.config.get_text_config().vocab_size)
        calibration = load_token_file(args.calibration, vocab, 1 << 20)
        source = f"{len(calibration)} sequences from {args.calibration}"
    options = DecoderReleaseOptions(
        prompt_len=args.prompt_len, new_tokens=args.new_tokens, runs=args.runs, warmup=args.warmup,
        calibration=calibration, calibration_source=source,
    )  # fmt: skip
    config = {
        "command": "release", "task": "text-generation", "model": origin,
        "files": [Path(f).name for f in args.files], "dense": [Path(f).name for f in args.dense or []],
        "target": target.name, "gates": gates.model_dump(),
    }  # fmt: skip
    request = DecoderReleaseRequest(
        args.name, args.version, Path(args.out), model, list(args.files), _source_sha256(model, folder),
        gates, target, options, dense=list(args.dense or []), folder=folder, config=config,
    )  # fmt: skip
    with pinned(target):
        result = release_decoder(request, steps.step)
    console.print(str(result.bundle_dir))
    emit({"bundle": to_jsonable(result), "seconds": steps.times})
    return 0


def _source_sha256(model: Any, folder: Path | None) -> str:
    """The slim checkpoint folder's digest (names and sha256 of its files), or its weights' sha256."""
    if folder is not None:
        from slimship.hf.folder import folder_digest, read_folder

        return folder_digest(read_folder(folder))
    from slimship.pipeline.publish import weights_sha256

    return weights_sha256(model)


def text_generation_formats() -> list[str]:
    """The registry's formats that have a text-generation exporter."""
    from slimship.decoder.export import DECODER_FORMATS

    return [name for name in FORMATS if name in DECODER_FORMATS]
