"""The cache wrappers in eager mode: per-layer sizes from the key states, and the same greedy tokens and
logits as transformers' generate() on a slim decoder whose layers differ."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimship.decoder.cache import PastKVDecoder, StaticKVDecoder, decoder_info, kv_layout
from slimship.decoder.export import reference_generation
from slimship.decoder.runner import FileInfo, TorchDecoder, greedy
from slimship.errors import ExportError
from tests.decoder.tiny import tiny_slim_llama, tiny_zeroed_llama

PROMPT = [5, 17, 3, 60, 42, 7]


@pytest.fixture(scope="module")
def slim_model():
    return tiny_slim_llama()


class _Static:
    """StaticKVDecoder driven like the .pte (tokens + start position)."""

    def __init__(self, model, max_seq_len=32):
        self.module = StaticKVDecoder(model, kv_layout(model), max_seq_len)
        info = decoder_info(model)
        self.info = FileInfo(info.vocab_size, max_seq_len, info.layout.layers, info.bos_id, info.eos_ids)

    def reset(self):
        return None

    @torch.no_grad()
    def forward(self, tokens, start):
        return self.module(torch.tensor([list(tokens)]), torch.tensor([start]))[0].numpy()


class _Past:
    """PastKVDecoder driven like the .onnx (past tensors in, present out)."""

    def __init__(self, model):
        self.layout = kv_layout(model)
        self.module = PastKVDecoder(model, self.layout)
        info = decoder_info(model)
        self.info = FileInfo(info.vocab_size, None, info.layout.layers, info.bos_id, info.eos_ids)
        self.reset()

    def reset(self):
        self.past = tuple(
            torch.zeros(1, h, 0, d)
            for h, k, v in zip(self.layout.heads, self.layout.key_dims, self.layout.value_dims)
            for d in (k, v)
        )

    @torch.no_grad()
    def forward(self, tokens, start):
        ids = torch.tensor([list(tokens)])
        positions = torch.arange(start, start + len(tokens)).unsqueeze(0)
        logits, *present = self.module(ids, positions, self.past)
        self.past = tuple(present)
        return logits[0].numpy()


def test_layout_is_read_per_layer(slim_model):
    layout = kv_layout(slim_model)
    assert layout.heads == (1, 2)  # layer 0 lost one of its two KV groups
    assert layout.key_dims == layout.value_dims == (16, 16)
    assert kv_layout(tiny_zeroed_llama()).heads == (2, 2)
    assert layout.slots_bytes(10) == (1 + 2) * 32 * 10 * 4


@pytest.mark.parametrize("runner", [_Static, _Past])
def test_greedy_equals_generate_on_a_slim_model(slim_model, runner):
    info = decoder_info(slim_model)
    reference = reference_generation(slim_model, info, PROMPT, 12)
    run = greedy(runner(slim_model), PROMPT, 12)
    assert run.tokens == reference.tokens
    assert len(set(run.tokens)) > 2  # not a degenerate repetition
    np.testing.assert_allclose(run.logits, reference.logits, rtol=1e-4, atol=1e-4)


def test_static_cache_reused_across_sequences(slim_model):
    static = _Static(slim_model)
    first = greedy(static, PROMPT, 8).tokens
    greedy(static, [9, 9, 9, 9, 9, 9, 9, 9, 9, 9], 8)
    assert greedy(static, PROMPT, 8).tokens == first  # positions come with the call: no state leaks


def test_torch_decoder_matches_dense_and_slim_the_same():
    """The zeroed dense model and its slim version decode the same tokens (slimming is exact)."""
    dense, slim = tiny_zeroed_llama(), tiny_slim_llama()
    runs = []
    for model in (dense, slim):
        info = decoder_info(model)
        runs.append(greedy(TorchDecoder(model, FileInfo(info.vocab_size, None, 2, None, ())), PROMPT, 10))
    assert runs[0].tokens == runs[1].tokens
    np.testing.assert_allclose(runs[0].logits, runs[1].logits, rtol=1e-4, atol=1e-4)


def test_a_model_without_a_cache_is_refused():
    class NoCache(torch.nn.Module):
        config = None

        def forward(self, input_ids, use_cache=False):
            return input_ids.float()

    with pytest.raises(ExportError, match=r"no per-layer KV cache|causal LM"):
        kv_layout(NoCache())
