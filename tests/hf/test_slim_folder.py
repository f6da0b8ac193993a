"""`slimship slim DIR --out SLIM_DIR` -> `load_pretrained` -> `generate()`: the dense model's tokens."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

import slimship
from slimship.cli import main
from slimship.hf import read_folder
from tests.hf.folders import greedy, tiny_model, write_folder


def _slim_cli(src, out, capsys, *extra) -> dict:
    assert main(["slim", str(src), "--out", str(out), "--json", "-", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def _kv_rows(attention) -> int:
    if hasattr(attention, "k_proj"):
        return attention.k_proj.out_features
    return (attention.qkv_proj.out_features - attention.o_proj.in_features) // 2  # fused q, k, v


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "phi3"])
def test_slim_folder_generates_the_dense_tokens(arch, tmp_path, capsys) -> None:
    dense_model = tiny_model(arch)
    src = write_folder(dense_model, tmp_path / "dense")
    prompt = torch.tensor([[3, 17, 42, 5, 9]])
    expected = greedy(dense_model, prompt)

    report = _slim_cli(src, tmp_path / "slim", capsys)
    slim = slimship.load_pretrained(tmp_path / "slim")
    assert type(slim) is type(dense_model) and slim.dtype == torch.float32
    assert torch.equal(greedy(slim, prompt), expected)

    params = sum(p.numel() for p in slim.parameters())
    assert params == report["summary"]["params_after"] < sum(p.numel() for p in dense_model.parameters())
    assert report["weight_bytes_after"] < report["weight_bytes_before"]
    on_disk = sum(f.stat().st_size for f in (tmp_path / "slim").glob("*.safetensors"))
    assert on_disk == report["weight_bytes_after"] < sum(f.stat().st_size for f in src.glob("*.safetensors"))

    config = json.loads((tmp_path / "slim" / "config.json").read_text())
    layers = config["slimship"]["layers"]
    for i, layer in enumerate(slim.model.layers):  # the sizes written are the modules' sizes
        assert layers[f"model.layers.{i}.mlp"]["intermediate_size"] == layer.mlp.down_proj.in_features
        assert layers[f"model.layers.{i}.self_attn"]["num_key_value_heads"] * 8 == _kv_rows(layer.self_attn)
    widths = {v["intermediate_size"] for k, v in layers.items() if k.endswith(".mlp")}
    kv_heads = {v["num_key_value_heads"] for k, v in layers.items() if k.endswith(".self_attn")}
    assert max(widths) < 48 and min(kv_heads) < 2  # FFN channels and KV heads went
    assert (tmp_path / "slim" / "tokenizer_config.json").read_bytes() == (
        src / "tokenizer_config.json"
    ).read_bytes()
    sums = subprocess.run(
        ["sha256sum", "-c", "SHA256SUMS"], cwd=tmp_path / "slim", capture_output=True, text=True
    )
    assert sums.returncode == 0, sums.stdout + sums.stderr


def test_sharded_folder_stays_sharded(tmp_path, capsys) -> None:
    dense_model = tiny_model("llama", seed=1)
    src = write_folder(dense_model, tmp_path / "dense", shard_bytes=20_000)
    assert len(read_folder(src).weight_files) > 1 and read_folder(src).sharded
    _slim_cli(src, tmp_path / "slim", capsys, "--input-shape", "12")
    slim = read_folder(tmp_path / "slim")
    assert slim.sharded and len(slim.weight_files) > 1
    prompt = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(
        greedy(slimship.load_pretrained(tmp_path / "slim"), prompt), greedy(dense_model, prompt)
    )


def test_dense_folder_loads_as_it_is(tmp_path) -> None:
    dense_model = tiny_model("qwen2", fraction=0.0)
    src = write_folder(dense_model, tmp_path / "dense")
    loaded = slimship.load_pretrained(src)
    for (name, a), (_, b) in zip(dense_model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert getattr(loaded.config, "slimship", None) is None
