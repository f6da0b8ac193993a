"""write_release: bundle contents, manifest schema, reproducibility, safety."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file

from slimship.errors import ReleaseError
from slimship.pipeline import manifest as mf
from slimship.pipeline import release as rel
from slimship.pipeline.bundle_files import bundle_file_name
from slimship.pipeline.release import write_release
from slimship.pipeline.verify import verify_bundle


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_bundle_contents_and_manifest(released, release_inputs):
    out = released.bundle_dir.parent
    bundle = out / "tiny-cnn-1.0.0"
    assert released.bundle_dir == bundle and released.tarball == out / "tiny-cnn-1.0.0.tar.gz"
    assert sorted(p.name for p in out.iterdir()) == ["tiny-cnn-1.0.0", "tiny-cnn-1.0.0.tar.gz"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    mf.validate_manifest(manifest)
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert on_disk == {f["path"] for f in manifest["files"]} | {"manifest.json"}
    assert {
        "model.pt2",
        "model.safetensors",
        "reference_io.npz",
        "MODEL_CARD.md",
        "report.html",
        "model.onnx",
        "model.fp32.tflite",
    } <= on_disk
    copied = (bundle / "model.fp32.tflite").read_bytes()
    assert copied == Path(release_inputs.model_files["tflite-fp32"]).read_bytes()
    # the exported ONNX keeps its weights in model.onnx.data: the bundle inlines them into one file
    source_onnx = onnx.load(str(release_inputs.model_files["onnx"]))
    bundled_onnx = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in bundled_onnx.graph.initializer)
    assert bundled_onnx.SerializeToString() == source_onnx.SerializeToString()
    assert manifest["model"]["inputs"] == [{"name": "image", "shape": [1, 3, 16, 16], "dtype": "float32"}]
    assert manifest["model"]["outputs"] == [{"name": "logits", "shape": [1, 5], "dtype": "float32"}]
    assert manifest["model"]["source_sha256"] == release_inputs.reference["source_sha256"]
    assert manifest["latency"]["device"].keys() == {"x86-ort-4t"}
    assert manifest["latency"]["emulated"].keys() == {"pi4-litert-emu"}
    assert manifest["parity"]["tflite-fp32"]["max_rel_diff"] is None  # inf is not JSON
    assert manifest["parity"]["pt2"]["max_abs_diff"] <= manifest["parity"]["pt2"]["tolerance"]
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["versions"]["slimship"] and manifest["versions"]["onnxruntime"]
    assert manifest["config"] == release_inputs.config
    assert manifest["slimming"]["per_layer"]["conv1"]["channels_kept"] == 6


def test_weights_and_reference_io_match_the_model(released, release_inputs):
    bundle = released.bundle_dir
    model = release_inputs.slim_module
    weights = load_file(bundle / "model.safetensors")
    assert weights.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(weights[key], value), key
    with np.load(bundle / "reference_io.npz", allow_pickle=False) as data:
        np.testing.assert_array_equal(data["in0"], release_inputs.example_inputs[0].numpy())
        with torch.no_grad():
            expected = model(*release_inputs.example_inputs).numpy()
        np.testing.assert_array_equal(data["out0"], expected)
    program = torch.export.load(str(bundle / "model.pt2"))
    with torch.no_grad():
        torch.testing.assert_close(
            program.module()(*release_inputs.example_inputs), torch.from_numpy(expected)
        )


def test_double_release_is_byte_identical(released, release_inputs, tmp_path):
    first, second = released, write_release(release_inputs, tmp_path)
    assert first.bundle_dir != second.bundle_dir
    assert _tree_bytes(first.bundle_dir) == _tree_bytes(second.bundle_dir)
    assert first.tarball.read_bytes() == second.tarball.read_bytes()
    assert first.tarball_sha256 == second.tarball_sha256


def test_tarball_is_normalised_and_does_not_contain_itself(released):
    result = released
    raw = result.tarball.read_bytes()
    assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\0\0\0\0"  # gzip magic, mtime 0
    assert raw[3] & 0x08 == 0  # FNAME flag unset: no file name in the header
    with tarfile.open(result.tarball) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names[0] == "tiny-cnn-1.0.0"
    assert all(n == "tiny-cnn-1.0.0" or n.startswith("tiny-cnn-1.0.0/") for n in names)
    assert not any(n.endswith(".tar.gz") for n in names)
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}
    assert {m.mode for m in members if m.isfile()} == {0o644}
    files = {n.split("/", 1)[1] for m, n in zip(members, names) if m.isfile()}
    assert files == set(_tree_bytes(result.bundle_dir))


def test_existing_version_is_never_overwritten(released, fresh_inputs, tmp_path):
    shutil.copytree(released.bundle_dir, tmp_path / released.bundle_dir.name)
    shutil.copy(released.tarball, tmp_path)
    before = _tree_bytes(tmp_path)
    with pytest.raises(ReleaseError, match=r"tiny-cnn-1\.0\.0 already exists"):
        write_release(fresh_inputs(config={"other": True}), tmp_path)
    assert _tree_bytes(tmp_path) == before


def test_existing_tarball_alone_blocks_the_release(release_inputs, tmp_path):
    (tmp_path / "tiny-cnn-1.0.0.tar.gz").write_bytes(b"old")
    with pytest.raises(ReleaseError, match=r"tiny-cnn-1\.0\.0\.tar\.gz already exists"):
        write_release(release_inputs, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-cnn-1.0.0.tar.gz"]
    assert (tmp_path / "tiny-cnn-1.0.0.tar.gz").read_bytes() == b"old"


@pytest.mark.parametrize("stage", ["render_report", "write_tarball", "_publish_dir"])
def test_failure_midway_leaves_no_partial_bundle(release_inputs, tmp_path, monkeypatch, stage):
    def boom(*args, **kwargs):
        raise RuntimeError(f"injected failure in {stage}")

    if stage == "_publish_dir":  # fail after the directory is in place, while linking the tarball
        monkeypatch.setattr(rel.os, "link", boom)
        monkeypatch.setattr(rel.os, "replace", boom)
    else:
        monkeypatch.setattr(rel, stage, boom)
    with pytest.raises(RuntimeError, match="injected failure"):
        write_release(release_inputs, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", "tiny cnn", "release name"),
        ("name", "../evil", "release name"),
        ("version", "1.0", "release version"),
        ("version", "v1.0.0", "release version"),
        ("reference", {"source_sha256": "abc"}, "source_sha256"),
        ("model_files", {"onnx": Path("/nonexistent/model.onnx")}, "is not a file"),
        ("model_files", {"pt2": Path(__file__)}, "role 'pt2' is invalid"),
        ("parity", {}, r"parity\['onnx'\]\['tolerance'\] is missing"),
        ("latency", {"t": {"p50_ms": 1.0, "p90_ms": 1.0, "p99_ms": 1.0}}, "no 'emulated' flag"),
    ],
)
def test_invalid_inputs_are_refused(fresh_inputs, tmp_path, field, value, message):
    with pytest.raises(ReleaseError, match=message):
        write_release(fresh_inputs(**{field: value}), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_version_with_prerelease_tag(fresh_inputs, tmp_path):
    result = write_release(fresh_inputs(version="1.2.3-rc1", model_files={}, parity={}), tmp_path)
    assert result.bundle_dir.name == "tiny-cnn-1.2.3-rc1"
    assert verify_bundle(result.tarball).version == "1.2.3-rc1"


def test_bad_slimming_summary_fails_schema_naming_the_key(fresh_inputs, tmp_path):
    bad = {"per_layer": {"conv1": {"channels_before": 12}}}
    with pytest.raises(ReleaseError, match=r"\$\.slimming\.per_layer\.conv1: 'channels_kept' is a required"):
        write_release(fresh_inputs(slimming=bad), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_model_card_says_what_a_deployer_needs(released):
    card = (released.bundle_dir / "MODEL_CARD.md").read_text()
    for needle in (
        "`image`",
        "`[1, 3, 16, 16]`",
        "float32",
        "Layout: NCHW",
        "normalised per channel",
        "slim-tflite-fp32",
        "x86-ort-4t",
        "pi4-litert-emu",
        "Emulated on the build host",
        "For tests only",
        "## Known limits",
        "model.fp32.tflite",
    ):
        assert needle in card, needle
    assert card.index("Measured on the target") < card.index("Emulated on the build host")


def test_schema_markdown_documents_every_top_level_field():
    text = mf.schema_markdown()
    for key in mf.load_schema()["required"]:
        assert f"| `{key}` |" in text, key
    assert "| `files[].sha256` |" in text
    assert "| `latency.device.<key>.p50_ms` |" in text


# --------------------------------------------------------------------- names, modes, card, calibration


@pytest.mark.parametrize(
    ("role", "suffix", "name"),
    [
        ("onnx", ".onnx", "model.onnx"),
        ("tflite-fp32", ".tflite", "model.fp32.tflite"),
        ("tflite-int8", ".tflite", "model.int8.tflite"),
        ("tflite-int8-dynamic", ".tflite", "model.int8-dynamic.tflite"),
        ("executorch-fp32", ".pte", "model.fp32.pte"),
        ("custom", ".onnx", "model.custom.onnx"),  # not a registered format: keeps its role
        ("onnx", ".tflite", "model.onnx.tflite"),  # a format role on another kind of file: not renamed
    ],
)
def test_model_files_are_named_by_role_and_format(role, suffix, name):
    assert bundle_file_name(role, Path(f"/x/anything{suffix}")) == name


def test_two_roles_with_one_bundle_name_are_refused(fresh_inputs, tiny_model_dir, tmp_path):
    files = {"tflite-fp32": tiny_model_dir / "model.tflite", "fp32": tiny_model_dir / "model.tflite"}
    assert bundle_file_name("fp32", files["fp32"]) == "model.fp32.tflite"
    parity = {r: {"max_abs_diff": 0.0, "tolerance": 1e-4} for r in files}
    with pytest.raises(
        ReleaseError, match=r"model_files\['tflite-fp32'\] would be stored as model\.fp32\.tflite"
    ):
        write_release(fresh_inputs(model_files=files, parity=parity), tmp_path)
    assert list(tmp_path.iterdir()) == []


def _modes_in_tar(path: Path) -> dict[str, tuple[bool, int]]:
    with tarfile.open(path) as tar:
        return {m.name: (m.isfile(), m.mode) for m in tar.getmembers()}


def test_bundle_and_tarball_files_are_0644(fresh_inputs, tmp_path):
    import os

    previous = os.umask(0o022)
    try:
        # an input file of mode 0600 (as mkstemp writes) must not carry that mode into the bundle
        inputs = fresh_inputs()
        private = tmp_path / "model.tflite"
        shutil.copyfile(inputs.model_files["tflite-fp32"], private)
        private.chmod(0o600)
        inputs.model_files["tflite-fp32"] = private
        result = write_release(inputs, tmp_path / "out")
    finally:
        os.umask(previous)
    files = [p for p in result.bundle_dir.rglob("*")]
    assert files and {oct(p.stat().st_mode & 0o777) for p in files if p.is_file()} == {"0o644"}
    assert oct(result.bundle_dir.stat().st_mode & 0o777) == "0o755"
    assert oct(result.tarball.stat().st_mode & 0o777) == "0o644"
    modes = _modes_in_tar(result.tarball)
    assert {oct(mode) for is_file, mode in modes.values() if is_file} == {"0o644"}
    names = {n.split("/", 1)[1] for n in modes if "/" in n}
    assert {"model.onnx", "model.fp32.tflite", "model.pt2", "manifest.json"} <= names
    assert not any(n.startswith("models") for n in names)


def test_atomic_writes_follow_the_umask_not_mkstemp(tmp_path):
    import os

    from slimship._util import atomic_write_bytes

    previous = os.umask(0o022)
    try:
        a = atomic_write_bytes(tmp_path / "a.bin", b"a")
        os.umask(0o077)
        b = atomic_write_bytes(tmp_path / "b.bin", b"b")
    finally:
        os.umask(previous)
    assert (a.stat().st_mode & 0o777, b.stat().st_mode & 0o777) == (0o644, 0o600)
    assert a.read_bytes() == b"a" and sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin"]


def test_model_card_says_slimship_verify(released):
    card = (released.bundle_dir / "MODEL_CARD.md").read_text()
    assert "slimship verify tiny-cnn-1.0.0\n" in card
    assert "slimship verify tiny-cnn-1.0.0.tar.gz" in card
    assert "verify_bundle(" not in card
    # accuracy comes first, with the headline; tolerances are explained
    assert card.index("## Accuracy") < card.index("## Quality gates") < card.index("## Intended inputs")
    assert "top1 91.00 (dense) -> 90.50 (slim): -0.50 pt" in card
    assert "fp32 (onnx, pt2, tflite-fp32): outputs may differ" in card


def test_calibration_goes_into_manifest_and_card(fresh_inputs, tmp_path):
    calibration = {"samples": 64, "source": "data.factory my:loaders: first 64 samples of the train split"}
    result = write_release(fresh_inputs(calibration=calibration), tmp_path)
    manifest = json.loads((result.bundle_dir / "manifest.json").read_text())
    assert manifest["calibration"] == calibration
    card = (result.bundle_dir / "MODEL_CARD.md").read_text()
    assert "## Calibration" in card and "calibrated on 64 samples: data.factory my:loaders" in card
    with pytest.raises(ReleaseError, match=r"\$\.calibration\.samples: 0 is less than the minimum of 1"):
        write_release(fresh_inputs(calibration={"samples": 0, "source": "x"}, version="1.0.1"), tmp_path)
