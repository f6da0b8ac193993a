"""A decoder with its default cache settings traces: `for_tracing` views it as token ids -> logits."""

from __future__ import annotations

import torch
from torch import nn

import slimship
from slimship.hf import example_ids, for_tracing, is_cached_decoder
from tests.hf.folders import greedy, tiny_model


def test_slim_a_cached_decoder_in_python_and_apply_to_it() -> None:
    model = tiny_model("qwen2", seed=4)
    assert model.config.use_cache and is_cached_decoder(model)  # its forward returns a DynamicCache
    prompt = torch.tensor([[7, 3, 50, 21]])
    expected = greedy(model, prompt)
    ids = example_ids(model.config)
    result = slimship.slim(for_tracing(model), ids)
    names = {layer.name for layer in result.report.layers}
    assert "model.layers.0.mlp.down_proj.weight" in names  # the model's own tensor names
    result.apply_to(model, ids)
    assert result.params_after < result.params_before
    assert sum(p.numel() for p in model.parameters()) == result.params_after
    assert torch.equal(greedy(model, prompt), expected)


def test_other_models_are_traced_as_they_are() -> None:
    plain = nn.Linear(3, 2)
    assert for_tracing(plain) is plain and not is_cached_decoder(plain)
    model = tiny_model("llama", fraction=0.0)
    model.config.use_cache = False
    assert for_tracing(model) is model
