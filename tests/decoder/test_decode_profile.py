"""`bench --task text-generation --profile`: per-layer rows of one decode step, dense vs slim, from files on
disk (onnxruntime's profiler with layers named by module; ExecuTorch's ETDump kernels); the files are the
session's exports of the tiny Llama's checkpoint folders (tests/decoder/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimship.cli import main
from slimship.hf import load_pretrained


def _bench(dense: Path, slim: Path, capsys) -> dict:
    argv = ["bench", "--task", "text-generation", str(slim), "--dense", str(dense), "--prompt-len", "6",
            "--new-tokens", "4", "--runs", "2", "--warmup", "1", "--target", "mobile-1t",
            "--profile"]  # fmt: skip
    capsys.readouterr()
    assert main([*argv, "--json", "-"]) == 0
    return json.loads(capsys.readouterr().out)


def test_onnx_decode_profile_names_each_projection_and_its_flops_ratio(tiny_folders, tiny_onnx, capsys):
    widths = {n: p.shape for n, p in load_pretrained(tiny_folders["slim"]).named_parameters()}
    for key, op in (("onnx", "MatMul"), ("int4", "MatMulNBits")):
        result = _bench(tiny_onnx[f"dense_{key}"], tiny_onnx[key], capsys)
        (profile,) = result["profiles"]
        assert profile["runtime"] == "onnxruntime" and "decode step at position 6" in profile["note"]
        rows = {r["layer"]: r for r in profile["rows"]}
        for layer in range(2):
            for proj in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj", "mlp.down_proj"):
                row = rows[f"model.layers.{layer}.{proj}"]
                assert row["op"] == op and row["dense_ms"] > 0 and row["slim_ms"] > 0
        # one token in: a projection's FLOPs ratio is its weight's size ratio (dense 128 FFN, 2 KV heads)
        ffn0 = widths["model.layers.0.mlp.up_proj.weight"][0]
        assert rows["model.layers.0.mlp.up_proj"]["flops_ratio"] == pytest.approx(128 / ffn0)
        assert rows["model.layers.0.self_attn.k_proj"]["flops_ratio"] == pytest.approx(2.0)  # 2 -> 1 head
        assert rows["model.layers.1.self_attn.k_proj"]["flops_ratio"] == pytest.approx(1.0)
        assert rows["lm_head"]["flops_ratio"] == pytest.approx(1.0)
        assert abs(sum(r["share"] for r in profile["rows"]) - 1.0) < 1e-6


@pytest.mark.slow
def test_executorch_decode_profile_times_each_xnnpack_kernel(tiny_pte, capsys):
    result = _bench(tiny_pte["dense_pte"], tiny_pte["pte"], capsys)
    (profile,) = result["profiles"]
    layers = {r["layer"] for r in profile["rows"]}
    assert profile["runtime"] == "executorch"
    # 7 linear layers per decoder layer, 2 layers, and lm_head: one XNNPACK fully-connected kernel each
    assert {f"Fully Connected #{i}" for i in range(1, 16)} <= layers
    assert "Fully Connected #16" not in layers
