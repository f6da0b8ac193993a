"""verify_bundle: checksums, schema, unsafe archives, truncated archives, parity re-runs."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from slimship.errors import ReleaseError
from slimship.pipeline import manifest as mf
from slimship.pipeline.bundle_files import npz_bytes, write_tarball
from slimship.pipeline.verify import safe_extract, verify_bundle


@pytest.fixture
def bundle_copy(released, tmp_path) -> Path:
    """A private copy of the shared release's directory."""
    return Path(shutil.copytree(released.bundle_dir, tmp_path / released.bundle_dir.name))


def _rewrite_manifest(bundle: Path, change) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    change(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_directory_and_tarball_verify_with_parity(released):
    for source in (released.bundle_dir, released.tarball):
        result = verify_bundle(source)
        assert (result.name, result.version, result.ok) == ("tiny-cnn", "1.0.0", True)
        assert set(result.files_checked) == set(released.files) - {"manifest.json"}
        assert result.bytes_checked == sum(
            (released.bundle_dir / f).stat().st_size for f in result.files_checked
        )
        assert set(result.parity) == {"pt2", "onnx", "tflite-fp32"}
        for check in result.parity.values():
            assert check.ok and check.max_abs_diff <= check.tolerance


def test_real_manifest_validates_and_broken_ones_do_not(released):
    manifest = json.loads((released.bundle_dir / "manifest.json").read_text())
    mf.validate_manifest(manifest)
    broken = json.loads(json.dumps(manifest))
    broken["files"][0]["sha256"] = "not-a-hash"
    del broken["latency"]["emulated"]
    with pytest.raises(
        ReleaseError, match=r"\$\.files\[0\]\.sha256.*\n.*\$\.latency: 'emulated' is a required"
    ):
        mf.validate_manifest(broken)


def test_corrupted_file_is_named(bundle_copy):
    target = bundle_copy / "model.fp32.tflite"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ReleaseError, match=r"model\.fp32\.tflite: sha256 [0-9a-f]{64}, the manifest says"):
        verify_bundle(bundle_copy)


def test_truncated_and_missing_and_extra_files_are_named(bundle_copy):
    (bundle_copy / "model.safetensors").write_bytes((bundle_copy / "model.safetensors").read_bytes()[:-10])
    (bundle_copy / "MODEL_CARD.md").unlink()
    (bundle_copy / "model.extra.bin").write_bytes(b"x")
    with pytest.raises(ReleaseError) as info:
        verify_bundle(bundle_copy)
    message = str(info.value)
    assert "3 problem(s)" in message
    assert "model.safetensors: size" in message
    assert "MODEL_CARD.md: missing" in message
    assert "model.extra.bin: not listed in the manifest" in message


def test_manifest_that_breaks_the_schema_is_refused(bundle_copy):
    _rewrite_manifest(bundle_copy, lambda m: m.pop("versions"))
    with pytest.raises(
        ReleaseError, match=r"(?s)manifest\.json: does not match the manifest schema.*'versions'"
    ):
        verify_bundle(bundle_copy)


def test_parity_failure_is_named(bundle_copy):
    """Changed reference outputs (with a consistent manifest) must fail the parity re-run."""
    with np.load(bundle_copy / "reference_io.npz") as data:
        arrays = {k: data[k] for k in data.files}
    arrays["out0"] = arrays["out0"] + 0.5
    (bundle_copy / "reference_io.npz").write_bytes(npz_bytes(arrays))
    new = bundle_copy / "reference_io.npz"

    def fix(manifest):
        from slimship._util import sha256_file

        entry = next(f for f in manifest["files"] if f["path"] == "reference_io.npz")
        entry.update(sha256=sha256_file(new), bytes=new.stat().st_size)

    _rewrite_manifest(bundle_copy, fix)
    with pytest.raises(ReleaseError, match=r"parity check failed") as info:
        verify_bundle(bundle_copy)
    for name in ("model.pt2", "model.onnx", "model.fp32.tflite"):
        assert f"{name}: max abs difference 0.5" in str(info.value)
    assert verify_bundle(bundle_copy, run_parity=False).parity == {}


