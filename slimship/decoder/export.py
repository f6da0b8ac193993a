"""Export a decoder with its KV cache: ExecuTorch (fp32, 8da4w) and ONNX, each checked from the file.

- `executorch-fp32` / `executorch-8da4w`: `StaticKVDecoder` -> `torch.export` (strict, dynamic sequence
  length up to `max_seq_len`) -> `to_edge_transform_and_lower(XnnpackPartitioner)` with ExecuTorch's LLM
  runner metadata methods (`device_runner.PTE_METADATA`) -> `.pte`.
- `onnx`: `PastKVDecoder` -> `torch.onnx.export(dynamo=True)` with dynamic sequence and past lengths;
  `onnx-int4`: the same graph with onnxruntime's `MatMulNBits` (weight-only int4, blocks of 32).

Parity, read back from the written file: an fp32 file's greedy tokens must equal transformers'
`generate()` on the same weights and its logits along that sequence must match the model's within
`REL_BOUNDS['fp32']`; a quantised file's next-token top-1 must agree with the float model's on the
calibration tokens (or, without them, a stated set of random sequences) at least `min_agreement` of the
time (a floor against a broken file, see `DecoderExportOptions`), and the perplexity of both is reported.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimship._util import atomic_write_bytes, sha256_file
from slimship.compare import REL_BOUNDS, compare
from slimship.decoder.cache import (
    DecoderInfo,
    PastKVDecoder,
    StaticKVDecoder,
    check_static_cache,
    decoder_info,
    past_names,
)
from slimship.decoder.prepare import check_sliding_window, switch_off_sliding_window, to_fp32
from slimship.decoder.quant import GROUP_SIZE, quantize_8da4w
from slimship.decoder.runner import ONNX_METADATA_KEY, FileInfo, TorchDecoder, greedy, open_decoder
from slimship.errors import ExportError, VerificationError, first_line
from slimship.runtimes.profile import SCOPES_KEY

RANDOM_SEQUENCES = (4, 32)  # the fallback calibration: sequences x tokens of random ids


@dataclasses.dataclass(frozen=True)
class DecoderExportOptions:
    """How to export and check a decoder."""

    max_seq_len: int = 128
    group_size: int = GROUP_SIZE
    calibration: tuple[tuple[int, ...], ...] | None = None  # token sequences (the user's text)
    calibration_source: str = ""
    prompt_len: int = 8  # parity: greedy decoding of a prompt this long ...
    new_tokens: int = 16  # ... for this many new tokens
    # quantised files: a floor on next-token top-1 agreement with the float model that catches a broken
    # file (one that ignores its inputs agrees about 1/vocab of the time), not a quality gate: 4-bit noise
    # flips many near-ties of a small random model (0.57 on tests/decoder's tiny Llama); the figure is
    # reported for a release to gate on
    min_agreement: float = 0.25


@dataclasses.dataclass
class DecoderParity:
    """A file against the float model: greedy tokens and logits (fp32), top-1 agreement (quantised)."""

    prompt: list[int]
    reference_tokens: list[int]  # transformers generate() on the float model
    tokens: list[int]  # the file's greedy tokens
    tokens_match: bool
    max_abs_diff: float | None  # fp32: logits along the greedy sequence
    tolerance: float | None
    top1_agreement: float | None  # quantised: next-token top-1 vs the float model
    positions: int  # positions the agreement counts
    min_agreement: float | None
    perplexity: float | None  # on the calibration tokens (quantised files)
    reference_perplexity: float | None
    calibration: str  # where the agreement tokens came from
    passed: bool
    reason: str = ""


@dataclasses.dataclass
class DecoderExport:
    """A written text-generation file and how it was checked."""

    format: str
    path: Path
    bytes: int
    sha256: str
    max_seq_len: int
    kv_heads: list[int]
    parity: DecoderParity
    notes: list[str] = dataclasses.field(default_factory=list)


Builder = Callable[[nn.Module, DecoderInfo, DecoderExportOptions, Path], list[str]]


@dataclasses.dataclass(frozen=True)
class DecoderFormat:
    """One text-generation format: how to build the file, whether it is quantised and whether its cache
    is static (`max_seq_len` slots allocated up front, checked against the memory budget first)."""

    name: str
    suffix: str
    precision: str
    build: Builder
    static_cache: bool = False

    @property
    def quantised(self) -> bool:
        return self.precision != "fp32"


def pte_metadata(info: DecoderInfo, max_seq_len: int) -> dict[str, Any]:
    """The constant methods ExecuTorch's LLM runner reads (names as in its export_llama metadata)."""
    meta: dict[str, Any] = {
        "get_max_seq_len": max_seq_len, "get_max_context_len": max_seq_len, "get_vocab_size": info.vocab_size,
        "get_n_layers": info.layout.layers, "use_kv_cache": True, "use_sdpa_with_kv_cache": False,
        "enable_dynamic_shape": True,
    }  # fmt: skip
    if info.bos_id is not None:
        meta["get_bos_id"] = info.bos_id
    if info.eos_ids:
        meta["get_eos_ids"] = list(info.eos_ids)
    return meta


