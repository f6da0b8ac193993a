"""Verify a release bundle (directory or .tar.gz): schema, checksums, sizes, and model parity.

A tarball is extracted into a temporary directory only after every member was checked: regular files
and directories only (no symlinks, hard links, devices or FIFOs), relative paths without '..', all
under one top directory, within size bounds (`ArchiveBounds`: the decompressed stream is refused as soon
as it passes them, and so are the members' declared sizes); extraction then also uses tarfile's
`filter="data"`.


Every path the manifest names (`files[].path`, `reference_io.path`) must be relative, without '..',
through no symlink and resolve inside the bundle. Parity is judged with verify's own bounds
(`slimship.compare.REL_BOUNDS` for the precision read from each file, relative to the stored reference
outputs' finite scale), never loosened by the manifest; the manifest's recorded max_abs_diff must match
what verify measures within that bound. Checksums prove the files are the ones the manifest lists;
without a signature nothing proves the manifest itself is the publisher's.
"""

from __future__ import annotations

import bz2
import gzip
import json
import logging
import lzma
import math
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from slimship._util import sha256_file
from slimship.compare import Comparison, bounds, judge_cases
from slimship.decoder.replay import ReplayCheck, replay_file
from slimship.errors import ReleaseError, SlimshipError
from slimship.inputs import read_npz_arrays
from slimship.pipeline import manifest as mf
from slimship.pipeline.bundle_files import RUNNABLE_FORMATS, flatten_outputs, format_of
from slimship.pipeline.gates import TEXT_GENERATION

log = logging.getLogger(__name__)
MAX_MANIFEST_BYTES = 16 << 20


@dataclass
class ParityCheck:
    """One model file re-run on the stored reference inputs."""

    role: str
    path: str
    max_abs_diff: float
    tolerance: float  # what verify applied: its own bound, tightened (never loosened) by the manifest's
    ok: bool
    precision: str = ""  # read from the file itself (fp32, fp16, int8-dynamic, int8)
    rel_bound: float = 0.0  # slimship.compare.REL_BOUNDS[precision]
    recorded_max_abs_diff: float | None = None  # what the manifest claims
    recorded_tolerance: float | None = None
    reason: str = ""  # why it failed; empty when ok


@dataclass
class VerifyResult:
    """What verify_bundle checked; it raises ReleaseError instead of returning a failed result."""

    source: Path
    name: str
    version: str
    files_checked: list[str]
    bytes_checked: int
    parity: dict[str, ParityCheck] = field(default_factory=dict)
    parity_skipped: dict[str, str] = field(default_factory=dict)  # role -> why it was not re-run
    ok: bool = True
    replay: dict[str, ReplayCheck] = field(default_factory=dict)  # text generation: role -> greedy replay


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


class _NotFinite(ValueError):
    """A manifest holds NaN or Infinity, which would pass (or fail) any comparison."""


def _no_constant(name: str) -> None:
    raise _NotFinite(name)


def _finite(text: str) -> float:
    """A JSON number as a float; one too large for a float (1e999 reads as inf) is refused."""
    value = float(text)
    if not math.isfinite(value):
        raise _NotFinite(text[:40])
    return value


