"""A text-generation release from files on disk, all through the CLI: a tiny Llama checkpoint folder (zeroed
FFN channels and KV heads, a tokenizer trained here) -> slim -> export (executorch-fp32, executorch-8da4w,
onnx) -> bench --task text-generation -> release --task text-generation -> verify -> generate --prompt."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from slimship._util import sha256_file
from slimship.cli import main
from slimship.hf import load_pretrained

TEXT = "the slim model writes"


def _json(argv: list[str], capsys) -> dict:
    capsys.readouterr()
    assert main([*argv, "--json", "-"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _fails(argv: list[str], capsys, code: int, *needles: str) -> str:
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def _generate(model, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


@pytest.fixture
def exported(tiny_folders: dict, tiny_onnx: dict, tiny_pte: dict, tmp_path: Path) -> dict[str, Path]:
    """The dense folder, the slim folder and its three files, and the dense model's .onnx (the session's
    exports, tests/decoder/conftest.py); `root`: this test's own folder for what it writes."""
    return {"dense": tiny_folders["dense"], "slim": tiny_folders["slim"], "pte": tiny_pte["pte"],
            "pte4": tiny_pte["pte4"], "onnx": tiny_onnx["onnx"], "dense_onnx": tiny_onnx["dense_onnx"],
            "root": tmp_path}  # fmt: skip


def _release_argv(files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "release", str(files["slim"]), "--task", "text-generation", "--name", "tiny", "--version", "1.0.0",
        "--files", str(files["pte"]), str(files["pte4"]), str(files["onnx"]),
        "--dense", str(files["dense_onnx"]), "--prompt-len", "8", "--new-tokens", "8", "--runs", "2",
        "--warmup", "1", "--out", str(out), *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_slim_decoder_release_verifies_and_generates_text(exported: dict[str, Path], capsys):
    files, out = exported, exported["root"] / "releases"
    slim_model = load_pretrained(files["slim"]).eval()
    assert files["pte4"].stat().st_size < 0.5 * files["pte"].stat().st_size

    bench = ["bench", "--task", "text-generation", "--prompt-len", "8", "--new-tokens", "8", "--runs", "2",
             "--warmup", "1"]  # fmt: skip
    measured = _json([*bench, str(files["onnx"]), "--dense", str(files["dense_onnx"])], capsys)
    assert measured["decode_speedups"][0]["pairs"] == 2

    # a failing gate publishes nothing and names the gate
    _fails(_release_argv(files, out, "--max-ms-per-token", "1e-9"), capsys, 3, "max_ms_per_token", "failed",
           "nothing was published")  # fmt: skip
    assert not out.exists() or not any(out.iterdir())

    gates = ["--min-token-agreement", "0.3", "--min-decode-speedup", "0.01"]
    result = _json(_release_argv(files, out, *gates), capsys)
    bundle = Path(result["bundle"]["bundle_dir"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    section = manifest["text_generation"]
    assert manifest["task"] == "text-generation"

    # the reference is transformers generate() on the slim model, and the fp32 files decode it exactly
    ref = section["reference"]
    assert ref["tokens"] == _generate(slim_model, ref["prompt"], len(ref["tokens"]))
    listed = {f["path"]: f for f in manifest["files"]}
    for fmt in ("executorch-fp32", "onnx"):
        entry = section["files"][fmt]
        assert entry["tokens"] == ref["tokens"] and not entry["quantised"]
        assert listed[entry["path"]]["sha256"] == sha256_file(files["pte" if fmt != "onnx" else "onnx"])
    quant = section["files"]["executorch-8da4w"]
    assert quant["quantised"] and quant["token_agreement"] >= 0.3 and quant["min_token_agreement"] == 0.3
    assert section["files"]["onnx"]["decode"]["decode_speedup"]["pairs"] == 2
    assert section["files"]["executorch-fp32"]["decode"]["decode_speedup"] is None  # no dense .pte given
    gates = {(g["gate"], g.get("subject", "")): g["status"] for g in manifest["gates"]}
    assert gates[("min_token_agreement", "host/executorch-8da4w")] == "passed"
    assert gates[("min_decode_speedup", "host/onnx")] == "passed"

    # tokenizer and generation settings copied byte for byte, each checksummed
    copied = {name for name, f in listed.items() if f["role"] in ("tokenizer", "generation-config")}
    assert copied == {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}
    for name in copied:
        assert listed[name]["sha256"] == sha256_file(files["dense"] / name) == sha256_file(bundle / name)
    card = (bundle / "MODEL_CARD.md").read_text()
    assert "Decoding speed" in card and "host" in card and "tokenizer.json" in card

    # the same greedy tokens as transformers from the files on disk (generate FILE) ...
    prompt = [5, 17, 3, 60, 42, 7]
    expected = _generate(slim_model, prompt, 12)
    for path in (files["pte"], files["onnx"]):
        assert _json(["generate", str(path), "--prompt-ids", "5,17,3,60,42,7", "--max-new-tokens", "12"],
                     capsys)["tokens"] == expected  # fmt: skip
    # ... and text through the bundle's tokenizer (generate BUNDLE --prompt)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(files["slim"]), local_files_only=True)
    ids = tokenizer.encode(TEXT)
    said = _json(["generate", str(bundle), "--prompt", TEXT, "--max-new-tokens", "6"], capsys)
    assert said["prompt"] == ids and said["tokens"] == _generate(slim_model, ids, 6)[: len(said["tokens"])]
    assert said["text"] == tokenizer.decode(said["tokens"], skip_special_tokens=True)
    assert len(said["text"].split()) == len([t for t in said["tokens"] if t > 2]) > 0  # every word decodes
    assert Path(said["model"]).name == "model.fp32.pte"
    tar = _json(["generate", str(bundle) + ".tar.gz", "--prompt", TEXT, "--max-new-tokens", "6", "--format",
                 "onnx"], capsys)  # fmt: skip
    assert tar["tokens"] == said["tokens"]

    checked = _json(["verify", str(bundle)], capsys)
    assert set(checked["replay"]) == {"executorch-fp32", "executorch-8da4w", "onnx"}
    assert all(c["ok"] for c in checked["replay"].values())

    # tampering: a tokenizer byte, or a stored token, fails verify naming the file
    bad = exported["root"] / "tampered-tokenizer" / bundle.name
    shutil.copytree(bundle, bad)
    data = bytearray((bad / "tokenizer.json").read_bytes())
    data[10] ^= 1
    (bad / "tokenizer.json").write_bytes(bytes(data))
    _fails(["verify", str(bad)], capsys, 2, "slimship: error:", "tokenizer.json", "sha256")

    bad = exported["root"] / "tampered-token" / bundle.name
    shutil.copytree(bundle, bad)
    edited = json.loads((bad / "manifest.json").read_text())
    tokens = edited["text_generation"]["reference"]["tokens"]
    tokens[1] = (tokens[1] + 1) % 96
    (bad / "manifest.json").write_text(json.dumps(edited))
    _fails(["verify", str(bad)], capsys, 2, "slimship: error:", "model.fp32.pte", "model.onnx", "new token 1")

    # a released version is never overwritten
    _fails(_release_argv(files, out), capsys, 2, "already exists")


def test_text_needs_a_tokenizer(tmp_path: Path, capsys):
    pte = tmp_path / "slim.fp32.pte"
    pte.write_bytes(b"x")
    _fails(["generate", str(pte), "--prompt", "hi"], capsys, 2, "slimship: error:", "text needs a tokenizer")
    _fails(["generate", str(pte), "--prompt", "hello", "--format", "onnx"], capsys, 2, "--format onnx")