def _lower(wrapper: nn.Module, info: DecoderInfo, max_seq_len: int, path: Path) -> None:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    seq = torch.export.Dim("seq", min=1, max=max_seq_len)
    example = (torch.zeros(1, 2, dtype=torch.long), torch.tensor([0], dtype=torch.long))
    try:
        # strict: non-strict tracing of the cache's in-place updates fails in run_decompositions (torch 2.13)
        program = torch.export.export(wrapper, example, dynamic_shapes=({1: seq}, None), strict=True)
        edge = to_edge_transform_and_lower(
            program,
            partitioner=[XnnpackPartitioner()],
            constant_methods=pte_metadata(info, max_seq_len),
            compile_config=EdgeCompileConfig(_check_ir_validity=False),
        )
        buffer = edge.to_executorch().buffer
    except Exception as exc:
        raise ExportError(
            f"ExecuTorch export with a KV cache failed: {type(exc).__name__}: {first_line(exc)}"
        ) from exc
    atomic_write_bytes(path, buffer)


def _build_pte_fp32(
    model: nn.Module, info: DecoderInfo, options: DecoderExportOptions, path: Path
) -> list[str]:
    _lower(StaticKVDecoder(model, info.layout, options.max_seq_len), info, options.max_seq_len, path)
    return []


def _build_pte_8da4w(
    model: nn.Module, info: DecoderInfo, options: DecoderExportOptions, path: Path
) -> list[str]:
    work = copy.deepcopy(model)  # quantize_ works in place; the float model stays the reference
    report = quantize_8da4w(work, options.group_size)
    _lower(StaticKVDecoder(work, info.layout, options.max_seq_len), info, options.max_seq_len, path)
    return [report.note]


def _onnx_proto(model: nn.Module, info: DecoderInfo, options: DecoderExportOptions) -> Any:
    """The decoder as an ONNX graph with past/present keys and values and slimship's metadata."""
    import onnx

    layout = info.layout
    past = tuple(
        torch.zeros(1, heads, 3, dim)
        for heads, k_dim, v_dim in zip(layout.heads, layout.key_dims, layout.value_dims, strict=True)
        for dim in (k_dim, v_dim)
    )
    example = (torch.zeros(1, 2, dtype=torch.long), torch.tensor([[3, 4]]), past)
    seq = torch.export.Dim("seq", min=1, max=options.max_seq_len)
    past_len = torch.export.Dim("past", min=0, max=options.max_seq_len)
    past_in, present_out = past_names(layout.layers)
    try:
        exported = torch.onnx.export(
            PastKVDecoder(model, layout), example, dynamo=True, opset_version=18, verbose=False,
            dynamic_shapes=({1: seq}, {1: seq}, tuple({2: past_len} for _ in past)),
            input_names=["input_ids", "position_ids", *past_in], output_names=["logits", *present_out],
        )  # fmt: skip
    except Exception as exc:
        raise ExportError(
            f"ONNX export with past key/values failed: {type(exc).__name__}: {first_line(exc)}"
        ) from exc
    proto = exported.model_proto
    for node in proto.graph.node:  # the exporter's per-node stack traces: half the file of a small model
        scopes = _module_scopes(node)
        del node.metadata_props[:]
        if scopes:  # kept: `bench --profile` names a node's layer by it
            node.metadata_props.add(key=SCOPES_KEY, value=repr(scopes))
    meta = {"vocab_size": info.vocab_size, "max_seq_len": options.max_seq_len, "layers": layout.layers,
            "bos_id": info.bos_id, "eos_ids": list(info.eos_ids), "kv_heads": list(layout.heads)}  # fmt: skip
    onnx.helper.set_model_props(proto, {ONNX_METADATA_KEY: json.dumps(meta, sort_keys=True)})
    return proto


