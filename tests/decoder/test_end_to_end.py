"""A tiny Llama with zeroed KV and FFN groups, slimmed, through export (executorch-fp32, executorch-8da4w,
onnx) -> bench --task text-generation -> generate, all through the CLI on files on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimship.cli import main
from tests.decoder.tiny import tiny_slim_llama

PROMPT = [5, 17, 3, 60, 42, 7]


def _json(argv: list[str], capsys) -> dict:
    capsys.readouterr()
    assert main([*argv, "--json", "-"]) == 0
    return json.loads(capsys.readouterr().out)


def _executorch_llm_runner(pte: Path, tmp_path: Path, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens from ExecuTorch's own LLM runner (its C++ TextLLMRunner, which reads the .pte's metadata
    methods), with a tiktoken file whose token i is the single byte 33 + i."""
    import base64

    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    vocab = tmp_path / "bytes.tiktoken"
    vocab.write_text("".join(f"{base64.b64encode(bytes([33 + i])).decode()} {i}\n" for i in range(96)))
    pieces: list[str] = []
    runner = TextLLMRunner(str(pte), str(vocab))
    config = GenerationConfig(echo=False, max_new_tokens=new_tokens, temperature=0.0, num_bos=0, num_eos=0)
    runner.generate("".join(chr(33 + t) for t in prompt), config, token_callback=pieces.append)
    return [ord(c) - 33 for c in "".join(pieces)]


@pytest.mark.slow
def test_slim_decoder_export_bench_generate(tmp_path: Path, capsys):
    slim_dir, dense_dir = tmp_path / "slim", tmp_path / "dense"
    export = ["export", "--task", "text-generation", "--max-seq-len", "48"]
    result = _json([*export, "--model", "tests.decoder.tiny:tiny_slim_llama", "--out", str(slim_dir),
                    "--format", "executorch-fp32", "executorch-8da4w", "onnx"], capsys)  # fmt: skip
    assert result["kv_heads"] == [1, 2]  # the layers keep their own KV head counts
    rows = {row["format"]: row for row in result["formats"]}
    for fmt in ("executorch-fp32", "onnx"):
        parity = rows[fmt]["parity"]
        assert parity["tokens_match"] and parity["passed"]
        assert parity["tokens"] == parity["reference_tokens"]
        assert parity["max_abs_diff"] <= parity["tolerance"]
    quant = rows["executorch-8da4w"]
    assert quant["parity"]["top1_agreement"] >= 0.5 and "random tokens" in quant["parity"]["calibration"]
    pte, pte4, onnx = (Path(rows[f]["path"]) for f in ("executorch-fp32", "executorch-8da4w", "onnx"))
    assert {p.name for p in slim_dir.iterdir()} == {pte.name, pte4.name, onnx.name}  # nothing else left
    assert pte4.stat().st_size < 0.5 * pte.stat().st_size

    # the same greedy tokens as transformers' generate() on the slim model, from the files on disk
    model = tiny_slim_llama()
    ids = torch.tensor([PROMPT])
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    expected = expected[0, len(PROMPT) :].tolist()
    for path in (pte, onnx):
        out = _json(["generate", str(path), "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens",
                     "12"], capsys)  # fmt: skip
        assert out["tokens"] == expected, path

    assert _executorch_llm_runner(pte, tmp_path, PROMPT, 12) == expected

    _json([*export, "--model", "tests.decoder.tiny:tiny_zeroed_llama", "--out", str(dense_dir), "--format",
           "onnx"], capsys)  # fmt: skip
    dense_onnx = dense_dir / "tiny_zeroed_llama.onnx"
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
