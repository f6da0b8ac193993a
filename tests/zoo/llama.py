"""A tiny Llama-style causal LM from ``transformers`` (random init): RMSNorm, rotary positions built from
``arange`` (integer arithmetic in the graph), grouped-query attention (``repeat_kv``: an expand then a
reshape) and a gated SiLU MLP."""

from __future__ import annotations

import torch
from torch import nn

from tests.zoo._base import ZooCase, register, seeded, token_case

VOCAB = 64
TOKENS = 8


class LlamaLogits(nn.Module):
    """``LlamaForCausalLM`` (2 layers, width 32, 4 heads of 8, 2 key/value heads) returning the logits."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
            attn_implementation="eager",
            use_cache=False,
        )
        self.llama = LlamaForCausalLM(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.llama(input_ids=input_ids, use_cache=False).logits


@register("llama_lm")
def llama_lm() -> ZooCase:
    return token_case("llama_lm", seeded(LlamaLogits, 37), VOCAB, TOKENS, "llama")