def test_truncated_tarball_is_refused(released, tmp_path):
    data = released.tarball.read_bytes()
    for cut in (len(data) // 3, len(data) - 40):
        broken = tmp_path / f"cut{cut}.tar.gz"
        broken.write_bytes(data[:cut])
        with pytest.raises(ReleaseError, match=rf"cut{cut}\.tar\.gz: truncated or corrupt archive"):
            verify_bundle(broken)


def _evil_tarball(path: Path, released, extra: tarfile.TarInfo, payload: bytes = b"") -> Path:
    """The released tarball's members plus one crafted member."""
    with tarfile.open(released.tarball) as src, tarfile.open(path, "w:gz") as dst:
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
        extra.size = len(payload)
        dst.addfile(extra, io.BytesIO(payload) if payload else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (_member("tiny-cnn-1.0.0/../escape.txt"), "path escapes the bundle directory"),
        (_member("/tmp/absolute.txt"), "absolute path"),
        (
            _member("tiny-cnn-1.0.0/link", tarfile.SYMTYPE, "../../etc/passwd"),
            "symlink to '../../etc/passwd' points outside",
        ),
        (
            _member("tiny-cnn-1.0.0/abs", tarfile.SYMTYPE, "/etc/passwd"),
            "symlink to '/etc/passwd' points outside",
        ),
        (
            _member("tiny-cnn-1.0.0/hard", tarfile.LNKTYPE, "../outside"),
            "hard link to '../outside' points outside",
        ),
        (_member("tiny-cnn-1.0.0/dev", tarfile.CHRTYPE), "device or FIFO"),
        (_member("tiny-cnn-1.0.0/fifo", tarfile.FIFOTYPE), "device or FIFO"),
        (_member("other-top/file.txt"), "expected one top directory"),
    ],
)
def test_unsafe_archive_members_are_refused(released, tmp_path, member, reason):
    name = member.name
    evil = _evil_tarball(tmp_path / "evil.tar.gz", released, member, b"pwned" if member.isfile() else b"")
    dest = tmp_path / "extract"
    dest.mkdir()
    with pytest.raises(ReleaseError, match=r"evil\.tar\.gz") as info:
        safe_extract(evil, dest)
    assert reason in str(info.value)
    if "top directory" not in reason:
        assert repr(name) in str(info.value)
    assert list(dest.iterdir()) == []  # nothing extracted
    assert not (tmp_path / "escape.txt").exists()
    with pytest.raises(ReleaseError):
        verify_bundle(evil)


def test_symlinked_file_in_a_directory_bundle_is_refused(bundle_copy, tmp_path):
    outside = tmp_path / "outside.md"
    shutil.move(bundle_copy / "MODEL_CARD.md", outside)
    (bundle_copy / "MODEL_CARD.md").symlink_to(outside)
    with pytest.raises(
        ReleaseError, match=r"files\[\d+\]\.path is 'MODEL_CARD\.md': goes through the symlink"
    ):
        verify_bundle(bundle_copy)


def test_tarball_of_a_tampered_directory_is_refused(bundle_copy, tmp_path):
    (bundle_copy / "report.html").write_text("<html>tampered</html>")
    archive = write_tarball(bundle_copy, tmp_path / "tampered.tar.gz")
    with pytest.raises(ReleaseError, match=r"tampered\.tar\.gz:tiny-cnn-1\.0\.0/report\.html: size"):
        verify_bundle(archive)


def test_not_a_bundle(tmp_path):
    with pytest.raises(ReleaseError, match="no such bundle"):
        verify_bundle(tmp_path / "missing")
    with pytest.raises(ReleaseError, match=r"no manifest\.json"):
        verify_bundle(tmp_path)


# ------------------------------------------------------------------ verify trusts nothing it checks


def _replace_file(bundle: Path, rel: str, data: bytes, change=None) -> None:
    """Write `data` to bundle/rel and update its checksum and size in the manifest (as an attacker could)."""
    from slimship._util import sha256_file

    (bundle / rel).write_bytes(data)

    def fix(manifest):
        entry = next(f for f in manifest["files"] if f["path"] == rel)
        entry.update(sha256=sha256_file(bundle / rel), bytes=(bundle / rel).stat().st_size)
        if change:
            change(manifest)

    _rewrite_manifest(bundle, fix)


def _onnx_with_bias(bundle: Path, new_bias) -> bytes:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(bundle / "model.onnx"))
    init = next(t for t in model.graph.initializer if t.name.endswith("fc.bias"))
    init.CopyFrom(numpy_helper.from_array(new_bias(numpy_helper.to_array(init)), init.name))
    return model.SerializeToString()


def test_verify_fails_a_model_whose_output_became_nan(bundle_copy):
    _replace_file(bundle_copy, "model.onnx", _onnx_with_bias(bundle_copy, lambda b: np.full_like(b, np.nan)))
    with pytest.raises(ReleaseError, match=r"parity check failed") as info:
        verify_bundle(bundle_copy)
    assert "model.onnx: max abs difference inf" in str(info.value)
    assert "NaN at 5 positions where the reference is a number" in str(info.value)


def test_manifest_tolerance_cannot_loosen_the_check(bundle_copy):
    """A perturbed model with `tolerance: 1e30` and its own diff recorded still fails verify's bound."""

    def loosen(manifest):
        manifest["parity"]["onnx"].update(tolerance=1e30, max_abs_diff=0.5, max_rel_diff=0.5)

    _replace_file(bundle_copy, "model.onnx", _onnx_with_bias(bundle_copy, lambda b: b + 0.5), loosen)
    with pytest.raises(ReleaseError, match=r"model\.onnx: max abs difference 0\.5\d* from the reference"):
        verify_bundle(bundle_copy)