def _module_scopes(node: Any) -> list[str]:
    """The torch exporter's module path of a node, relative to the user's model (the wrapper's `model.`
    prefix removed): ['', 'model', 'model.layers.0', ..., op name]."""
    value = next((p.value for p in node.metadata_props if p.key == SCOPES_KEY), None)
    try:
        names = ast.literal_eval(value) if value and len(value) < 4096 else []
    except (ValueError, SyntaxError):
        return []
    if not isinstance(names, list) or len(names) < 2 or names[1] != "model":
        return []
    return [""] + [str(n).removeprefix("model.") for n in names[2:]]


def _build_onnx(model: nn.Module, info: DecoderInfo, options: DecoderExportOptions, path: Path) -> list[str]:
    atomic_write_bytes(path, _onnx_proto(model, info, options).SerializeToString())
    return []


def _build_onnx_int4(
    model: nn.Module, info: DecoderInfo, options: DecoderExportOptions, path: Path
) -> list[str]:
    """Weight-only int4 (onnxruntime's MatMulNBits, symmetric blocks of `group_size` along the input)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    float_proto = _onnx_proto(model, info, options)
    scopes = {n.name: p.value for n in float_proto.graph.node for p in n.metadata_props}
    quantizer = MatMulNBitsQuantizer(float_proto, block_size=options.group_size, is_symmetric=True)
    quantizer.process()
    proto = quantizer.model.model
    for node in proto.graph.node:  # a MatMulNBits node keeps the module scope of the MatMul it replaced
        if node.op_type == "MatMulNBits" and not node.metadata_props:
            source = scopes.get(node.name.removesuffix("_Q4"))
            if source is not None:
                node.metadata_props.add(key=SCOPES_KEY, value=source)
    count = sum(node.op_type == "MatMulNBits" for node in proto.graph.node)
    atomic_write_bytes(path, proto.SerializeToString())
    return [
        f"{count} MatMul weights at 4 bits (MatMulNBits, blocks of {options.group_size}); activations fp32"
    ]


#: text-generation formats (the names match `slimship.exporters.registry.FORMATS`)
DECODER_FORMATS: dict[str, DecoderFormat] = {
    f.name: f
    for f in (
        DecoderFormat("executorch-fp32", ".pte", "fp32", _build_pte_fp32, static_cache=True),
        DecoderFormat("executorch-8da4w", ".pte", "8da4w", _build_pte_8da4w, static_cache=True),
        DecoderFormat("onnx", ".onnx", "fp32", _build_onnx),
        DecoderFormat("onnx-int4", ".onnx", "int4", _build_onnx_int4),
    )
}


def get_decoder_format(name: str) -> DecoderFormat:
    try:
        return DECODER_FORMATS[name]
    except KeyError:
        known = ", ".join(DECODER_FORMATS)
        raise ExportError(f"format {name!r} has no text-generation exporter; known: {known}") from None


def file_name(stem: str, fmt: DecoderFormat) -> str:
    tail = "" if fmt.suffix == ".onnx" and fmt.precision == "fp32" else f".{fmt.precision}"
    return f"{stem}{tail}{fmt.suffix}"


# ------------------------------------------------------------------------------------------ parity


@dataclasses.dataclass
class Reference:
    """The float model's greedy tokens (transformers generate()) and its logits along them."""

    prompt: list[int]
    tokens: list[int]
    logits: np.ndarray


@torch.no_grad()
def reference_generation(
    model: nn.Module, info: DecoderInfo, prompt: Sequence[int], new_tokens: int
) -> Reference:
    """transformers' `generate()` (greedy, stops at EOS) and the model's logits over that sequence."""
    from transformers import GenerationConfig

    ids = torch.tensor([list(prompt)], dtype=torch.long)
    eos = list(info.eos_ids) or None
    config = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=new_tokens, eos_token_id=eos,
        pad_token_id=eos[0] if eos else 0, bos_token_id=info.bos_id,
    )  # fmt: skip
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    tokens = out[0, ids.shape[1] :].tolist()
    full = torch.tensor([list(prompt) + tokens[:-1]], dtype=torch.long)
    logits = model(input_ids=full, use_cache=False).logits[0].float().numpy()
    return Reference(list(prompt), tokens, logits)


