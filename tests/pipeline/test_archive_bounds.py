"""Bundle archives are bounded: a decompression bomb is refused before anything large is written."""

from __future__ import annotations

import gzip
import io
import tarfile
import time
from pathlib import Path

import pytest

from slimship.errors import ReleaseError
from slimship.pipeline.verify import ArchiveBounds, safe_extract, verify_bundle

MIB = 1 << 20


def _tar_member(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(format=tarfile.PAX_FORMAT)


def _gzip_bomb(path: Path, zeros: int) -> Path:
    """bundle/ with one member of `zeros` zero bytes, streamed into gzip (nothing large held in memory)."""
    block = bytes(MIB)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=1) as gz:
        gz.write(_dir_header("bundle"))
        gz.write(_tar_member("bundle/zeros.bin", zeros))
        for _ in range(zeros // MIB):
            gz.write(block)
        gz.write(bytes(zeros % MIB))
        gz.write(bytes(-zeros % 512))  # block padding
        gz.write(bytes(1024))  # end of archive
    return path


def _dir_header(name: str) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info.tobuf(format=tarfile.PAX_FORMAT)


def _disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 2 MB of gzip that unpacks to 500 MiB."""
    path = _gzip_bomb(tmp_path_factory.mktemp("bomb") / "bomb.tar.gz", 500 * MIB)
    assert path.stat().st_size < 4 * MIB
    return path


def test_a_gzip_bomb_is_refused_before_it_is_written(bomb, tmp_path) -> None:
    start = time.perf_counter()
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(
        ReleaseError, match=r"bomb\.tar\.gz: unpacks to more than .*refusing to extract"
    ) as info:
        safe_extract(bomb, dest)
    assert "bounds" in str(info.value)
    assert _disk_bytes(dest) < MIB and list(dest.iterdir()) == []
    assert time.perf_counter() - start < 20  # reading stopped at the bound, long before 500 MiB


def test_the_declared_sizes_are_refused_before_extraction(tmp_path) -> None:
    """A tarball whose members declare more than the bounds allow (well within the stream bound)."""
    bomb = _gzip_bomb(tmp_path / "small.tar.gz", 3 * MIB)
    dest = tmp_path / "dest"
    dest.mkdir()
    per_member = ArchiveBounds(max_member_bytes=MIB, max_total_bytes=64 * MIB)
    with pytest.raises(ReleaseError, match=r"small\.tar\.gz: member 'bundle/zeros\.bin' declares 3\.0 MiB"):
        safe_extract(bomb, dest, per_member)
    total = ArchiveBounds(max_member_bytes=64 * MIB, max_total_bytes=2 * MIB, ratio_floor_bytes=64 * MIB)
    with pytest.raises(ReleaseError, match=r"small\.tar\.gz: "):
        safe_extract(bomb, dest, total)
    ratio = ArchiveBounds(max_ratio=10.0, ratio_floor_bytes=MIB)
    with pytest.raises(ReleaseError, match=r"small\.tar\.gz: (members declare 3\.0 MiB|unpacks to more)"):
        safe_extract(bomb, dest, ratio)
    assert list(dest.iterdir()) == []
    assert (safe_extract(bomb, dest) / "zeros.bin").stat().st_size == 3 * MIB  # the defaults accept it


def test_verify_names_the_bomb_and_leaves_nothing(bomb, tmp_path, monkeypatch, capsys) -> None:
    from slimship.cli import main

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # verify's temporary folder goes here
    monkeypatch.setattr("tempfile.tempdir", None)
    with pytest.raises(ReleaseError, match=r"bomb\.tar\.gz: unpacks to more than"):
        verify_bundle(bomb)
    assert main(["verify", str(bomb)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slimship: error:") and str(bomb) in err
    assert list(tmp_path.iterdir()) == []


def test_a_plain_tar_is_bounded_too(tmp_path) -> None:
    raw = io.BytesIO()
    raw.write(_dir_header("bundle") + _tar_member("bundle/a.bin", 2 * MIB) + bytes(2 * MIB) + bytes(1024))
    path = tmp_path / "plain.tar"
    path.write_bytes(raw.getvalue())
    with pytest.raises(ReleaseError, match=r"plain\.tar: member 'bundle/a\.bin' declares 2\.0 MiB"):
        safe_extract(path, tmp_path / "dest", ArchiveBounds(max_member_bytes=MIB))
