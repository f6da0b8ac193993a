"""A decoder with its KV cache as one exportable module, sized layer by layer from the key states.

A slim decoder's layers keep their own KV head counts (and FFN widths), so a cache sized from one
config does not fit. `kv_layout` runs the model once on two tokens with a dynamic cache and reads every
layer's key and value shapes; the two wrappers below size their caches from that layout:

- `StaticKVDecoder` (ExecuTorch): `forward(tokens[1, S], input_pos[1]) -> logits[1, S, V]`, the calling
  convention of ExecuTorch's LLM runner; the cache is a set of mutable buffers of `max_seq_len` slots.
- `PastKVDecoder` (ONNX): `forward(input_ids[1, S], position_ids[1, S], past) -> (logits, *present)`,
  past and present keys/values as explicit tensors of a dynamic length (the optimum/onnxruntime-genai
  naming: `past_key_values.{i}.key|value` in, `present.{i}.key|value` out).

Both call the Hugging Face causal LM itself (`model(input_ids=..., position_ids=..., cache=...)`), so any
decoder whose attention reads its head count from the projected tensor (Llama, Qwen2, Mistral, Phi-3 ...)
keeps its exact numerics.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, StaticCache

from slimship.budget import check_bytes, human
from slimship.errors import ExportError, first_line

#: copies of a static KV cache an ExecuTorch export holds at once, roughly: the module's buffers, the
#: exported and lowered programs' copies, the runtime's planned memory when the file is read back
STATIC_CACHE_COPIES = 3
#: copies of the weights it holds (the model, the lowered program, the file read back)
WEIGHT_COPIES = 3


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """Per layer: KV heads, key head size and value head size (a slim layer keeps its own)."""

    heads: tuple[int, ...]
    key_dims: tuple[int, ...]
    value_dims: tuple[int, ...]

    @property
    def layers(self) -> int:
        return len(self.heads)

    def slots_bytes(self, max_seq_len: int, itemsize: int = 4) -> int:
        """Bytes of a static cache of `max_seq_len` slots (batch 1)."""
        per_slot = sum(
            h * (k + v) for h, k, v in zip(self.heads, self.key_dims, self.value_dims, strict=True)
        )
        return per_slot * max_seq_len * itemsize


def check_static_cache(
    layout: KVLayout, max_seq_len: int, max_positions: int | None, weight_bytes: int, itemsize: int = 4
) -> int:
    """Refuse a static cache of `max_seq_len` slots (batch 1) beyond the model's positions or, with the
    export's working set, beyond the memory budget, before anything is allocated; returns its bytes."""
    if max_positions is not None and max_seq_len > max_positions:
        raise ExportError(
            f"--max-seq-len {max_seq_len} exceeds the model's max_position_embeddings {max_positions}"
        )
    cache = layout.slots_bytes(max_seq_len, itemsize)
    what = (
        f"the static KV cache ({human(cache)}: {layout.layers} layers x K,V x KV heads x head size x "
        f"{max_seq_len} slots x {itemsize} bytes) with the export's working set ({STATIC_CACHE_COPIES} "
        f"copies of it, {WEIGHT_COPIES} of the {human(weight_bytes)} of weights)"
    )
    check_bytes(
        f"--max-seq-len {max_seq_len}", what, cache * STATIC_CACHE_COPIES + weight_bytes * WEIGHT_COPIES
    )
    return cache


@dataclasses.dataclass(frozen=True)
class DecoderInfo:
    """What a runner needs to know of a decoder: vocabulary, cache layout, special tokens."""

    vocab_size: int
    layout: KVLayout
    bos_id: int | None
    eos_ids: tuple[int, ...]
    max_positions: int | None  # the model's own position limit (config.max_position_embeddings)


def _cache_of(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list | tuple) else (int(value),)


