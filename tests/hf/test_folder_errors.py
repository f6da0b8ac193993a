"""Bad checkpoint folders: `slimship: error:` naming the file, exit 2, nothing written, nothing replaced."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import slimship
from slimship.cli import main
from slimship.compare import Comparison
from slimship.errors import ModelFileError
from tests.hf.folders import tiny_model, write_folder


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    return write_folder(tiny_model("llama", seed=2), tmp_path_factory.mktemp("hf") / "dense")


def _copy(dense: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(dense, tmp_path / "copy"))


def _fails(argv: list[str], capsys, *named: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("slimship: error:") and "Traceback" not in err, err
    for text in named:
        assert text in err, err
    return err


def _left(tmp_path: Path) -> set[str]:
    return {p.name for p in tmp_path.iterdir()}


def test_pickle_weights_refused_unless_allowed(dense, tmp_path, capsys) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(dense / "config.json", folder / "config.json")
    model = slimship.load_pretrained(dense)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    out = tmp_path / "slim"
    _fails(["slim", str(folder), "--out", str(out)], capsys, "pytorch_model.bin", "--allow-pickle")
    assert _left(tmp_path) == {"pickled"}
    loaded = slimship.load_pretrained(folder, allow_pickle=True)  # opted in: torch.load(weights_only=True)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert main(["slim", str(folder), "--out", str(out), "--allow-pickle"]) == 0
    assert {p.suffix for p in out.iterdir()} == {".json", ".safetensors", ""}  # SHA256SUMS; no pickle


def test_missing_config_is_named(dense, tmp_path, capsys) -> None:
    folder = _copy(dense, tmp_path)
    (folder / "config.json").unlink()
    _fails(["slim", str(folder), "--out", str(tmp_path / "slim")], capsys, "config.json")
    assert _left(tmp_path) == {"copy"}


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (
            lambda f: (f / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"),
            "model.safetensors",
        ),
        (lambda f: (f / "model.safetensors").unlink(), "no weights"),
        (lambda f: (f / "config.json").write_text("{"), "config.json"),
        (
            lambda f: (f / "config.json").write_text(
                '{"model_type": "llama", "auto_map": {"AutoModel": "x.Y"}}'
            ),
            "auto_map",
        ),
    ],
    ids=["corrupt-safetensors", "no-weights", "bad-config-json", "remote-code"],
)
def test_broken_folders_are_named(dense, tmp_path, capsys, damage, named) -> None:
    folder = _copy(dense, tmp_path)
    damage(folder)
    _fails(["export", str(folder), "--format", "onnx", "--out", str(tmp_path / "exported")], capsys, named)
    assert _left(tmp_path) == {"copy"}


def test_output_folder_never_overwritten(dense, tmp_path, capsys) -> None:
    out = tmp_path / "slim"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails(["slim", str(dense), "--out", str(out)], capsys, "already exists")
    assert _left(out) == {"keep.txt"}
    (out / "keep.txt").unlink()  # an empty folder is not replaced either
    _fails(["slim", str(dense), "--out", str(out)], capsys, "already exists")
    assert _left(tmp_path) == {"slim"} and not any(out.iterdir())


def test_failure_while_writing_leaves_nothing(dense, tmp_path, capsys, monkeypatch) -> None:
    def broken(*args, **kwargs) -> Comparison:  # the folder loaded back disagrees: refused, removed
        return Comparison(1.0, 1.0, 1e-5, 1e-5, False, "output 0 differs")

    monkeypatch.setattr("slimship.hf.slim.compare", broken)
    _fails(["slim", str(dense), "--out", str(tmp_path / "slim")], capsys, "loaded back", "output 0 differs")
    assert _left(tmp_path) == set()  # no slim folder, no hidden .partial staging folder


def test_tampered_slim_folder_is_refused(dense, tmp_path, capsys) -> None:
    out = tmp_path / "slim"
    assert main(["slim", str(dense), "--out", str(out)]) == 0
    capsys.readouterr()
    config = json.loads((out / "config.json").read_text())
    name, shape = next(iter(config["slimship"]["shapes"].items()))
    tampered = Path(shutil.copytree(out, tmp_path / "tampered"))
    (tampered / "SHA256SUMS").unlink()
    config["slimship"]["shapes"][name] = [shape[0] + 1, *shape[1:]]
    (tampered / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match=name.replace(".", r"\.")):
        slimship.load_pretrained(tampered)
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=r"model\.safetensors: sha256 differs"):
        slimship.load_pretrained(out)


def test_missing_tensor_or_shard_is_named(dense, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    folder = _copy(dense, tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match=r"lack .*model\.layers\.1\.mlp\.up_proj\.weight"):
        slimship.load_pretrained(folder)  # never a random tensor in its place
    index = {"metadata": {}, "weight_map": {name: "model-00002-of-00002.safetensors" for name in state}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFileError, match=r"model-00002-of-00002\.safetensors, missing"):
        slimship.load_pretrained(folder)


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("num_hidden_layers", 40_000, "layers the weights hold"),  # would build 40,000 layers first
        ("vocab_size", 10**12, "rows of the embedding"),
        ("hidden_size", 128, "width of the embedding"),
        ("num_hidden_layers", "2", "not a size"),
    ],
)
def test_a_size_config_json_claims_is_checked_against_the_weights_first(
    dense, tmp_path, capsys, key, value, named
) -> None:
    """Before any model is built: the claim and the tensor that contradicts it are named, within seconds."""
    folder = _copy(dense, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    err = _fails(["slim", str(folder), "--out", str(tmp_path / "slim")], capsys, "config.json", key, named)
    assert "transformers" not in err
    assert _left(tmp_path) == {"copy"}


def test_a_size_transformers_cannot_fit_is_named_without_its_load_report(dense, tmp_path, capsys) -> None:
    folder = _copy(dense, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] += 8
    (folder / "config.json").write_text(json.dumps(config))
    err = _fails(["slim", str(folder), "--out", str(tmp_path / "slim")], capsys, "wrong shape", "mlp")
    assert "LOAD REPORT" not in err and "above report" not in err
    assert (
        f"the model needs [{config['intermediate_size']}," in err
        or f", {config['intermediate_size']}]" in err
    )
