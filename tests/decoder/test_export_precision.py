"""`export --task text-generation` on half-precision checkpoints (converted to fp32 first), on
sliding-window decoders (refused naming the config key) and with a format that fails (the others kept)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from slimship.cli import main
from slimship.decoder import export as decoder_export
from slimship.decoder.prepare import sliding_window, to_fp32
from slimship.errors import ExportError, first_line
from tests.decoder.tiny import VOCAB, tiny_llama, tiny_tokenizer, tiny_zeroed_llama

SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip


def _qwen2(**extra):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**SMALL, **extra)).eval()


def _mistral(**extra):
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**SMALL, **extra)).eval()


def _export(folder: Path, out: Path, *formats: str, seq: int = 48) -> list[str]:
    return ["export", str(folder), "--task", "text-generation", "--max-seq-len", str(seq),
            "--format", *formats, "--out", str(out)]  # fmt: skip


def test_ansi_colour_codes_are_stripped_from_an_exporter_message():
    exc = RuntimeError("Failed to export. \x1b[96mThis is step 1/3\x1b[0m of exporting\nmore")
    assert first_line(exc) == "Failed to export. This is step 1/3 of exporting"


@pytest.mark.parametrize("dtype, name", [(torch.float16, "float16"), (torch.bfloat16, "bfloat16")])
def test_a_half_precision_decoder_is_converted_to_fp32_and_says_so(dtype, name):
    model = tiny_llama().to(dtype)
    assert to_fp32(model) == [f"converted from {name} to float32 (every format starts from fp32)"]
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert to_fp32(model) == []  # an fp32 model is left as it is, with no note


def test_the_reference_is_generated_from_the_fp32_model(monkeypatch):
    seen = []
    real = decoder_export.reference_generation
    monkeypatch.setattr(
        decoder_export, "reference_generation",
        lambda model, *a: seen.append(next(model.parameters()).dtype) or real(model, *a),
    )  # fmt: skip
    options = decoder_export.DecoderExportOptions(max_seq_len=32)
    exporter = decoder_export.DecoderExporter(tiny_llama().to(torch.bfloat16), options, ["onnx"])
    assert seen == [torch.float32]
    assert exporter.notes == ["converted from bfloat16 to float32 (every format starts from fp32)"]


@pytest.mark.parametrize(
    "make, key, value",
    [
        (lambda: _qwen2(use_sliding_window=True, sliding_window=16, max_window_layers=1),
         "use_sliding_window", "True"),
        (lambda: _mistral(sliding_window=16), "sliding_window", "16"),
    ],
)  # fmt: skip
def test_a_window_shorter_than_the_cache_is_refused_naming_its_config_key(tmp_path, capsys, make, key, value):
    folder = tmp_path / "sw"
    make().save_pretrained(str(folder), safe_serialization=True)
    out = tmp_path / "out"
    assert main(_export(folder, out, "onnx", "executorch-fp32", seq=48)) == 2
    err = capsys.readouterr().err
    assert f"slimship: error: config.json {key} = {value}: a sliding window of 16 tokens" in err, err
    assert "give --max-seq-len 16 or less" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    "make",
    [lambda: _qwen2(use_sliding_window=True, sliding_window=16, max_window_layers=1),
     lambda: _mistral(sliding_window=16)],
)  # fmt: skip
def test_a_window_covering_the_cache_is_switched_off_with_the_same_outputs(make):
    model = make()
    tokens = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        windowed = model(tokens).logits
        longer = model(torch.cat([tokens, tokens], 1)).logits  # 32 tokens: the window masks some
    options = decoder_export.DecoderExportOptions(max_seq_len=16, prompt_len=8, new_tokens=8)
    exporter = decoder_export.DecoderExporter(model, options, ["onnx"])
    assert sliding_window(model) is None
    assert "covers --max-seq-len 16: exported with full attention" in exporter.notes[0]
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, windowed)  # within the cache: the same outputs
        assert not torch.allclose(model(torch.cat([tokens, tokens], 1)).logits, longer)  # the window is off


def test_a_window_that_is_switched_off_is_no_sliding_window():
    assert sliding_window(_qwen2(use_sliding_window=False, sliding_window=16)) is None
    assert sliding_window(_mistral(sliding_window=None)) is None
    assert sliding_window(tiny_llama()) is None


@pytest.mark.slow
def test_a_bf16_checkpoint_exports_in_fp32_and_a_failed_format_keeps_the_other(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "bf16"
    tiny_zeroed_llama().to(torch.bfloat16).save_pretrained(str(folder), safe_serialization=True)
    tiny_tokenizer().save_pretrained(str(folder))

    def broken(*args):
        raise ExportError("int4 quantiser broke (test)")

    record = dataclasses.replace(decoder_export.DECODER_FORMATS["onnx-int4"], build=broken)
    monkeypatch.setitem(decoder_export.DECODER_FORMATS, "onnx-int4", record)
    out, report = tmp_path / "out", tmp_path / "export.json"
    assert main([*_export(folder, out, "onnx-int4", "onnx"), "--json", str(report)]) == 2
    err = capsys.readouterr().err
    assert "slimship: error: onnx-int4 failed: int4 quantiser broke (test)" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["bf16.onnx"]  # the format that passed is written
    data = json.loads(report.read_text())
    assert data["failures"] == [{"format": "onnx-int4", "reason": "int4 quantiser broke (test)"}]
    [row] = data["formats"]
    assert row["format"] == "onnx" and row["parity"]["passed"] and row["parity"]["tokens_match"]
    assert "converted from bfloat16 to float32 (every format starts from fp32)" in row["notes"]
    assert row["parity"]["max_abs_diff"] <= row["parity"]["tolerance"]
