"""GPT-2 (transposed `Conv1D` layers, a fused `c_attn`) and tied embeddings through `slimship slim DIR`:
the slim folder loads with `load_pretrained` and generates the dense model's tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import slimship
from slimship.cli import main
from slimship.hf import LogitsOnly
from slimship.slimming.api import find_groups, zero_group
from tests.hf.folders import greedy, tiny_model, write_folder

transformers = pytest.importorskip("transformers")
PROMPT = torch.tensor([[3, 17, 42, 5, 9]])


def _zero(model, space_part: str, count: int) -> int:
    """Zero the first `count` groups of every channel space whose name holds `space_part`."""
    wrapper = LogitsOnly(model)
    found = find_groups(wrapper, (torch.arange(8).unsqueeze(0),))
    zeroed = 0
    with torch.no_grad():
        for space, indices in found.by_space.items():
            if space_part in space:
                for i in indices[:count]:
                    zero_group(wrapper, found.groups[i])
                    zeroed += 1
    return zeroed


def _gpt2(space_part: str, count: int):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    model = transformers.GPT2LMHeadModel(config).eval()
    assert _zero(model, space_part, count) > 0
    return model


def _slim(src: Path, out: Path, capsys) -> dict:
    capsys.readouterr()
    assert main(["slim", str(src), "--out", str(out), "--json", "-"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(("space", "count"), [("mlp", 40), ("attn", 1)])
def test_gpt2_slims_and_generates_the_dense_tokens(space: str, count: int, tmp_path: Path, capsys) -> None:
    dense = _gpt2(space, count)
    expected = greedy(dense, PROMPT)
    src = write_folder(dense, tmp_path / "dense")
    report = _slim(src, tmp_path / "slim", capsys)
    slim = slimship.load_pretrained(tmp_path / "slim")
    assert type(slim) is type(dense)
    assert torch.equal(greedy(slim, PROMPT), expected)
    assert report["weight_bytes_after"] < report["weight_bytes_before"]
    for block in slim.transformer.h:
        if space == "mlp":  # each layer lost 40 of its 256 FFN channels
            assert block.mlp.c_fc.nf == block.mlp.c_fc.weight.shape[1] == 256 - 40
            assert block.mlp.c_proj.nx == 256 - 40
        else:  # one head of 4 (16 wide) from q, k and v of the fused c_attn
            assert block.attn.split_size == 48 and block.attn.num_heads == 3
            assert block.attn.c_attn.nf == 3 * 48 and block.attn.c_proj.nx == 48
    assert slim.lm_head.weight is slim.transformer.wte.weight


def test_tied_embeddings_are_written_once(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=2048,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    dense = transformers.Qwen2ForCausalLM(config).eval()
    assert _zero(dense, "mlp", 16) > 0
    expected = greedy(dense, PROMPT)
    src = write_folder(dense, tmp_path / "dense")
    report = _slim(src, tmp_path / "slim", capsys)

    dense_file, slim_file = src / "model.safetensors", tmp_path / "slim" / "model.safetensors"
    assert slim_file.stat().st_size < dense_file.stat().st_size
    assert report["weight_bytes_after"] == slim_file.stat().st_size < report["weight_bytes_before"]
    with safe_open(str(slim_file), "pt") as handle:
        keys = set(handle.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    slim = slimship.load_pretrained(tmp_path / "slim")
    assert slim.lm_head.weight is slim.model.embed_tokens.weight
    assert torch.equal(greedy(slim, PROMPT), expected)


def test_untied_heads_stay_apart(tmp_path: Path, capsys) -> None:
    dense = tiny_model("llama")  # tie_word_embeddings False: two tensors, both written
    src = write_folder(dense, tmp_path / "dense")
    _slim(src, tmp_path / "slim", capsys)
    with safe_open(str(tmp_path / "slim" / "model.safetensors"), "pt") as handle:
        assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(handle.keys())
