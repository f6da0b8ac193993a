"""A tiny Llama checkpoint folder with zeroed KV and FFN groups, slimmed, through export (executorch-fp32,
executorch-8da4w, onnx, onnx-int4) -> generate -> ExecuTorch's own LLM runner -> bench --task
text-generation, all through the CLI on files on disk (the session's exports: tests/decoder/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimship.cli import main
from tests.decoder.tiny import VOCAB, tiny_slim_llama

PROMPT = [5, 17, 3, 60, 42, 7]


def _json(argv: list[str], capsys) -> dict:
    capsys.readouterr()
    assert main([*argv, "--json", "-"]) == 0
    return json.loads(capsys.readouterr().out)


def _byte(token: int) -> str:
    """Token i is byte 33 + i, spelled in the byte-level alphabet of a Hugging Face BPE tokenizer."""
    byte = 33 + token
    return chr(byte) if byte <= 126 else chr(256 + 33 + byte - 127)


def write_runner_tokenizer(path: Path) -> Path:
    """A tokenizer.json ExecuTorch's runner reads whose vocabulary is the model's (VOCAB ids): token i is
    the single byte 33 + i, except the model's <s> 1 and </s> 2. The runner samples over its tokenizer's
    vocabulary, so a bigger one (a .tiktoken file: its 256 reserved special tokens come on top) makes it
    read past the logits."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {_byte(i): i for i in range(VOCAB) if i not in (1, 2)} | {"<s>": 1, "</s>": 2}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    assert tok.get_vocab_size() == VOCAB and tok.encode(_prompt_text(PROMPT)).ids == PROMPT
    tok.save(str(path))
    return path


def _prompt_text(prompt: list[int]) -> str:
    return bytes(33 + t for t in prompt).decode()


def _executorch_llm_runner(pte: Path, tmp_path: Path, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens from ExecuTorch's own LLM runner (its C++ TextLLMRunner, which reads the .pte's metadata
    methods) with a tokenizer.json of the model's vocabulary, as an app would ship the two."""
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    tokenizer = write_runner_tokenizer(tmp_path / "tokenizer.json")
    pieces: list[str] = []
    runner = TextLLMRunner(str(pte), str(tokenizer))
    config = GenerationConfig(echo=False, max_new_tokens=new_tokens, temperature=0.0, num_bos=0, num_eos=0)
    runner.generate(_prompt_text(prompt), config, token_callback=pieces.append)
    ids = {chr(33 + i): i for i in range(VOCAB) if 33 + i < 128} | {"<s>": 1, "</s>": 2}  # decoded pieces
    return [ids[piece] for piece in pieces]


@pytest.mark.slow
def test_slim_decoder_export_bench_generate(tiny_onnx: dict, tiny_pte: dict, tmp_path: Path, capsys):
    for report in (tiny_pte["report"], tiny_onnx["report"]):
        assert report["kv_heads"] == [1, 2]  # the layers keep their own KV head counts
    rows = {row["format"]: row for r in (tiny_pte["report"], tiny_onnx["report"]) for row in r["formats"]}
    for fmt in ("executorch-fp32", "onnx"):
        parity = rows[fmt]["parity"]
        assert parity["tokens_match"] and parity["passed"]
        assert parity["tokens"] == parity["reference_tokens"]
        assert parity["max_abs_diff"] <= parity["tolerance"]
    quant = rows["executorch-8da4w"]
    assert quant["parity"]["top1_agreement"] >= 0.5 and "random tokens" in quant["parity"]["calibration"]
    pte, pte4, onnx = (Path(rows[f]["path"]) for f in ("executorch-fp32", "executorch-8da4w", "onnx"))
    assert (pte, pte4, onnx) == (tiny_pte["pte"], tiny_pte["pte4"], tiny_onnx["onnx"])
    # nothing else left beside the files each export wrote
    assert {p.name for p in tiny_pte["dir"].iterdir()} == {pte.name, pte4.name}
    assert {p.name for p in tiny_onnx["dir"].iterdir()} == {onnx.name, tiny_onnx["int4"].name}
    assert pte4.stat().st_size < 0.5 * pte.stat().st_size

    # the same greedy tokens as transformers' generate() on the tiny Llama slimmed in memory, from the
    # files the slim folder exported
    model = tiny_slim_llama()
    ids = torch.tensor([PROMPT])
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    expected = expected[0, len(PROMPT) :].tolist()
    for path in (pte, onnx):
        out = _json(["generate", str(path), "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens",
                     "12"], capsys)  # fmt: skip
        assert out["tokens"] == expected, path

    assert _executorch_llm_runner(pte, tmp_path, PROMPT, 12) == expected

    dense_onnx = tiny_onnx["dense_onnx"]
    bench = ["bench", "--task", "text-generation", "--prompt-len", "8", "--new-tokens", "8", "--runs", "3",
             "--warmup", "1", "--target", "host"]  # fmt: skip
    measured = _json([*bench, str(onnx), "--dense", str(dense_onnx)], capsys)
    assert [Path(m["model"]).name for m in measured["measurements"]] == [dense_onnx.name, onnx.name]
    for m in measured["measurements"]:
        assert (
            m["decode_tok_s"]["median"] > 0 and m["prefill_tok_s"]["median"] > 0 and m["ttft_ms"]["p10"] > 0
        )
    (speedup,) = measured["decode_speedups"]
    assert speedup["pairs"] == 3 and speedup["median"] > 0
    measured = _json([*bench, str(pte), str(pte4)], capsys)
    assert len(measured["measurements"]) == 2 and measured["decode_speedups"] == []
