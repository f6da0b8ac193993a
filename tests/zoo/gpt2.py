"""A tiny GPT-2 causal LM from ``transformers`` (random init): its Conv1D layers are ``aten.addmm`` with a
weight stored [in, out], and its attention masks with a buffer it ``detach_``es."""

from __future__ import annotations

import torch
from torch import nn

from tests.zoo._base import ZooCase, register, seeded, token_case

VOCAB = 50
TOKENS = 8


class GPT2Logits(nn.Module):
    """``GPT2LMHeadModel`` (2 layers, width 32, 2 heads) returning only the logits tensor."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=VOCAB,
            n_positions=16,
            n_embd=32,
            n_layer=2,
            n_head=2,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
            attn_implementation="eager",
        )
        self.gpt2 = GPT2LMHeadModel(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.gpt2(input_ids=input_ids).logits


@register("gpt2_lm")
def gpt2_lm() -> ZooCase:
    return token_case("gpt2_lm", seeded(GPT2Logits, 31), VOCAB, TOKENS, "gpt2")
