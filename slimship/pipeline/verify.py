"""Verify a release bundle (directory or .tar.gz): schema, checksums, sizes, and model parity.

A tarball is extracted into a temporary directory only after every member was checked: regular files
and directories only (no symlinks, hard links, devices or FIFOs), relative paths without '..', all
under one top directory, within size bounds (`ArchiveBounds`: the decompressed stream is refused as soon
as it passes them, and so are the members' declared sizes); extraction then also uses tarfile's
`filter="data"`.
"""

from __future__ import annotations

import bz2
import gzip
import json
import logging
import lzma
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from slimship._util import sha256_file
from slimship.errors import ReleaseError
from slimship.pipeline import manifest as mf
from slimship.pipeline.release import RUNNABLE_FORMATS, max_diffs

log = logging.getLogger(__name__)


@dataclass
class ParityCheck:
    """One model file re-run on the stored reference inputs."""

    role: str
    path: str
    max_abs_diff: float
    tolerance: float
    ok: bool


@dataclass
class VerifyResult:
    """What verify_bundle checked; it raises ReleaseError instead of returning a failed result."""

    source: Path
    name: str
    version: str
    files_checked: list[str]
    bytes_checked: int
    parity: dict[str, ParityCheck] = field(default_factory=dict)
    ok: bool = True


def verify_bundle(path: str | Path, *, run_parity: bool = True) -> VerifyResult:
    """Check a bundle directory or .tar.gz; raise ReleaseError naming the file(s) that fail."""
    source = Path(path)
    if source.is_dir():
        return _verify_dir(source, source, run_parity)
    if not source.is_file():
        raise ReleaseError(f"{source}: no such bundle directory or archive")
    with tempfile.TemporaryDirectory(prefix="slimship-verify-") as tmp:
        root = safe_extract(source, Path(tmp))
        return _verify_dir(root, source, run_parity)


# ------------------------------------------------------------------------------------------ archive


@dataclass(frozen=True)
class ArchiveBounds:
    """How much a bundle archive may unpack to, checked before anything is written.

    `max_total_bytes` bounds the sum of the members' sizes, `max_member_bytes` each one, and `max_ratio`
    the unpacked size over the archive's size once it passes `ratio_floor_bytes` (small bundles with
    text files may compress well).
    """

    max_total_bytes: int = 4 << 30
    max_member_bytes: int = 2 << 30
    max_ratio: float = 200.0
    ratio_floor_bytes: int = 64 << 20

    def stream_limit(self, compressed_bytes: int) -> int:
        """Largest decompressed tar stream accepted: the member bound plus tar headers and padding."""
        by_ratio = max(self.ratio_floor_bytes, int(self.max_ratio * compressed_bytes))
        return min(self.max_total_bytes, by_ratio) + _TAR_SLACK


_TAR_SLACK = 16 << 20  # headers (512 bytes per member), PAX records, block padding and the end marker
_DECOMPRESSORS = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ": lzma.open}


def safe_extract(archive: Path, dest: Path, bounds: ArchiveBounds | None = None) -> Path:
    """Extract a bundle tarball into `dest` after checking every member; return the bundle directory.

    Before anything is written the decompressed stream is read to its end (a cut-off tail is caught)
    and reading stops as soon as it passes `bounds`; then every member's type, path and declared size
    is checked.
    """
    bounds = bounds or ArchiveBounds()
    try:
        _check_stream(archive, bounds)
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            top = _check_members(archive, members)
            _check_sizes(archive, members, bounds)
            tar.extractall(dest, members=members, filter="data")
    except ReleaseError:
        raise
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
        raise ReleaseError(
            f"{archive}: truncated or corrupt archive ({type(exc).__name__}: {exc}); fetch the bundle again"
        ) from exc
    return dest / top


