"""Decoders in their own dtype: a tiny Llama in bf16 and fp16 slims exactly without an upcast, a wrong
removal is still caught at the dtype's bound, buffers the forward does not read stay as they were, and
nothing is copied (keep) or the dense tensors are swapped out of the model (release_source)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from slimship import slim
from slimship.compare import rounding_bound
from slimship.slimming import api
from slimship.slimming.verify import verify_bound

FFN = 64
ZEROED = [1, 5, 6, 20, 33, 40, 63]  # FFN channels zeroed in every layer
UP = "model.layers.{}.mlp.up_proj.weight"


def tiny_llama(dtype: torch.dtype, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=FFN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=32,
        use_cache=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # unit-scale signals (as trained), so that every channel matters
            if p.dim() == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
        model.to(dtype)
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[ZEROED] = 0
    return model


def tokens() -> tuple[torch.Tensor]:
    return (torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1)),)


def logits(model: nn.Module, inputs: tuple[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs).logits


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_decoder_slims_exactly_in_its_own_dtype(dtype) -> None:
    model, inputs = tiny_llama(dtype), tokens()
    dense = logits(model, inputs)
    result = slim(model, inputs)
    check = result.report.verification
    assert check.passed and result.report.excluded_spaces == []
    assert check.tolerance > 1e-5  # the dtype's rounding, not fp32's bound
    assert {p.dtype for p in result.model.parameters()} == {dtype}
    assert result.model.get_parameter(UP.format(0)).shape[0] == FFN - len(ZEROED)
    bound = check.tolerance * dense.abs().max()
    torch.testing.assert_close(result.model(*inputs).logits, dense, rtol=0, atol=bound)
    assert {p.dtype for p in model.parameters()} == {dtype}  # the source is untouched too


def _wrong_removal(monkeypatch, space_weight: str) -> None:
    """Make every plan also remove one live (non-zero) FFN channel of the layer owning `space_weight`."""
    real = api.make_plan

    def plan_with_a_wrong_removal(g, va, merge=True, fold=True):
        plan = real(g, va, merge=merge, fold=fold)
        node = next(n for n in g.gm.graph.nodes if n.op == "get_attr" and n.target == space_weight)
        comps = g.component[g.layouts[node][0]]
        live = [int(c) for c in comps if not plan.removed[c] and not g.pinned[c]]
        plan.removed[live[0]] = True
        plan.__post_init__()
        return plan

    monkeypatch.setattr(api, "make_plan", plan_with_a_wrong_removal)


@pytest.mark.parametrize("release", [False, True])
def test_a_wrong_removal_in_bf16_is_caught(monkeypatch, caplog, release) -> None:
    model, inputs = tiny_llama(torch.bfloat16), tokens()
    dense = logits(model, inputs)
    _wrong_removal(monkeypatch, UP.format(1))
    with caplog.at_level(logging.WARNING, logger="slimship.slimming.api"):
        result = slim(model, inputs, release_source=release)
    assert result.report.excluded_spaces == ["model.layers.1.mlp.gate_proj.weight[0]"]
    assert any("did not verify" in r.getMessage() for r in caplog.records)
    # the other layer is still slimmed; the wrongly slimmed one is back to its dense width
    assert result.model.get_parameter(UP.format(0)).shape[0] == FFN - len(ZEROED)
    assert result.model.get_parameter(UP.format(1)).shape[0] == FFN
    out = result.model(*inputs).logits
    assert (out - dense).abs().max() <= result.report.verification.tolerance * dense.abs().max()
    if release:  # the dense tensors came back from their spill files into the model too
        torch.testing.assert_close(logits(model, inputs), out, rtol=0, atol=0)


def test_buffers_the_forward_does_not_read_stay_as_they_were() -> None:
    model, inputs = tiny_llama(torch.float32), tokens()
    rotary = model.model.rotary_emb
    unread = rotary.original_inv_freq.clone()
    assert "original_inv_freq" not in {
        str(n.target).rsplit(".", 1)[-1] for n in slim(model, inputs).model.graph.nodes if n.op == "get_attr"
    }
    result = slim(model, inputs)
    kept = result.model.get_buffer("model.rotary_emb.original_inv_freq")
    assert torch.equal(kept, unread) and torch.equal(rotary.original_inv_freq, unread)


def test_slim_copies_no_weight_and_leaves_the_model_intact() -> None:
    model, inputs = tiny_llama(torch.bfloat16), tokens()
    before = {name: (p.data_ptr(), p.clone()) for name, p in model.named_parameters()}
    result = slim(model, inputs)
    slim_params = dict(result.model.named_parameters())
    for name, (ptr, value) in before.items():
        assert model.get_parameter(name).data_ptr() == ptr and torch.equal(model.get_parameter(name), value)
        if slim_params[name].shape == value.shape:  # unchanged: the very same storage, not a copy
            assert slim_params[name].data_ptr() == ptr, name
    assert model.model.layers[0].mlp.up_proj.weight.shape[0] == FFN


def test_release_source_leaves_the_model_holding_the_slim_tensors() -> None:
    model, inputs = tiny_llama(torch.bfloat16), tokens()
    dense = logits(model, inputs)
    result = slim(model, inputs, release_source=True)
    mlp = model.model.layers[0].mlp
    assert mlp.up_proj.weight is result.model.get_parameter(UP.format(0))
    assert mlp.up_proj.out_features == mlp.down_proj.in_features == FFN - len(ZEROED)
    bound = result.report.verification.tolerance * dense.abs().max()
    assert (logits(model, inputs) - dense).abs().max() <= bound  # the model's own forward runs slim
    assert result.apply_to(model, inputs) is model  # nothing to copy, and it verifies


def test_verify_bound_is_fp32s_rtol_and_widens_with_precision_and_depth() -> None:
    assert verify_bound(1e-5, "float32", 100) == 1e-5
    assert rounding_bound("bfloat16", 100) > rounding_bound("float16", 100) > rounding_bound("float32", 100)
    assert rounding_bound(torch.bfloat16, 400) == 2 * rounding_bound("bfloat16", 100)
    with pytest.raises(ValueError, match="int8"):
        rounding_bound("int8", 10)