@torch.no_grad()
def kv_layout(model: nn.Module) -> KVLayout:
    """Each layer's KV heads and head sizes, read from a dynamic cache after a two-token forward."""
    try:
        output = model(input_ids=torch.zeros(1, 2, dtype=torch.long), use_cache=True)
    except Exception as exc:
        raise ExportError(
            f"text-generation: the model does not run as a causal LM with a cache "
            f"(model(input_ids=..., use_cache=True) failed: {type(exc).__name__}: {first_line(exc)}); "
            "give a Hugging Face causal LM (e.g. LlamaForCausalLM)"
        ) from exc
    cache = _cache_of(output)
    layers = getattr(cache, "layers", None)
    if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
        raise ExportError(
            f"text-generation: {type(model).__name__} returned no per-layer KV cache "
            f"({type(cache).__name__}); only decoders with a transformers Cache are supported"
        )
    return KVLayout(
        heads=tuple(int(layer.keys.shape[1]) for layer in layers),
        key_dims=tuple(int(layer.keys.shape[-1]) for layer in layers),
        value_dims=tuple(int(layer.values.shape[-1]) for layer in layers),
    )


def decoder_info(model: nn.Module) -> DecoderInfo:
    """Vocabulary, cache layout and special tokens of a Hugging Face causal LM."""
    config = getattr(model, "config", None)
    if config is None:
        raise ExportError(
            f"text-generation: {type(model).__name__} has no .config; give a transformers causal LM"
        )
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    generation = getattr(model, "generation_config", None)
    bos = getattr(generation, "bos_token_id", None) if generation is not None else None
    eos = getattr(generation, "eos_token_id", None) if generation is not None else None
    bos = getattr(text, "bos_token_id", None) if bos is None else bos
    eos = getattr(text, "eos_token_id", None) if eos is None else eos
    bos_ids = _ids(bos)
    return DecoderInfo(
        vocab_size=int(text.vocab_size),
        layout=kv_layout(model),
        bos_id=bos_ids[0] if bos_ids else None,
        eos_ids=_ids(eos),
        max_positions=getattr(text, "max_position_embeddings", None),
    )


class StaticKVDecoder(nn.Module):
    """`forward(tokens[1, S], input_pos[1]) -> logits[1, S, V]` over a static cache of `max_seq_len` slots
    per layer, each layer sized by `layout` (ExecuTorch's LLM runner convention: `input_pos` holds the
    position of the first token; a prompt is one call, each new token another)."""

    def __init__(self, model: nn.Module, layout: KVLayout, max_seq_len: int) -> None:
        super().__init__()
        self.model = model
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.cache = StaticCache(config=config, max_cache_len=max_seq_len)
        if len(self.cache.layers) != layout.layers:
            raise ExportError(
                f"text-generation: the config makes {len(self.cache.layers)} cache layers, the model "
                f"{layout.layers}"
            )
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        for layer, heads, k_dim, v_dim in zip(
            self.cache.layers, layout.heads, layout.key_dims, layout.value_dims, strict=True
        ):
            layer.lazy_initialization(
                torch.zeros(1, heads, 0, k_dim, dtype=dtype, device=device),
                torch.zeros(1, heads, 0, v_dim, dtype=dtype, device=device),
            )
        for i, layer in enumerate(self.cache.layers):  # buffers: torch.export sees them as mutable state
            self.register_buffer(f"key_cache_{i}", layer.keys, persistent=False)
            self.register_buffer(f"value_cache_{i}", layer.values, persistent=False)
            self.register_buffer(f"cache_length_{i}", layer.cumulative_length, persistent=False)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        for layer in self.cache.layers:  # the runner says where the tokens go: no hidden state across calls
            layer.cumulative_length.copy_(input_pos[0])
        positions = (torch.arange(tokens.shape[1], device=tokens.device) + input_pos[0]).unsqueeze(0)
        out = self.model(input_ids=tokens, position_ids=positions, cache=self.cache, use_cache=True)
        return out.logits


def past_names(layers: int) -> tuple[list[str], list[str]]:
    """ONNX input names of the past keys/values and output names of the present ones, layer by layer."""
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return past, [name.replace("past_key_values", "present") for name in past]


class PastKVDecoder(nn.Module):
    """`forward(input_ids[1, S], position_ids[1, S], past) -> (logits[1, S, V], *present)`: the cache as
    tensors of dynamic length in and out (`past`: key, value of layer 0, key, value of layer 1, ...)."""

    def __init__(self, model: nn.Module, layout: KVLayout) -> None:
        super().__init__()
        self.model = model
        self.layers = layout.layers

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, past: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, ...]:
        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, position_ids=position_ids, cache=cache, use_cache=True)
        present: list[torch.Tensor] = []
        for layer in _cache_of(out).layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)
