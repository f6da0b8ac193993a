"""A checkpoint folder through the text-generation path: `slimship slim DIR --out SLIM_DIR`, then
`slimship export SLIM_DIR --task text-generation` (the session's exports: tests/decoder/conftest.py), then
`slimship generate` from the file on disk."""

from __future__ import annotations

import json

import pytest
import torch

from slimship.cli import main
from slimship.hf import load_pretrained

PROMPT = [5, 17, 3, 60, 42, 7]


@pytest.mark.slow
def test_slim_folder_exports_with_its_cache_and_decodes_like_transformers(tiny_folders, tiny_onnx, capsys):
    onnx_file = tiny_onnx["onnx"]
    model = load_pretrained(tiny_folders["slim"])
    assert model.model.layers[0].self_attn.k_proj.out_features == 16  # one KV head left in layer 0
    ids = torch.tensor([PROMPT])
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    capsys.readouterr()
    assert main(["generate", str(onnx_file), "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens",
                 "10", "--json", "-"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["tokens"] == expected[0, len(PROMPT) :].tolist()
