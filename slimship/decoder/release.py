"""A text-generation release: decoder files with their KV cache, the tokenizer and generation settings, the
reference decode verify replays, and the decode figures, written like every other slimship bundle.

`release_decoder(request)`:
1. names each file's format (`executorch-fp32`, `executorch-8da4w`, `onnx`, `onnx-int4`, from its name as
   `slimship export --task text-generation` writes it);
2. stores the reference: transformers' greedy `generate()` on the slim model for a fixed prompt
   (`REFERENCE_SEED`), and the model's top-1 next token along it (slimship.decoder.replay);
3. checks every file from disk: a float file must decode the reference tokens exactly and match the
   model's logits (`slimship.decoder.export.check_file`); every file's next-token top-1 agreement along the
   reference is measured (the figure `min_token_agreement` gates for quantised files, and verify re-measures);
4. times each file's decoding on the target (`slimship.decoder.bench.bench_decode`), interleaved with the
   `--dense` file of the same kind when one is given (decode speedup: median of per-run ratios, p10-p90);
5. decides the gates (`min_decode_speedup`, `max_ms_per_token`, `min_token_agreement`): a failure
   publishes nothing;
6. writes the bundle through `slimship.pipeline.release.publish_bundle` (staged, verified, renamed into
   place, never overwriting): the files, the tokenizer and generation files copied byte for byte from the
   checkpoint folder, manifest.json (`task: text-generation`, section `text_generation`), MODEL_CARD.md and
   report.html.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
import shutil
import sys
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from slimship._util import dump_json, to_jsonable
from slimship._version import __version__
from slimship.decoder.bench import bench_decode, file_kind
from slimship.decoder.bundle import TOKENIZER_FILES, tokenizer_files
from slimship.decoder.cache import decoder_info
from slimship.decoder.card import decode_plots, render_text_generation_card
from slimship.decoder.export import (
    DECODER_FORMATS,
    DecoderExportOptions,
    DecoderFormat,
    check_file,
    reference_generation,
)
from slimship.decoder.export import Reference as ExportReference
from slimship.decoder.replay import token_agreement
from slimship.decoder.runner import open_decoder
from slimship.errors import ConfigError, ModelFileError, VerificationError
from slimship.exporters.registry import precision_from_name
from slimship.pipeline import manifest as mf
from slimship.pipeline.bundle_files import bundle_file_names
from slimship.pipeline.explain import target_record
from slimship.pipeline.gates import (
    TEXT_GENERATION,
    GateFigures,
    GateResult,
    GatesSpec,
    enforce,
    evaluate_gates,
)
from slimship.pipeline.publish import Step
from slimship.pipeline.release import ReleaseResult, copy_model_file, file_entries, publish_bundle
from slimship.pipeline.report import render_report

REFERENCE_SEED = 1  # the fixed prompt: random ids from this seed (the same as the export's parity prompt)
MANIFEST_SCHEMA_VERSION = "1.1"  # adds `task` and `text_generation`


@dataclasses.dataclass(frozen=True)
class DecoderReleaseOptions:
    """The reference decode and how each file's decoding is timed."""

    reference_prompt_len: int = 8
    reference_new_tokens: int = 32  # fewer when a file's cache is smaller (or at an EOS id)
    prompt_len: int = 32  # timed generations: a random prompt this long ...
    new_tokens: int = 32  # ... and this many new tokens, EOS ignored
    runs: int = 10
    warmup: int = 2
    calibration: tuple[tuple[int, ...], ...] | None = None  # quantised files: the user's token sequences
    calibration_source: str = ""
    floor_agreement: float = DecoderExportOptions.min_agreement  # verify's bound when the gate is off


@dataclasses.dataclass(frozen=True)
class DecoderReleaseRequest:
    """What a text-generation release is made of (the CLI fills it from `slimship release --task ...`)."""

    name: str
    version: str
    out: Path
    model: nn.Module  # the slim decoder (a transformers causal LM), float
    files: Sequence[Path]  # .pte / .onnx files exported from it with --task text-generation
    source_sha256: str  # of the slim checkpoint folder (or its weights)
    gates: GatesSpec
    target: Any  # slimship.runtimes.targets.Target (local)
    options: DecoderReleaseOptions = DecoderReleaseOptions()
    dense: Sequence[Path] = ()  # dense files: each slim file is timed against the dense file of its kind
    folder: Path | None = None  # the checkpoint folder the tokenizer and generation files come from
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: str = ""


@contextlib.contextmanager
def _silent(name: str) -> Iterator[dict[str, Any]]:
    yield {}


# ------------------------------------------------------------------------------------------ inputs


