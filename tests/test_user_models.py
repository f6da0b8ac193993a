"""A new user's models through the CLI: Hugging Face classifiers exported the standard way (random init).

The image classifier runs the README's "Your own model" section as written (its Python block, then each
`slimship` line); the text classifier goes through the same commands with token-id inputs.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from slimship.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
transformers = pytest.importorskip("transformers")


def readme_section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def code_blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def run_cli(line: str) -> None:
    argv = shlex.split(line)
    assert argv[0] == "slimship", line
    assert main(argv[1:]) == 0, line


def onnx_outputs(path: Path, inputs: list[np.ndarray]) -> tuple[list[str], list[np.ndarray]]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path))
    feed = {i.name: x for i, x in zip(session.get_inputs(), inputs, strict=True)}
    return [o.name for o in session.get_outputs()], session.run(None, feed)


def check_release(bundle: Path, samples: int | None, source: str) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    if samples is None:
        assert "calibration" not in manifest
    else:
        assert manifest["calibration"] == {"samples": samples, "source": source}
    assert main(["verify", str(bundle), "--json", str(bundle.parent / "verify.json")]) == 0
    assert json.loads((bundle.parent / "verify.json").read_text())


@pytest.mark.slow
def test_readme_own_model_and_a_text_classifier_through_every_command(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    section = readme_section("Your own model")
    (python,) = code_blocks(section, "python")
    exec(compile(python, "README.md (Your own model)", "exec"), {"__name__": "readme"})
    for line in code_blocks(section, "bash")[0].strip().splitlines():
        run_cli(line)
    _check_image_classifier(tmp_path)
    capsys.readouterr()
    _text_classifier(tmp_path / "text", capsys)


def _check_image_classifier(root: Path) -> None:
    summary = json.loads((root / "slim.json").read_text())["summary"]
    assert summary["params_after"] < summary["params_before"]  # half the groups were zero
    exported = {p.name for p in (root / "slim").iterdir()}
    files = {"vit-slim.onnx", "vit-slim.fp32.tflite", "vit-slim.int8.tflite", "vit-slim.fp32.pte"}
    assert exported == files | {"slimship-exports.json"}  # the index `release --exports` reads
    program = torch.export.load(root / "vit.pt2").module()
    x = torch.randn(1, 3, 32, 32)
    names, (logits,) = onnx_outputs(root / "slim" / "vit-slim.onnx", [x.numpy()])
    assert names == ["logits"]  # from the ModelOutput's structure
    np.testing.assert_allclose(logits, program(x)["logits"].detach().numpy(), atol=1e-4)
    bench = json.loads((root / "bench.json").read_text())
    assert bench["speedups"], bench  # a speedup row against the dense model
    check_release(root / "releases" / "vit-tiny-0.1.0", 16, "calib.npz")


def _text_classifier(root: Path, capsys: pytest.CaptureFixture) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    from slimship import zero_random_groups

    root.mkdir()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3)  # fmt: skip
    model = BertForSequenceClassification(config).eval()
    ids = torch.randint(0, 100, (1, 16))
    zero_random_groups(model, (ids,), fraction=0.5, seed=0)
    torch.export.save(torch.export.export(model, (ids,)), root / "bert.pt2")
    calib = root / "calib.npz"
    np.savez(calib, in0=np.random.default_rng(0).integers(0, 100, (8, 16)).astype(np.int64))
    pt2, slim = root / "bert.pt2", root / "bert-slim.pt2"
    run_cli(f"slimship slim {pt2} --out {slim}")
    run_cli(f"slimship export {pt2} --format onnx --out {root / 'dense'}")
    formats = "onnx tflite-fp32 tflite-int8 executorch-fp32"
    capsys.readouterr()  # stdout from here on: only the JSON of --json -
    run_cli(f"slimship export {slim} --format {formats} --calibration {calib} --out {root / 'slim'} --json -")
    report = json.loads(capsys.readouterr().out)
    assert {row["format"] for row in report["formats"]} == set(formats.split())
    assert all(row["parity"]["passed"] for row in report["formats"])
    assert report["calibration"] == {"samples": 8, "source": str(calib)}
    names, (logits,) = onnx_outputs(root / "slim" / "bert-slim.onnx", [ids.numpy()])
    assert names == ["logits"]
    np.testing.assert_allclose(logits, model(ids).logits.detach().numpy(), atol=1e-4)
    run_cli(f"slimship bench {root / 'slim' / 'bert-slim.onnx'} --dense {root / 'dense' / 'bert.onnx'} "
            "--runs 10 --json -")  # fmt: skip
    assert json.loads(capsys.readouterr().out)["speedups"]
    run_cli(f"slimship release {slim} --name bert-tiny --version 0.1.0 --format onnx --out {root / 'rel'}")
    check_release(root / "rel" / "bert-tiny-0.1.0", None, "")


def test_readme_device_targets_file_is_valid_and_every_key_is_explained(tmp_path, capsys) -> None:
    from slimship.runtimes.registry import RUNTIMES
    from slimship.runtimes.targets import Target

    section = readme_section("Your device")
    (text,) = code_blocks(section, "yaml")
    path = tmp_path / "targets.yaml"
    path.write_text(text)
    assert main(["targets", "--targets-file", str(path), "--json", "-"]) == 0
    board = next(t for t in json.loads(capsys.readouterr().out) if t["name"] == "my-board")
    assert board["transport"].startswith("ssh://") and board["threads"] == 2 and board["affinity"] == [0, 1]
    documented = set(re.findall(r"^\s{4}(\w+):", text, flags=re.M))
    fields = {f for f in Target.__dataclass_fields__ if f != "name"} | {"base"}
    assert fields <= documented, fields - documented  # every target key appears in the example
    for record in RUNTIMES.values():  # what each runtime needs on the device, as the registry says
        assert record.device_needs.split(" (")[0] in section, record.name
    assert "adb://" in section and "Python and numpy" in section