def _check_stream(archive: Path, bounds: ArchiveBounds) -> None:
    """Decompress to the end without writing, refusing as soon as the stream passes the bound."""
    with archive.open("rb") as raw:
        head = raw.read(6)
    opener = next((fn for magic, fn in _DECOMPRESSORS.items() if head.startswith(magic)), None)
    compressed = archive.stat().st_size
    limit = bounds.stream_limit(compressed)
    total = 0
    with (opener or open)(archive, "rb") as stream:
        while block := stream.read(1 << 20):
            total += len(block)
            if total > limit:
                raise ReleaseError(
                    f"{archive}: unpacks to more than {_mib(limit)} from {_mib(compressed)} (a decompression "
                    f"bomb, or a bundle beyond the bounds: {_describe(bounds)}); refusing to extract it"
                )


def _check_sizes(archive: Path, members: list[tarfile.TarInfo], bounds: ArchiveBounds) -> None:
    """Refuse by the members' declared sizes: each one, their sum, and the sum over the archive size."""
    for member in members:
        if member.size > bounds.max_member_bytes:
            raise ReleaseError(
                f"{archive}: member {member.name!r} declares {_mib(member.size)}, more than the "
                f"{_mib(bounds.max_member_bytes)} allowed per file; refusing to extract it"
            )
    total = sum(m.size for m in members)
    compressed = max(archive.stat().st_size, 1)
    too_big = total > bounds.max_total_bytes
    too_packed = total > bounds.ratio_floor_bytes and total / compressed > bounds.max_ratio
    if too_big or too_packed:
        raise ReleaseError(
            f"{archive}: members declare {_mib(total)} in all from {_mib(compressed)} "
            f"(bounds: {_describe(bounds)}); refusing to extract it"
        )


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def _describe(bounds: ArchiveBounds) -> str:
    return (
        f"{_mib(bounds.max_total_bytes)} in all, {_mib(bounds.max_member_bytes)} per file, "
        f"{bounds.max_ratio:g}x the archive size past {_mib(bounds.ratio_floor_bytes)}"
    )


def _check_members(archive: Path, members: list[tarfile.TarInfo]) -> str:
    if not members:
        raise ReleaseError(f"{archive}: the archive is empty")
    tops = set()
    for member in members:
        reason = _unsafe_reason(member)
        if reason:
            raise ReleaseError(f"{archive}: refusing unsafe member {member.name!r}: {reason}")
        tops.add(PurePosixPath(member.name).parts[0])
    if len(tops) != 1:
        raise ReleaseError(f"{archive}: expected one top directory NAME-VERSION/, found {sorted(tops)}")
    top = tops.pop()
    if any(m.name.rstrip("/") == top and not m.isdir() for m in members):
        raise ReleaseError(f"{archive}: {top!r} is not a directory")
    return top


def _unsafe_reason(member: tarfile.TarInfo) -> str | None:
    name = member.name
    parts = PurePosixPath(name).parts
    if not name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in parts or "\\" in name:
        return "path escapes the bundle directory ('..' or a backslash)"
    if member.issym() or member.islnk():
        kind = "symlink" if member.issym() else "hard link"
        target = member.linkname
        base = PurePosixPath(name).parent if member.issym() else PurePosixPath()
        escapes = target.startswith("/") or _escapes(base / target)
        where = "points outside the bundle" if escapes else "links are not allowed in a bundle"
        return f"{kind} to {target!r} {where}"
    if member.isdev() or member.isfifo():
        return "device or FIFO"
    if not (member.isfile() or member.isdir()):
        return f"unsupported member type {member.type!r}"
    return None


def _escapes(path: PurePosixPath) -> bool:
    depth = 0
    for part in path.parts:
        depth += -1 if part == ".." else (0 if part in (".", "") else 1)
        if depth < 0:
            return True
    return depth < 1


# ------------------------------------------------------------------------------------------ directory


