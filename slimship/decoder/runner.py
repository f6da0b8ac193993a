"""Token-by-token decoding of an exported decoder (.pte, .onnx) or a PyTorch one, and greedy generation.

A runner holds one sequence's cache: `forward(tokens, start)` feeds `tokens` at positions `start ...` and
returns their logits ([len(tokens), vocab], float32); `reset()` starts a new sequence. `greedy` is the
loop every command shares: the prompt in one call (prefill), then one call per new token (decode), each
timed.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from slimship.decoder.cache import past_names
from slimship.errors import ModelFileError, SlimshipError, first_line

#: ExecuTorch LLM runner metadata methods a text-generation .pte carries (read by `PteDecoder`)
PTE_METADATA = (
    "get_max_seq_len", "get_max_context_len", "get_vocab_size", "get_n_layers", "get_bos_id", "get_eos_ids",
    "use_kv_cache", "use_sdpa_with_kv_cache", "enable_dynamic_shape",
)  # fmt: skip
#: ONNX metadata_props key holding the same facts as JSON
ONNX_METADATA_KEY = "slimship.text_generation"


@dataclasses.dataclass(frozen=True)
class FileInfo:
    """What a decoder file says of itself."""

    vocab_size: int
    max_seq_len: int | None  # total tokens the cache holds (None: the file's cache grows)
    layers: int
    bos_id: int | None
    eos_ids: tuple[int, ...]


class Decoder(Protocol):
    info: FileInfo

    def reset(self) -> None: ...

    def forward(self, tokens: Sequence[int], start: int) -> np.ndarray: ...


def _not_text_generation(path: Path, why: str) -> ModelFileError:
    return ModelFileError(
        f"{path}: not a text-generation model ({why}); export one with "
        "`slimship export MODEL --task text-generation --format executorch-fp32 onnx`"
    )


class PteDecoder:
    """A .pte with `forward(tokens[1, S], input_pos[1]) -> logits` and the LLM runner's metadata methods."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        from executorch.runtime import Runtime

        self.path = Path(path)
        if threads:
            _executorch_threads(threads)
        try:
            program = Runtime.get().load_program(str(self.path))
        except Exception as exc:
            raise ModelFileError(f"{self.path}: executorch cannot load it ({first_line(exc)})") from None
        names = set(program.method_names)
        if "use_kv_cache" not in names or "forward" not in names:
            raise _not_text_generation(self.path, "it has no use_kv_cache metadata method")
        meta = {n: program.load_method(n).execute([])[0] for n in PTE_METADATA if n in names}
        self._forward = program.load_method("forward")
        eos = meta.get("get_eos_ids", ())
        self.info = FileInfo(
            vocab_size=int(meta["get_vocab_size"]),
            max_seq_len=int(meta["get_max_seq_len"]),
            layers=int(meta.get("get_n_layers", 0)),
            bos_id=int(meta["get_bos_id"]) if "get_bos_id" in meta else None,
            eos_ids=tuple(int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])),
        )

    def reset(self) -> None:  # the cache position comes with every call: nothing to clear
        return None

    def forward(self, tokens: Sequence[int], start: int) -> np.ndarray:
        ids = torch.tensor([list(tokens)], dtype=torch.long)
        logits = self._forward.execute([ids, torch.tensor([start], dtype=torch.long)])[0]
        return logits.detach().numpy().reshape(len(tokens), -1)


def _executorch_threads(threads: int) -> None:
    """XNNPACK's thread pool in this process (ExecuTorch's portable kernels run on the calling thread)."""
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(int(threads))
    torch.set_num_threads(int(threads))


class OnnxDecoder:
    """An .onnx with past/present keys and values (`slimship.decoder.cache.PastKVDecoder`)."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads, options.inter_op_num_threads = int(threads), 1
        try:
            self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelFileError(f"{self.path}: onnxruntime cannot load it ({first_line(exc)})") from None
        raw = self._session.get_modelmeta().custom_metadata_map.get(ONNX_METADATA_KEY)
        if raw is None:
            raise _not_text_generation(self.path, f"no {ONNX_METADATA_KEY} metadata")
        meta = json.loads(raw)
        self.info = FileInfo(
            vocab_size=int(meta["vocab_size"]), max_seq_len=meta.get("max_seq_len"),
            layers=int(meta["layers"]),
            bos_id=meta.get("bos_id"), eos_ids=tuple(meta.get("eos_ids", ())),
        )  # fmt: skip
        self._past_names, self._present_names = past_names(self.info.layers)
        self._shapes = {i.name: i.shape for i in self._session.get_inputs()}
        self.input_names = list(self._shapes)
        self.reset()

    def reset(self) -> None:
        self._past = {
            name: np.zeros((1, self._shapes[name][1], 0, self._shapes[name][3]), np.float32)
            for name in self._past_names
        }

    def feeds(self, tokens: Sequence[int], start: int) -> dict[str, np.ndarray]:
        """The session's inputs for `tokens` at positions `start ...`, with the cache held so far."""
        return {
            "input_ids": np.asarray([list(tokens)], np.int64),
            "position_ids": np.arange(start, start + len(tokens), dtype=np.int64)[None],
            **self._past,
        }

    def forward(self, tokens: Sequence[int], start: int) -> np.ndarray:
        outputs = self._session.run(None, self.feeds(tokens, start))
        self._past = dict(zip(self._past_names, outputs[1:], strict=True))
        return outputs[0].reshape(len(tokens), -1)