def test_manifest_claiming_a_parity_it_cannot_show_fails(bundle_copy):
    _rewrite_manifest(bundle_copy, lambda m: m["parity"]["onnx"].update(max_abs_diff=0.25))
    with pytest.raises(ReleaseError, match=r"claims max_abs_diff 0\.25, verify measures"):
        verify_bundle(bundle_copy)
    _rewrite_manifest(bundle_copy, lambda m: m["parity"]["onnx"].update(max_abs_diff=None))
    with pytest.raises(ReleaseError, match=r"records max_abs_diff None"):
        verify_bundle(bundle_copy)


def test_verify_reports_its_own_bound_and_the_recorded_figures(released):
    checks = verify_bundle(released.bundle_dir).parity
    recorded = released.manifest["parity"]
    for role, check in checks.items():
        assert check.ok and check.precision == "fp32" and check.rel_bound == 1e-4
        assert check.recorded_tolerance == recorded[role]["tolerance"]
        assert check.recorded_max_abs_diff == recorded[role]["max_abs_diff"]
        assert check.max_abs_diff <= check.tolerance <= check.recorded_tolerance


@pytest.mark.parametrize("bad", ["../x.npz", "/etc/passwd", "models/../../x.npz", "a//b.npz"])
def test_reference_path_escaping_the_bundle_is_refused(bundle_copy, bad):
    _rewrite_manifest(bundle_copy, lambda m: m["reference_io"].update(path=bad))
    with pytest.raises(ReleaseError, match=r"\$\.reference_io\.path"):
        verify_bundle(bundle_copy)


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "C:/x", "a\\b", ""])
def test_confined_path_refuses_escapes_naming_the_key(tmp_path, bad):
    from slimship.pipeline.verify import confined_path

    with pytest.raises(ReleaseError, match=r"reference_io\.path is .*: .*stay inside the bundle"):
        confined_path(tmp_path, bad, "reference_io.path")


def test_reference_path_through_a_symlink_is_refused(bundle_copy, tmp_path):
    from slimship.pipeline.verify import confined_path

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(bundle_copy / "reference_io.npz", outside / "reference_io.npz")
    (bundle_copy / "refs").symlink_to(outside)
    with pytest.raises(ReleaseError, match=r"reference_io\.path is 'refs/reference_io\.npz': goes through"):
        confined_path(bundle_copy, "refs/reference_io.npz", "reference_io.path")
    _rewrite_manifest(bundle_copy, lambda m: m["reference_io"].update(path="refs/reference_io.npz"))
    with pytest.raises(ReleaseError, match=r"refs"):
        verify_bundle(bundle_copy)


def test_reference_file_must_be_covered_by_a_checksum(bundle_copy):
    """reference_io.path naming an unlisted file (here: the manifest itself) is refused before it is read."""
    _rewrite_manifest(bundle_copy, lambda m: m["reference_io"].update(path="manifest.json"))
    with pytest.raises(ReleaseError, match=r"reference_io\.path is not listed in files\[\]"):
        verify_bundle(bundle_copy)


def test_files_path_through_a_symlinked_directory_is_refused(bundle_copy, tmp_path):
    """A manifest naming `sub/model.onnx`, where `sub` is a symlink out of the bundle, is refused."""
    (tmp_path / "elsewhere").mkdir()
    shutil.move(bundle_copy / "model.onnx", tmp_path / "elsewhere" / "model.onnx")
    (bundle_copy / "sub").symlink_to(tmp_path / "elsewhere")
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    next(f for f in manifest["files"] if f["path"] == "model.onnx")["path"] = "sub/model.onnx"
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        ReleaseError, match=r"files\[\d+\]\.path is 'sub/model\.onnx': goes through the symlink"
    ):
        verify_bundle(bundle_copy)


def test_a_relabelled_or_doubled_model_file_and_a_deep_manifest_are_refused(tmp_path, released) -> None:
    """A re-checksummed manifest may not relabel a model as markdown (skipping its parity) or list it twice;
    a manifest nested 200,000 deep is an error, not a RecursionError."""
    import copy

    release_dir = released.bundle_dir
    for change, message in (
        (lambda m: m["files"][_model_index(m)].update(format="markdown"), "its name says"),
        (lambda m: m["files"].append(copy.deepcopy(m["files"][_model_index(m)])), "listed twice"),
    ):
        bundle = tmp_path / f"b{len(message)}" / release_dir.name
        shutil.copytree(release_dir, bundle)
        manifest = json.loads((bundle / "manifest.json").read_text())
        change(manifest)
        (bundle / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ReleaseError, match=message):
            verify_bundle(bundle, run_parity=False)
    deep = tmp_path / "deep" / release_dir.name
    shutil.copytree(release_dir, deep)
    (deep / "manifest.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ReleaseError, match=r"nested too deeply|not valid JSON"):
        verify_bundle(deep, run_parity=False)


def _model_index(manifest: dict) -> int:
    return next(i for i, f in enumerate(manifest["files"]) if f["format"] == "onnx")