def _verify_dir(root: Path, source: Path, run_parity: bool) -> VerifyResult:
    manifest_path = root / mf.MANIFEST_NAME
    if not manifest_path.is_file():
        raise ReleaseError(
            f"{source}: no {mf.MANIFEST_NAME} at the bundle root; this is not a slimship bundle"
        )
    try:
        if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ReleaseError(
                f"{_shown(source, root, manifest_path)}: larger than {MAX_MANIFEST_BYTES >> 20} MiB; "
                "not a slimship manifest"
            )
        manifest = json.loads(
            manifest_path.read_text(encoding="utf-8"), parse_constant=_no_constant, parse_float=_finite
        )
    except _NotFinite as exc:
        raise ReleaseError(
            f"{_shown(source, root, manifest_path)}: holds {exc} where a figure belongs; every figure of a "
            "manifest (tolerances included) must be a finite number"
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ReleaseError(f"{_shown(source, root, manifest_path)}: not valid JSON ({exc})") from exc
    except RecursionError:
        raise ReleaseError(
            f"{_shown(source, root, manifest_path)}: nested too deeply to be a slimship manifest"
        ) from None
    mf.validate_manifest(manifest, where=_shown(source, root, manifest_path))
    _check_files(root, source, manifest)
    result = VerifyResult(
        source=source,
        name=manifest["name"],
        version=manifest["version"],
        files_checked=[f["path"] for f in manifest["files"]],
        bytes_checked=sum(f["bytes"] for f in manifest["files"]),
    )
    if run_parity and manifest.get("task") == TEXT_GENERATION:
        result.replay = _check_replay(root, source, manifest)
    elif run_parity:
        result.parity_skipped = pt2_parity_skips(root, source, manifest)
        result.parity = _check_parity(root, source, manifest, skip=set(result.parity_skipped))
    log.info("verified %s: %d files, %d parity checks", source, len(result.files_checked), len(result.parity))
    return result


def _shown(source: Path, root: Path, path: Path) -> str:
    """A file inside the bundle as the user knows it (inside the tarball, or on disk)."""
    rel = path.relative_to(root).as_posix()
    return f"{source}:{root.name}/{rel}" if source.is_file() else str(path)


def _check_files(root: Path, source: Path, manifest: dict[str, Any]) -> None:
    problems = []
    listed = {mf.MANIFEST_NAME}
    for i, entry in enumerate(manifest["files"]):
        rel = entry["path"]
        path = confined_path(root, rel, f"files[{i}].path", _shown(source, root, root / mf.MANIFEST_NAME))
        if rel in listed:
            problems.append(f"{_shown(source, root, path)}: listed twice in the manifest")
        listed.add(rel)
        problem = _check_file(path, entry)
        if problem:
            problems.append(f"{_shown(source, root, path)}: {problem}")
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
    if entry["format"] != format_of(path):  # a relabelled model file would skip its parity re-run
        return f"the manifest says format {entry['format']!r}, its name says {format_of(path)!r}"
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


def pt2_parity_skips(root: Path, source: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """Roles of .pt2 files whose parity is not re-run: verify never unpickles, and these need it."""
    from slimship.errors import ModelFileError
    from slimship.loading import PickleRequiredError, read_archive, require_no_pickle

    skips = {}
    for entry in manifest["files"]:
        if entry["format"] != "pt2":
            continue
        path = root / entry["path"]
        try:
            require_no_pickle(path, read_archive(path))
        except PickleRequiredError as exc:
            skips[entry["role"]] = f"not run: {_shown(source, root, path)} needs unpickling ({exc})"
            log.warning("parity of %s skipped: it needs unpickling, which verify never does", entry["path"])
        except ModelFileError:
            continue  # unreadable: the parity run reports it
    return skips


def _onnx_precision(path: Path) -> str:
    from slimship.exporters.onnx_export import onnx_precision

    return onnx_precision(path)


def _tflite_precision(path: Path) -> str:
    from slimship.exporters.tflite_compat import tflite_precision

    return tflite_precision(path)


def executorch_precision(path: Path) -> str:
    """A .pte's precision from its bundle name: models/ROLE.pte with ROLE a format name (executorch-int8),
    or STEM.PRECISION.pte (`FormatRecord.file_name`). Any other name gets the strictest bound, fp32: a
    quantised program under another name fails verification rather than passing on a loose bound."""
    from slimship.exporters.registry import FORMATS

    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    by_role = {name: r.precision for name, r in FORMATS.items() if r.family == "executorch"}
    if stem in by_role:
        return by_role[stem]
    tail = stem.rsplit(".", 1)[-1]
    return tail if "." in stem and tail in set(by_role.values()) else "fp32"


#: how verify reads the precision of a runnable file, by format (keys of slimship.compare.REL_BOUNDS)
_PRECISION_OF = {
    "pt2": lambda path: "fp32", "onnx": _onnx_precision, "tflite": _tflite_precision,
    "executorch": executorch_precision,
}  # fmt: skip


def _check_parity(
    root: Path, source: Path, manifest: dict[str, Any], skip: set[str] = frozenset()
) -> dict[str, ParityCheck]:
    """Re-run every model file on the stored inputs and judge it with verify's own bounds.

    The tolerance is REL_BOUNDS[precision read from the file] * max(1, max|finite reference output|),
    capped at MAGNITUDE_CAPS[precision] * max|finite reference output| for quantised files;
    the manifest's recorded tolerance can only tighten it. The manifest's recorded max_abs_diff must
    agree with the measured one within that tolerance, or the manifest claims a parity it cannot show.
    Roles in `skip` (a .pt2 that needs unpickling) are not run.
    """
    ref = manifest["reference_io"]
    manifest_shown = _shown(source, root, root / mf.MANIFEST_NAME)
    ref_path = confined_path(root, ref["path"], "reference_io.path", manifest_shown)
    if ref["path"] not in {f["path"] for f in manifest["files"]}:
        raise ReleaseError(
            f"{_shown(source, root, ref_path)}: reference_io.path is not listed in files[], so no checksum "
            "covers it; the manifest was edited, fetch the bundle again"
        )
    inputs, expected = _load_reference(ref_path, ref, _shown(source, root, ref_path))
    checks, failures = {}, []
    for i, entry in enumerate(manifest["files"]):
        if entry["format"] not in RUNNABLE_FORMATS or entry["role"] in skip:
            continue
        path = confined_path(root, entry["path"], f"files[{i}].path", manifest_shown)
        check = _parity_of(path, entry, manifest["parity"].get(entry["role"]), inputs, expected,
                           _shown(source, root, path))  # fmt: skip
        checks[entry["role"]] = check
        if not check.ok:
            failures.append(f"{_shown(source, root, path)}: {check.reason}")
    if failures:
        raise ReleaseError(f"{source}: parity check failed:\n  " + "\n  ".join(failures))
    return checks


def _check_replay(root: Path, source: Path, manifest: dict[str, Any]) -> dict[str, ReplayCheck]:
    """A text-generation bundle: each decoder file replays the stored greedy decode
    (slimship.decoder.replay); ReleaseError naming every file that fails and its first differing position."""
    section = manifest["text_generation"]
    manifest_shown = _shown(source, root, root / mf.MANIFEST_NAME)
    listed = {f["path"] for f in manifest["files"]}
    checks, failures = {}, []
    for role, entry in sorted(section["files"].items()):
        path = confined_path(root, entry["path"], f"text_generation.files.{role}.path", manifest_shown)
        shown = _shown(source, root, path)
        if entry["path"] not in listed:
            raise ReleaseError(
                f"{shown}: text_generation.files.{role} is not listed in files[], so no checksum covers it; "
                "the manifest was edited, fetch the bundle again"
            )
        checks[role] = replay_file(path, role, entry, section["reference"], shown)
        if not checks[role].ok:
            failures.append(f"{shown}: {checks[role].reason}")
    if failures:
        raise ReleaseError(f"{source}: reference decode check failed:\n  " + "\n  ".join(failures))
    return checks


def _load_reference(path: Path, ref: dict[str, Any], where: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    try:  # headers checked against the memory budget before any array is inflated
        arrays = read_npz_arrays(path, [*ref["inputs"], *ref["outputs"]])
    except SlimshipError as exc:
        detail = str(exc).removeprefix(f"{path}: ")
        raise ReleaseError(f"{where}: {detail} (named by reference_io in the manifest)") from None
    except OSError as exc:
        raise ReleaseError(f"{where}: not a readable .npz of plain arrays ({exc})") from exc
    return arrays[: len(ref["inputs"])], arrays[len(ref["inputs"]) :]


def _parity_of(
    path: Path,
    entry: dict[str, Any],
    recorded: dict[str, Any] | None,
    inputs: list[np.ndarray],
    expected: list[np.ndarray],
    where: str,
) -> ParityCheck:
    role = entry["role"]
    if recorded is None:
        reason = f"the manifest records no parity[{role!r}] for it; a released model file always has one"
        return ParityCheck(role, entry["path"], math.inf, 0.0, False, reason=reason)
    precision = _file_precision(path, entry["format"], where)
    actual = _run_model(path, entry["format"], inputs, where)
    result, _ = judge_cases([expected], [actual], ["reference"], *bounds(precision))  # the export's rule
    own = result.tolerance
    claimed_tol, claimed_diff = recorded.get("tolerance"), recorded.get("max_abs_diff")
    tolerance = min(own, claimed_tol) if isinstance(claimed_tol, int | float) else own
    check = ParityCheck(
        role, entry["path"], result.max_abs_diff, tolerance, True, precision, result.rel_bound,
        claimed_diff, claimed_tol,
    )  # fmt: skip
    check.reason = _parity_problem(result, tolerance, own, claimed_diff)
    check.ok = not check.reason
    if isinstance(claimed_tol, int | float) and claimed_tol > own:
        log.info("%s: the manifest's tolerance %.3g is looser than verify's %.3g (%s); verify's applies",
                 where, claimed_tol, own, precision)  # fmt: skip
    return check


def _parity_problem(result: Comparison, tolerance: float, own: float, claimed_diff: Any) -> str:
    """Why a re-run fails, or "" when it passes its bound and matches the manifest's claim."""
    if not result.passed:
        return f"max abs difference {result.max_abs_diff:.3g} from the reference outputs: {result.reason}"
    if result.max_abs_diff > tolerance:
        return (
            f"max abs difference {result.max_abs_diff:.3g} from the reference outputs "
            f"> the manifest's own tolerance {tolerance:.3g}"
        )
    if not isinstance(claimed_diff, int | float) or not math.isfinite(claimed_diff):
        return f"the manifest records max_abs_diff {claimed_diff!r}, not a finite figure verify can confirm"
    if abs(claimed_diff - result.max_abs_diff) > own:
        return (
            f"the manifest claims max_abs_diff {claimed_diff:.3g}, verify measures "
            f"{result.max_abs_diff:.3g} (more than the tolerance {own:.3g} apart); the manifest does not "
            "describe this file"
        )
    return ""


def _file_precision(path: Path, fmt: str, where: str) -> str:
    try:
        return _PRECISION_OF[fmt](path)
    except ReleaseError:
        raise
    except Exception as exc:
        raise ReleaseError(f"{where}: could not read the model file ({type(exc).__name__}: {exc})") from exc


# ------------------------------------------------------------------------------------------ paths


def confined_path(root: Path, rel: Any, key: str, where: str | None = None) -> Path:
    """`root / rel`, refused with a ReleaseError naming `key` unless it stays inside the bundle.

    Relative, '/'-separated, no '..', not absolute, no backslash or drive, no symlink on the way, and
    resolved inside `root`. `where` names the manifest in the message (default: root/manifest.json).
    """
    problem = _path_problem(rel)
    if problem is None:
        path = root / rel
        problem = _link_problem(root, PurePosixPath(rel))
        if problem is None and not path.resolve().is_relative_to(root.resolve()):
            problem = "resolves outside the bundle"
    if problem:
        shown = where or root / mf.MANIFEST_NAME
        raise ReleaseError(
            f"{shown}: {key} is {rel!r}: {problem}; a bundle path must be relative and stay inside the bundle"
        )
    return root / rel


def _path_problem(rel: Any) -> str | None:
    if not isinstance(rel, str) or not rel:
        return "not a non-empty string"
    if rel.startswith("/") or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive:
        return "an absolute path"
    if "\\" in rel or "\x00" in rel:
        return "has a backslash or NUL"
    if ".." in PurePosixPath(rel).parts:
        return "has '..'"
    return None


def _link_problem(root: Path, rel: PurePosixPath) -> str | None:
    current = root
    for part in rel.parts:
        current = current / part
        if current.is_symlink():
            return f"goes through the symlink {current.relative_to(root).as_posix()!r}"
    return None


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

    from slimship.loading import load_program

    module = load_program(path).module  # never unpickles
    with torch.no_grad():
        result = module(*(torch.from_numpy(np.array(x)) for x in inputs))
    return flatten_outputs(result, path.name)