class TorchDecoder:
    """The PyTorch model itself with a dynamic cache (the reference the files are checked against)."""

    def __init__(self, model: torch.nn.Module, info: FileInfo) -> None:
        self.model, self.info = model, info
        self.reset()

    def reset(self) -> None:
        self._cache: Any = None

    @torch.no_grad()
    def forward(self, tokens: Sequence[int], start: int) -> np.ndarray:
        ids = torch.tensor([list(tokens)], dtype=torch.long)
        positions = torch.arange(start, start + len(tokens)).unsqueeze(0)
        out = self.model(input_ids=ids, position_ids=positions, cache=self._cache, use_cache=True)
        self._cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return out.logits[0].float().numpy()


#: file suffix -> the runner that opens it
RUNNERS = {".pte": PteDecoder, ".onnx": OnnxDecoder}


def open_decoder(path: str | Path, threads: int | None = None) -> Decoder:
    """The runner of a text-generation file (.pte or .onnx); ModelFileError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    runner = RUNNERS.get(path.suffix.lower())
    if runner is None:
        raise ModelFileError(
            f"{path}: text generation runs .pte and .onnx files (got {path.suffix or 'none'})"
        )
    return runner(path, threads)


@dataclasses.dataclass
class Greedy:
    """One greedy generation: the new tokens, their logits rows, and how long each call took."""

    prompt: list[int]
    tokens: list[int]
    logits: np.ndarray  # [len(prompt) + len(tokens) - 1, vocab]: every position's next-token logits
    prefill_s: float
    step_s: list[float]


def check_room(info: FileInfo, prompt_len: int, new_tokens: int, where: str) -> None:
    """A prompt plus its new tokens must fit the file's cache and vocabulary."""
    if prompt_len < 1:
        raise SlimshipError(f"{where}: the prompt is empty; give at least one token")
    if new_tokens < 1:
        raise SlimshipError(f"{where}: the number of new tokens is {new_tokens}; give at least 1")
    total = prompt_len + new_tokens
    if info.max_seq_len is not None and total > info.max_seq_len:
        raise SlimshipError(
            f"{where}: {prompt_len} prompt + {new_tokens} new tokens = {total} exceed the file's cache of "
            f"{info.max_seq_len} (export with a larger --max-seq-len)"
        )


def check_tokens(tokens: Sequence[int], vocab_size: int, where: str) -> None:
    bad = [t for t in tokens if not 0 <= int(t) < vocab_size]
    if bad:
        raise SlimshipError(f"{where}: token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")


def greedy(decoder: Decoder, prompt: Sequence[int], new_tokens: int, *, stop_at_eos: bool = True) -> Greedy:
    """Greedy decoding: the prompt in one call, then one call per token (until an EOS id if asked)."""
    check_room(decoder.info, len(prompt), new_tokens, "generate")
    check_tokens(prompt, decoder.info.vocab_size, "prompt")
    decoder.reset()
    began = time.perf_counter()
    rows = [decoder.forward(prompt, 0)]
    prefill = time.perf_counter() - began
    tokens = [int(np.argmax(rows[-1][-1]))]
    steps: list[float] = []
    eos = set(decoder.info.eos_ids) if stop_at_eos else set()
    while len(tokens) < new_tokens and tokens[-1] not in eos:
        began = time.perf_counter()
        rows.append(decoder.forward([tokens[-1]], len(prompt) + len(tokens) - 1))
        steps.append(time.perf_counter() - began)
        tokens.append(int(np.argmax(rows[-1][-1])))
    return Greedy(list(map(int, prompt)), tokens, np.concatenate(rows), prefill, steps)
