"""`bench --task text-generation` on the emulated ARM64 onnxruntime target: the device runner's greedy loop
under qemu, on the ARM64 build of onnxruntime (timings labelled emulated, never device timings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimship.cli import main
from slimship.decoder import DecoderExportOptions, export_decoder
from slimship.decoder.runner import greedy, open_decoder
from slimship.runtimes.arm64_provision import prepare_arm64
from tests.decoder.tiny import tiny_slim_llama, tiny_zeroed_llama


@pytest.mark.slow
def test_decode_bench_on_emulated_arm64_generates_what_this_host_does(tmp_path: Path, capsys) -> None:
    prepare_arm64(runtimes=["onnxruntime"], progress=False)  # cached after the first session
    options = DecoderExportOptions(max_seq_len=32, prompt_len=4, new_tokens=4)
    files = []
    for name, model in (("dense", tiny_zeroed_llama()), ("slim", tiny_slim_llama())):
        (tmp_path / name).mkdir()
        files.append(export_decoder(model, ["onnx"], tmp_path / name, "llama", options)["onnx"].path)
    dense, slim = files
    argv = ["bench", "--task", "text-generation", str(slim), "--dense", str(dense), "--prompt-len", "5",
            "--new-tokens", "5", "--runs", "2", "--warmup", "0",
            "--target", "arm64-emu-onnxruntime"]  # fmt: skip
    capsys.readouterr()
    assert main([*argv, "--json", "-"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["where"] == "emulated ARM64 (qemu; not device timings)"
    for m in result["measurements"]:  # ARM64 kernels, the same greedy tokens as x86 onnxruntime here
        assert m["tokens"] == greedy(open_decoder(m["model"]), result["prompt"], 5, stop_at_eos=False).tokens
        assert m["decode_tok_s"]["median"] > 0
    assert result["decode_speedups"][0]["pairs"] == 2