def decoder_format_of(path: Path) -> DecoderFormat:
    """The text-generation format a file's name states (STEM.fp32.pte, STEM.8da4w.pte, STEM.onnx, ...)."""
    suffix, precision = path.suffix.lower(), precision_from_name(path) or "fp32"
    for fmt in DECODER_FORMATS.values():
        if fmt.suffix == suffix and fmt.precision == precision:
            return fmt
    names = ", ".join(
        f"STEM{'' if f.name == 'onnx' else '.' + f.precision}{f.suffix}" for f in DECODER_FORMATS.values()
    )
    raise ConfigError(
        f"{path}: not a file name `slimship export --task text-generation` writes ({names}); "
        "its name says the format"
    )


def model_files(files: Sequence[Path]) -> dict[str, Path]:
    """Format name -> file, each an existing file of a distinct text-generation format."""
    out: dict[str, Path] = {}
    for path in map(Path, files):
        if not path.is_file():
            raise ModelFileError(f"{path}: no such file")
        fmt = decoder_format_of(path)
        if fmt.name in out:
            raise ConfigError(
                f"{path} and {out[fmt.name]} are both {fmt.name}; a release holds one file per format"
            )
        out[fmt.name] = path
    if not out:
        raise ConfigError(
            "no decoder files given: pass --files with what `slimship export --task text-generation` wrote"
        )
    return out


def dense_for(files: dict[str, Path], dense: Sequence[Path]) -> dict[str, Path | None]:
    """Format -> the dense file of the same kind (suffix and precision), or None."""
    by_kind: dict[str, Path] = {}
    for path in map(Path, dense):
        if not path.is_file():
            raise ModelFileError(f"--dense {path}: no such file")
        by_kind.setdefault(file_kind(path), path)
    return {fmt: by_kind.get(file_kind(path)) for fmt, path in files.items()}


# ------------------------------------------------------------------------------------------ checks


@dataclasses.dataclass
class Reference:
    prompt: list[int]
    tokens: list[int]
    next_tokens: list[int]
    generated: ExportReference  # transformers' tokens and the model's logits along them (the fp32 check)


def make_reference(model: nn.Module, files: dict[str, Path], options: DecoderReleaseOptions) -> Reference:
    """transformers' greedy generate() on `model` for the fixed prompt, sized to fit every file's cache."""
    info = decoder_info(model)
    caches = [open_decoder(path).info.max_seq_len for path in files.values()]
    room = min(
        [c for c in caches if c is not None] or [options.reference_prompt_len + options.reference_new_tokens]
    )
    new = min(options.reference_new_tokens, room - options.reference_prompt_len)
    if new < 1:
        raise ConfigError(
            f"a file's cache holds {room} tokens: too few for the reference prompt of "
            f"{options.reference_prompt_len} and one new token (export with a larger --max-seq-len)"
        )
    rng = np.random.default_rng(REFERENCE_SEED)
    prompt = [int(t) for t in rng.integers(0, info.vocab_size, options.reference_prompt_len)]
    ref = reference_generation(model, info, prompt, new)
    next_tokens = [int(t) for t in np.asarray(ref.logits).argmax(axis=1)]
    return Reference(prompt, list(ref.tokens), next_tokens, ref)


