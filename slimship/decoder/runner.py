"""Token-by-token decoding of an exported decoder (.pte, .onnx) or a PyTorch one, and greedy generation.

A runner holds one sequence's cache: `forward(tokens, start)` feeds `tokens` at positions `start ...` and
returns their logits ([len(tokens), vocab], float32); `reset()` starts a new sequence. `greedy` is the
loop every command shares: the prompt in one call (prefill), then one call per new token (decode), each
timed. The file runners and that loop are the self-contained device runner's
(`slimship.runtimes.device_runner`), so a device decodes with the same code as this host.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from slimship.errors import ModelFileError, SlimshipError, first_line
from slimship.runtimes import device_runner

#: ONNX metadata_props key holding a text-generation file's facts as JSON
ONNX_METADATA_KEY = device_runner.ONNX_METADATA_KEY


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


class _FileDecoder:
    """A text-generation file opened by the device runner's decoder (the same code a device runs), its
    load errors as slimship's ModelFileError."""

    runtime = ""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        self.path = Path(path)
        try:
            super().__init__(str(self.path), threads)  # type: ignore[call-arg]
        except device_runner.NotTextGeneration as exc:
            raise _not_text_generation(self.path, str(exc)) from None
        except device_runner.RunnerLoadError as exc:
            raise ModelFileError(f"{self.path}: {first_line(exc).removeprefix(f'{self.path}: ')}") from None
        self.info = FileInfo(**self.meta)  # type: ignore[attr-defined]


class PteDecoder(_FileDecoder, device_runner.PteTokenDecoder):
    """A .pte with `forward(tokens[1, S], input_pos[1]) -> logits` and the LLM runner's metadata methods."""

    runtime = "executorch"


class OnnxDecoder(_FileDecoder, device_runner.OrtTokenDecoder):
    """An .onnx with past/present keys and values (`slimship.decoder.cache.PastKVDecoder`)."""

    runtime = "onnxruntime"


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
    if path.is_dir():  # e.g. a checkpoint folder: exported first
        raise ModelFileError(
            f"{path}: a folder, not a release bundle; generate takes a .pte or .onnx file (write one with "
            "`slimship export FOLDER --task text-generation`) or a release bundle"
        )
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
    eos = frozenset(decoder.info.eos_ids) if stop_at_eos else frozenset()
    prompt = [int(t) for t in prompt]
    tokens, rows, prefill, steps = device_runner.greedy_decode(decoder, prompt, new_tokens, eos)
    return Greedy(prompt, tokens, np.concatenate(rows), prefill, steps)