def _verify_dir(root: Path, source: Path, run_parity: bool) -> VerifyResult:
    manifest_path = root / mf.MANIFEST_NAME
    if not manifest_path.is_file():
        raise ReleaseError(
            f"{source}: no {mf.MANIFEST_NAME} at the bundle root; this is not a slimship bundle"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ReleaseError(f"{_shown(source, root, manifest_path)}: not valid JSON ({exc})") from exc
    mf.validate_manifest(manifest, where=_shown(source, root, manifest_path))
    _check_files(root, source, manifest)
    result = VerifyResult(
        source=source,
        name=manifest["name"],
        version=manifest["version"],
        files_checked=[f["path"] for f in manifest["files"]],
        bytes_checked=sum(f["bytes"] for f in manifest["files"]),
    )
    if run_parity:
        result.parity = _check_parity(root, source, manifest)
    log.info("verified %s: %d files, %d parity checks", source, len(result.files_checked), len(result.parity))
    return result


def _shown(source: Path, root: Path, path: Path) -> str:
    """A file inside the bundle as the user knows it (inside the tarball, or on disk)."""
    rel = path.relative_to(root).as_posix()
    return f"{source}:{root.name}/{rel}" if source.is_file() else str(path)


def _check_files(root: Path, source: Path, manifest: dict[str, Any]) -> None:
    problems = []
    listed = {mf.MANIFEST_NAME}
    for entry in manifest["files"]:
        rel = entry["path"]
        listed.add(rel)
        problem = _check_file(root / rel, entry)
        if problem:
            problems.append(f"{_shown(source, root, root / rel)}: {problem}")
    for path in sorted(p for p in root.rglob("*") if not p.is_dir() or p.is_symlink()):
        if path.relative_to(root).as_posix() not in listed:
            problems.append(f"{_shown(source, root, path)}: not listed in the manifest (unexpected file)")
    if problems:
        raise ReleaseError(
            f"{source}: bundle does not verify ({len(problems)} problem(s)); the files are corrupt or were "
            "changed after release, fetch the bundle again:\n  " + "\n  ".join(problems)
        )


def _check_file(path: Path, entry: dict[str, Any]) -> str | None:
    if path.is_symlink():
        return "is a symlink; bundles hold only regular files"
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"size {size} bytes, the manifest says {entry['bytes']}"
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        return f"sha256 {digest}, the manifest says {entry['sha256']}"
    return None


# ------------------------------------------------------------------------------------------ parity


def _check_parity(root: Path, source: Path, manifest: dict[str, Any]) -> dict[str, ParityCheck]:
    ref = manifest["reference_io"]
    with np.load(root / ref["path"], allow_pickle=False) as data:
        inputs = [data[k] for k in ref["inputs"]]
        expected = [data[k] for k in ref["outputs"]]
    checks, failures = {}, []
    for entry in manifest["files"]:
        if entry["format"] not in RUNNABLE_FORMATS:
            continue
        where = _shown(source, root, root / entry["path"])
        tolerance = manifest["parity"].get(entry["role"], {}).get("tolerance")
        if tolerance is None:
            raise ReleaseError(
                f"{where}: the manifest has no parity[{entry['role']!r}].tolerance to check it with"
            )
        actual = _run_model(root / entry["path"], entry["format"], inputs, where)
        diff = max_diffs(actual, expected, where)["max_abs_diff"]
        ok = bool(np.isfinite(diff) and diff <= tolerance)
        checks[entry["role"]] = ParityCheck(entry["role"], entry["path"], diff, tolerance, ok)
        if not ok:
            failures.append(
                f"{where}: max abs difference {diff:.3g} from the reference outputs "
                f"> tolerance {tolerance:.3g}"
            )
    if failures:
        raise ReleaseError(f"{source}: parity check failed:\n  " + "\n  ".join(failures))
    return checks


def _run_model(path: Path, fmt: str, inputs: list[np.ndarray], where: str) -> list[np.ndarray]:
    try:
        if fmt == "pt2":
            return _run_pt2(path, inputs)
        from slimship.runtimes.device_runner import open_runner

        return [np.asarray(o) for o in open_runner(str(path)).run([x.copy() for x in inputs])]
    except ReleaseError:
        raise
    except Exception as exc:
        raise ReleaseError(f"{where}: could not load or run the model ({type(exc).__name__}: {exc})") from exc


def _run_pt2(path: Path, inputs: list[np.ndarray]) -> list[np.ndarray]:
    import torch

    from slimship.pipeline.release import _flatten_outputs

    module = torch.export.load(str(path)).module()
    with torch.no_grad():
        result = module(*(torch.from_numpy(np.array(x)) for x in inputs))
    return _flatten_outputs(result, path.name)