def check_files(model: nn.Module, files: dict[str, Path], reference: Reference,
                options: DecoderReleaseOptions, gates: GatesSpec) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Each file from disk against the slim model (see the module doc); VerificationError naming a file that
    fails. Returns format -> its `text_generation.files` entry (without path and decode figures)."""
    info = decoder_info(model)
    entries = {}
    for name, path in files.items():
        fmt = DECODER_FORMATS[name]
        runner = open_decoder(path)
        export_options = DecoderExportOptions(
            max_seq_len=runner.info.max_seq_len or len(reference.prompt) + len(reference.tokens),
            calibration=options.calibration, calibration_source=options.calibration_source,
            prompt_len=len(reference.prompt), new_tokens=len(reference.tokens),
        )  # fmt: skip
        parity = check_file(path, fmt, model, info, reference.generated, export_options)
        if not parity.passed:
            raise VerificationError(f"{path}: does not match the slim model ({name}): {parity.reason}")
        rate, positions, _ = token_agreement(
            runner, reference.prompt, reference.tokens, reference.next_tokens
        )
        limit = (
            gates.min_token_agreement if gates.min_token_agreement is not None else options.floor_agreement
        )
        entries[name] = {
            "format": name, "precision": fmt.precision, "quantised": fmt.quantised, "tokens": parity.tokens,
            "tokens_match": parity.tokens_match, "token_agreement": rate, "agreement_positions": positions,
            "min_token_agreement": limit if fmt.quantised else None,
            "max_abs_diff": parity.max_abs_diff, "tolerance": parity.tolerance,
            "calibration_agreement": parity.top1_agreement, "calibration_positions": parity.positions or None,
            "perplexity": parity.perplexity, "reference_perplexity": parity.reference_perplexity,
            "calibration": parity.calibration or None, "max_seq_len": runner.info.max_seq_len,
            "bytes": path.stat().st_size,
        }  # fmt: skip
        if fmt.quantised and rate < options.floor_agreement:
            raise VerificationError(
                f"{path}: next-token top-1 agreement {rate:.3f} with the slim model along the reference "
                f"decode is below {options.floor_agreement} (a broken file, not a quality question)"
            )
    return entries


# ------------------------------------------------------------------------------------------ figures


def measure(
    files: dict[str, Path],
    dense: dict[str, Path | None],
    target: Any,
    options: DecoderReleaseOptions,
    step: Step = _silent,
) -> tuple[dict[str, dict[str, Any]], int]:
    """Format -> decode figures of its file (against its dense file when there is one), and the process's
    peak resident memory (KiB) after all runs."""
    figures, peak = {}, 0
    for name, path in files.items():
        other = dense[name]
        with step(f"decode {path.name}" + (f" vs {other.name}" if other else "") + f", {options.runs} runs"):
            result = bench_decode(
                [path], dense=other, prompt_len=options.prompt_len, new_tokens=options.new_tokens,
                runs=options.runs, warmup=options.warmup, threads=target.threads, target=target,
            )  # fmt: skip
        slim = next(m for m in result.measurements if Path(m.model) == path)
        speedup = next((s for s in result.decode_speedups if Path(s.slim) == path), None)
        prefill = next((s for s in result.prefill_speedups if Path(s.slim) == path), None)
        dense_m = next((m for m in result.measurements if other is not None and Path(m.model) == other), None)
        figures[name] = {
            "ttft_ms": slim.ttft_ms, "prefill_tok_s": slim.prefill_tok_s, "decode_tok_s": slim.decode_tok_s,
            "ms_per_token": slim.ms_per_token, "rss_kb": slim.rss_kb,
            "dense": other.name if other else None,
            "dense_decode_tok_s": dense_m.decode_tok_s if dense_m else None,
            "decode_speedup": _spread(speedup), "prefill_speedup": _spread(prefill),
            "notes": list(result.notes),
        }  # fmt: skip
        peak = max(peak, int(result.peak_rss_kb))
    return to_jsonable(figures), peak


def _spread(speedup: Any) -> dict[str, Any] | None:
    if speedup is None:
        return None
    return {"median": speedup.median, "p10": speedup.p10, "p90": speedup.p90, "pairs": speedup.pairs}


def gate_figures(
    target: str, entries: dict[str, dict[str, Any]], decode: dict[str, dict[str, Any]]
) -> GateFigures:
    """What the text-generation gates read, per `target/format`."""
    speedup, ms, agreement = {}, {}, {}
    for name, figures in decode.items():
        subject = f"{target}/{name}"
        if figures["decode_speedup"] is not None:
            speedup[subject] = round(figures["decode_speedup"]["median"], 4)
        ms[subject] = figures["ms_per_token"]["median"]
        if entries[name]["quantised"]:
            agreement[subject] = entries[name]["token_agreement"]
    return GateFigures(decode_speedup=speedup, ms_per_token=ms, token_agreement=agreement)


def decide_gates(gates: GatesSpec, figures: GateFigures) -> list[GateResult]:
    """Every text-generation gate; each line to stderr; GateError (nothing published) on a failure."""
    results = evaluate_gates(gates, figures, TEXT_GENERATION)
    for result in results:
        print(f"gate {result.line()}", file=sys.stderr)  # stdout may carry --json -
    enforce(results)
    return results


# ------------------------------------------------------------------------------------------ bundle


@dataclasses.dataclass
class _Contents:
    """Everything measured and decided, ready to be written."""

    request: DecoderReleaseRequest
    files: dict[str, Path]
    tokenizer: dict[str, Path]
    reference: Reference
    entries: dict[str, dict[str, Any]]
    decode: dict[str, dict[str, Any]]
    peak_rss_kb: int
    gates: list[GateResult]


def release_decoder(request: DecoderReleaseRequest, step: Step = _silent) -> ReleaseResult:
    """Check, measure, gate and publish a text-generation release (see the module doc)."""
    files = model_files(request.files)
    tokenizer = tokenizer_files(request.folder)
    dense = dense_for(files, request.dense)
    with step("reference decode (transformers generate) and each file checked from disk"):
        reference = make_reference(request.model, files, request.options)
        entries = check_files(request.model, files, reference, request.options, request.gates)
    decode, peak = measure(files, dense, request.target, request.options, step)
    with step("quality gates"):
        gates = decide_gates(request.gates, gate_figures(request.target.name, entries, decode))
    contents = _Contents(request, files, tokenizer, reference, entries, decode, peak, gates)
    with step("write release bundle"):
        return publish_bundle(request.name, request.version, request.out, lambda b: _write(contents, b))


def _write(contents: _Contents, bundle: Path) -> dict[str, Any]:
    request = contents.request
    roles: dict[str, str] = {}
    names = bundle_file_names(contents.files)
    for name, rel in names.items():
        copy_model_file(name, contents.files[name], bundle / rel)
        roles[rel] = name
    for name, path in contents.tokenizer.items():
        shutil.copyfile(path, bundle / name)  # byte for byte
        roles[name] = TOKENIZER_FILES[name]
    manifest = _manifest(contents, names, file_entries(bundle, roles))
    where = f"{bundle / mf.MANIFEST_NAME} (being written)"
    mf.validate_manifest(manifest, where=where)
    (bundle / "MODEL_CARD.md").write_text(
        render_text_generation_card(manifest, request.notes), encoding="utf-8"
    )
    (bundle / "report.html").write_text(render_report(manifest, decode_plots(manifest)), encoding="utf-8")
    roles.update({"MODEL_CARD.md": "model-card", "report.html": "report"})
    manifest["files"] = file_entries(bundle, roles)
    mf.validate_manifest(manifest, where=where)
    (bundle / mf.MANIFEST_NAME).write_text(dump_json(manifest), encoding="utf-8")
    return manifest


def _manifest(contents: _Contents, names: dict[str, str], files: list[dict[str, Any]]) -> dict[str, Any]:
    request, reference = contents.request, contents.reference
    info = decoder_info(request.model)
    options = request.options
    file_entries_ = {
        name: {"path": names[name], **entry, "decode": contents.decode.get(name)}
        for name, entry in contents.entries.items()
    }
    target = request.target
    manifest = {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "name": request.name,
        "version": request.version,
        "created_by": f"slimship {__version__}",
        "files": files,
        "model": {
            "inputs": [{"name": "tokens", "shape": [1, "seq"], "dtype": "int64"}],
            "outputs": [{"name": "logits", "shape": [1, "seq", info.vocab_size], "dtype": "float32"}],
            "source_sha256": request.source_sha256,
            "architecture": type(request.model).__name__,
            "vocab_size": info.vocab_size,
            "kv_heads": list(info.layout.heads),
            "bos_id": info.bos_id,
            "eos_ids": list(info.eos_ids),
        },
        "slimming": {
            "params_after": sum(p.numel() for p in request.model.parameters()),
            **({"layers": layers} if (layers := _slim_layers(request.model)) else {}),
        },
        "parity": {
            name: {"max_abs_diff": e["max_abs_diff"], "tolerance": e["tolerance"]}
            for name, e in contents.entries.items()
            if e["max_abs_diff"] is not None and e["tolerance"] is not None
        },
        "accuracy": {},
        "latency": {"device": {}, "emulated": {}},
        "versions": {**mf.package_versions(), "transformers": _version("transformers")},
        "config": to_jsonable(request.config),
        "gates": [g.to_dict() for g in contents.gates],
        "targets": {target.name: target_record(target)},
        "task": TEXT_GENERATION,
        "text_generation": {
            "reference": {
                "prompt": reference.prompt,
                "tokens": reference.tokens,
                "next_tokens": reference.next_tokens,
                "made_by": "transformers generate() on the slim model (greedy, stops at an EOS id); "
                "next_tokens: its top-1 at every position of prompt + tokens[:-1]",
                "prompt_source": f"{len(reference.prompt)} random ids (numpy seed {REFERENCE_SEED})",
            },
            "measurement": {
                "target": target.name,
                "threads": target.threads,
                "affinity": list(target.affinity),
                "prompt_len": options.prompt_len,
                "new_tokens": options.new_tokens,
                "runs": options.runs,
                "warmup": options.warmup,
                "what": "greedy generations of a random prompt, EOS ignored, in this "
                "process; with a dense file the two alternate run by run",
                "host": {
                    "machine": platform.machine(),
                    "system": platform.system(),
                    "processor": platform.processor() or None,
                },
                "peak_rss_kb": contents.peak_rss_kb,
            },
            "files": file_entries_,
            "tokenizer_files": sorted(contents.tokenizer),
        },
    }
    return mf.finite_or_none(to_jsonable(manifest))


def _slim_layers(model: nn.Module) -> Any:
    entry = getattr(model.config, "slimship", None)
    return entry.get("layers") if isinstance(entry, dict) else None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
