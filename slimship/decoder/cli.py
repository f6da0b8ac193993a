"""The text-generation side of `slimship export`, `slimship bench` and `slimship generate`.

`slimship.cli` parses and dispatches: `export`/`bench` with `--task text-generation` and `generate` come
here with the parsed arguments, a console for humans and the function that writes `--json`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slimship._console import Steps
from slimship._util import to_jsonable
from slimship.errors import ConfigError
from slimship.exporters.registry import FORMATS

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


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="a text-generation .pte or .onnx (slimship export --task ...)")
    p.add_argument("--prompt-ids", required=True, metavar="IDS", help="prompt token ids, e.g. 1,2,3")
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
    from slimship.cli import check_output_dir, refuse_existing
    from slimship.decoder.export import DecoderExporter, DecoderExportOptions, file_name, get_decoder_format
    from slimship.decoder.tokens import load_token_file

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
        exporter = DecoderExporter(model, options)
    results = {}
    with tempfile.TemporaryDirectory(prefix="slimship-export-") as tmp:
        for name in formats:
            with steps.step(f"export {name} (text-generation, cache {args.max_seq_len})") as info:
                results[name] = exporter.export(name, Path(tmp), stem)
                info["detail"] = _parity_text(results[name].parity)
        out.mkdir(parents=True, exist_ok=True)
        for result in results.values():
            target = out / result.path.name
            shutil.move(str(result.path), target)
            result.path = target
    for result in results.values():
        console.print(f"{result.path}  {result.bytes} bytes  {_parity_text(result.parity)}")
        for line in result.notes:
            console.print(f"  note: {line}")
    emit(
        {
            "source": origin,
            "task": "text-generation",
            "kv_heads": list(exporter.info.layout.heads),
            "formats": [{"format": n, **to_jsonable(r)} for n, r in results.items()],
            "seconds": steps.times,
        }
    )
    return 0


def _parity_text(parity: Any) -> str:
    if parity.top1_agreement is not None:
        return (
            f"top-1 agreement {parity.top1_agreement:.3f} on {parity.positions} positions "
            f"(perplexity {parity.perplexity:.3g} vs {parity.reference_perplexity:.3g}; {parity.calibration})"
        )
    same = "same" if parity.tokens_match else "different"
    return f"greedy tokens {same} as transformers generate(); logits max|diff| {parity.max_abs_diff:.3g}"


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
        pin = bool(target.affinity) and hasattr(os, "sched_setaffinity")
        before = os.sched_getaffinity(0) if pin else None
        try:
            if pin:  # this process runs the files: pinned as the target says
                os.sched_setaffinity(0, target.affinity)
            with steps.step(what):
                result = bench_decode(args.models, threads=target.threads, **settings)
        finally:
            if before is not None:
                os.sched_setaffinity(0, before)
    console.print(format_decode_table(result))
    for profile in result.profiles:
        console.print(format_profile_table(profile))
    emit(to_jsonable(result) | {"target": target.name})
    return 0


def generate_command(args: argparse.Namespace, console: Any, emit: Emit) -> int:
    from slimship.decoder.runner import greedy, open_decoder
    from slimship.decoder.tokens import parse_ids

    prompt = parse_ids(args.prompt_ids)
    decoder = open_decoder(args.model, args.threads)
    result = greedy(decoder, prompt, args.max_new_tokens, stop_at_eos=not args.ignore_eos)
    decode_s = sum(result.step_s)
    rate = len(result.step_s) / decode_s if decode_s > 0 else None
    console.print(",".join(map(str, result.tokens)))
    speed = f", decode {rate:.1f} tok/s" if rate else ""
    console.print(f"({len(result.tokens)} tokens; first after {result.prefill_s * 1e3:.1f} ms{speed})")
    emit(
        {
            "model": str(args.model), "prompt": prompt, "tokens": result.tokens,
            "ttft_ms": result.prefill_s * 1e3, "decode_tok_s": rate,
        }
    )  # fmt: skip
    return 0


def text_generation_formats() -> list[str]:
    """The registry's formats that have a text-generation exporter."""
    from slimship.decoder.export import DECODER_FORMATS

    return [name for name in FORMATS if name in DECODER_FORMATS]
