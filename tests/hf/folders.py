"""Tiny Hugging Face checkpoint folders (random init from tiny configs, fp32) with channel groups zeroed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from slimship import zero_random_groups
from slimship.hf import LogitsOnly, example_ids

transformers = __import__("pytest").importorskip("transformers")

SIZES = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}

#: architecture -> its tiny config (Qwen2 has q/k/v biases; Gemma ties its embeddings and scales them;
#: Phi-3 fuses q/k/v and gate/up and splits them at sizes read from the config)
CONFIGS: dict[str, Callable[[], Any]] = {
    "llama": lambda: transformers.LlamaConfig(**SIZES),
    "qwen2": lambda: transformers.Qwen2Config(**SIZES),
    "gemma": lambda: transformers.GemmaConfig(**SIZES, head_dim=8),
    "phi3": lambda: transformers.Phi3Config(**SIZES, pad_token_id=0, bos_token_id=1, eos_token_id=1),
}
MODELS = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "phi3": "Phi3ForCausalLM",
}


def tiny_model(arch: str, seed: int = 0, fraction: float = 0.3) -> Any:
    """A random tiny causal LM of `arch` in eval mode, with a `fraction` of its FFN channels and KV head
    groups zeroed (what a structured sparsifier leaves)."""
    torch.manual_seed(seed)
    model = getattr(transformers, MODELS[arch])(CONFIGS[arch]()).eval()
    if fraction:
        ids = example_ids(model.config)
        assert zero_random_groups(LogitsOnly(model), (ids,), fraction=fraction, seed=seed) > 0
    return model


def write_folder(model: Any, folder: Path, shard_bytes: int | None = None) -> Path:
    """`save_pretrained(safe_serialization=True)`, sharded when `shard_bytes` is given."""
    shard = shard_bytes if shard_bytes is not None else "5GB"
    model.save_pretrained(str(folder), safe_serialization=True, max_shard_size=shard)
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')  # copied as it is
    return folder


def greedy(model: Any, prompt: torch.Tensor, new_tokens: int = 8) -> torch.Tensor:
    """Greedy tokens with the model's default cache (a DynamicCache)."""
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
