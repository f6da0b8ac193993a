"""A tiny BERT encoder from ``transformers`` (random init) wrapped to take token ids and return a tensor.

The eager attention implementation (explicit matmul + softmax) is used: it exports with
``torch.export.export(strict=False)`` and keeps the head split visible as view/transpose ops.
"""

from __future__ import annotations

import torch
from torch import nn

from tests.zoo._base import ZooCase, register, seeded, token_case

VOCAB = 100
TOKENS = 12


class BertClassifier(nn.Module):
    """``BertForSequenceClassification`` returning only the logits tensor."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=32,
            type_vocab_size=2,
            num_labels=3,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            attn_implementation="eager",
        )
        self.bert = BertForSequenceClassification(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).logits


@register("bert_seqcls")
def bert_seqcls() -> ZooCase:
    return token_case("bert_seqcls", seeded(BertClassifier, 13), VOCAB, TOKENS, "bert", with_mask=True)