def _perplexity(logits: np.ndarray, sequence: Sequence[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of sequence[1:] given the logits rows, and how many tokens."""
    rows = logits[: len(sequence) - 1].astype(np.float64)
    peak = rows.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(rows - peak).sum(axis=1)) + peak[:, 0]
    targets = np.asarray(sequence[1:], dtype=np.int64)
    return float((log_norm - rows[np.arange(len(targets)), targets]).sum()), len(targets)


def agreement(
    file: Any, reference: Any, sequences: Sequence[Sequence[int]]
) -> tuple[float, int, float, float]:
    """Teacher-forced next-token top-1 agreement of `file` with `reference` over `sequences`, and both
    perplexities: (agreement, positions, file perplexity, reference perplexity)."""
    same = total = 0
    nll = {"file": 0.0, "ref": 0.0}
    count = 0
    for sequence in sequences:
        rows = {}
        for key, runner in (("file", file), ("ref", reference)):
            runner.reset()
            rows[key] = runner.forward(sequence, 0)
            loss, n = _perplexity(rows[key], sequence)
            nll[key] += loss
        count += n
        named = ~np.isnan(rows["ref"]).any(axis=1)  # NaN logits name no token: never an agreement
        same += int(((rows["file"].argmax(axis=1) == rows["ref"].argmax(axis=1)) & named).sum())
        total += len(sequence)
    return (
        same / max(total, 1),
        total,
        math.exp(nll["file"] / max(count, 1)),
        math.exp(nll["ref"] / max(count, 1)),
    )


def random_sequences(vocab_size: int, max_seq_len: int, seed: int = 0) -> tuple[tuple[int, ...], ...]:
    count, length = RANDOM_SEQUENCES
    rng = np.random.default_rng(seed)
    return tuple(
        tuple(int(t) for t in rng.integers(0, vocab_size, min(length, max_seq_len))) for _ in range(count)
    )


def check_file(
    path: Path, fmt: DecoderFormat, model: nn.Module, info: DecoderInfo, reference: Reference,
    options: DecoderExportOptions,
) -> DecoderParity:  # fmt: skip
    """Parity of the written file (see the module doc)."""
    file = open_decoder(path)
    run = greedy(file, reference.prompt, options.new_tokens)
    match = run.tokens == reference.tokens
    parity = DecoderParity(
        prompt=reference.prompt, reference_tokens=reference.tokens, tokens=run.tokens, tokens_match=match,
        max_abs_diff=None, tolerance=None, top1_agreement=None, positions=0, min_agreement=None,
        perplexity=None, reference_perplexity=None, calibration="", passed=True,
    )  # fmt: skip
    if not fmt.quantised:
        if not match:
            first = next((i for i, (a, b) in enumerate(zip(run.tokens, reference.tokens)) if a != b), None)
            first = min(len(run.tokens), len(reference.tokens)) if first is None else first
            parity.passed = False
            parity.reason = (
                f"greedy tokens differ from transformers generate() at new token {first}: "
                f"{run.tokens} vs {reference.tokens}"
            )
            return parity
        result = compare(reference.logits, run.logits, REL_BOUNDS["fp32"], labels=["logits"])
        parity.max_abs_diff, parity.tolerance = result.max_abs_diff, result.tolerance
        parity.passed, parity.reason = result.passed, result.reason
        return parity
    sequences = options.calibration or random_sequences(info.vocab_size, options.max_seq_len)
    float_model = TorchDecoder(model, file.info)
    rate, positions, ppl, ref_ppl = agreement(file, float_model, sequences)
    parity.top1_agreement, parity.positions, parity.min_agreement = rate, positions, options.min_agreement
    parity.perplexity, parity.reference_perplexity = ppl, ref_ppl
    parity.calibration = options.calibration_source or (
        f"{len(sequences)} sequences of {len(sequences[0])} random tokens (no --calibration given)"
    )
    if rate < options.min_agreement:
        parity.passed = False
        parity.reason = (
            f"next-token top-1 agreement {rate:.3f} < {options.min_agreement} on {positions} positions"
        )
    return parity


def _prompt(info: DecoderInfo, options: DecoderExportOptions) -> list[int]:
    if options.calibration:
        return list(options.calibration[0][: options.prompt_len])
    rng = np.random.default_rng(1)
    return [int(t) for t in rng.integers(0, info.vocab_size, options.prompt_len)]


class DecoderExporter:
    """Exports one decoder to formats one at a time, against one reference generation (made once).
    With a static-cache format among `formats`, the cache is checked against the memory budget here,
    before the reference generation; `export` checks it again for any static format."""

    def __init__(
        self, model: nn.Module, options: DecoderExportOptions | None = None, formats: Sequence[str] = ()
    ) -> None:
        self.model, self.options = model.eval(), options or DecoderExportOptions()
        options = self.options
        self.info = decoder_info(model)
        window = check_sliding_window(model, options.max_seq_len)  # a short one: ConfigError
        if self.info.max_positions is not None and options.max_seq_len > self.info.max_positions:
            raise ExportError(
                f"--max-seq-len {options.max_seq_len} exceeds the model's max_position_embeddings "
                f"{self.info.max_positions}"
            )
        if any(get_decoder_format(name).static_cache for name in formats):
            self.check_static_cache()
        needed = options.prompt_len + options.new_tokens
        if needed > options.max_seq_len:
            raise ExportError(
                f"--max-seq-len {options.max_seq_len} leaves no room for the parity check's "
                f"{options.prompt_len} + {options.new_tokens} tokens; give at least {needed}"
            )
        self.notes = to_fp32(model)  # every format from fp32, judged against the fp32 reference
        self.reference = reference_generation(
            model, self.info, _prompt(self.info, options), options.new_tokens
        )
        if window is not None:  # exported with full attention, judged against the windowed reference
            self.notes.append(switch_off_sliding_window(model, window, options.max_seq_len))

    def check_static_cache(self) -> int:
        """The bytes of this export's static cache, refused over the memory budget (`check_static_cache`)."""
        params = list(self.model.parameters()) + list(self.model.buffers())
        weights = sum(p.numel() * p.element_size() for p in params)
        itemsize = params[0].element_size() if params else 4
        return check_static_cache(
            self.info.layout, self.options.max_seq_len, self.info.max_positions, weights, itemsize
        )

    def export(self, name: str, out_dir: Path, stem: str) -> DecoderExport:
        """Write `out_dir/file_name(stem)` and check it from disk; a file that fails is removed and
        VerificationError raised."""
        fmt = get_decoder_format(name)
        if fmt.static_cache:
            self.check_static_cache()
        path = Path(out_dir) / file_name(stem, fmt)
        notes = self.notes + fmt.build(self.model, self.info, self.options, path)
        try:
            parity = check_file(path, fmt, self.model, self.info, self.reference, self.options)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        if not parity.passed:
            path.unlink(missing_ok=True)
            raise VerificationError(
                f"{fmt.name}: {path.name} does not match the float model: {parity.reason}"
            )
        return DecoderExport(
            fmt.name, path, path.stat().st_size, sha256_file(path), self.options.max_seq_len,
            list(self.info.layout.heads), parity, notes,
        )  # fmt: skip


def export_decoder(
    model: nn.Module,
    formats: Sequence[str],
    out_dir: Path,
    stem: str,
    options: DecoderExportOptions | None = None,
) -> dict[str, DecoderExport]:
    """Export `model` (a transformers causal LM, dense or slim) to each format in `out_dir`, each file
    checked from disk (see `DecoderExporter.export`)."""
    names = list(dict.fromkeys(formats))
    for name in names:
        get_decoder_format(name)  # every name known before any work
    exporter = DecoderExporter(model, options, names)
    return {name: exporter.export(name, out_dir, stem) for name in names}


def float_info(model: nn.Module) -> FileInfo:
    """The FileInfo of a PyTorch decoder (for `TorchDecoder`)."""
    info = decoder_info(model)
    return FileInfo(info.vocab_size, None, info.layout.layers, info.bos_id, info.eos_ids)
