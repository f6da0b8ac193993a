"""Checked exports a later release reuses: an export folder's index and the keys it is looked up by.

`slimship export --out DIR` writes `DIR/slimship-exports.json` beside its files: one entry per file, keyed
by what decides the file's bytes (the model's content, the format and its options, the calibration data
of a calibrated format, slimship's and the converters' versions), holding the file's sha256 and its
parity verdict with the sha256 of the data it was judged on. `slimship release --exports DIR` and
`slimship run --exports DIR` look each format up there before exporting: a file is reused only when its
key matches and its copy's sha256 is the recorded one (a tampered or truncated file is exported again,
said at INFO); when the release's own data differs from the data of the recorded verdict, the copy is
judged again on the release's data. `run` also records its new exports in DIR (a cache folder, at most
MAX_ENTRIES entries: the oldest go first).

The index is untrusted input: read only up to MAX_INDEX_BYTES, parsed as JSON (no pickle), checked
against a strict schema (pydantic, unknown keys refused); file names are plain names inside DIR.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slimship._util import atomic_write_bytes, sha256_file
from slimship._version import __version__
from slimship.errors import ModelFileError, SlimshipError
from slimship.exporters.common import ParityReport, module_hash
from slimship.exporters.registry import FORMATS, ExportRequest, FormatRecord
from slimship.pt2_checks import parse_json

log = logging.getLogger(__name__)

INDEX_NAME = "slimship-exports.json"
SCHEMA = "slimship-exports/1"
MAX_INDEX_BYTES = 4 << 20
MAX_ENTRIES = 256
#: the packages whose versions change a family's bytes (with torch and slimship)
FAMILY_TOOLS: dict[str, tuple[str, ...]] = {
    "onnx": ("onnx", "onnxscript", "onnxruntime"),
    "tflite": ("litert-torch", "ai-edge-quantizer", "torchao"),
    "executorch": ("executorch", "torchao"),
}

Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Text = Annotated[str, Field(max_length=4000)]
FileName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class CaseFigures(_Strict):
    max_abs_diff: float
    max_rel_diff: float
    tolerance: float


class Verdict(_Strict):
    """A passed `ParityReport`, as the index stores it."""

    max_abs_diff: float
    max_rel_diff: float
    tolerance: float
    rel_bound: float
    passed: Literal[True]
    cases: Annotated[list[Annotated[str, Field(max_length=200)]], Field(max_length=4096)]
    top1_agreement: float | None = None
    top1_min: float | None = None
    reason: Text = ""
    per_case: Annotated[dict[Annotated[str, Field(max_length=200)], CaseFigures], Field(max_length=4096)]
    reference_case: Annotated[str, Field(max_length=200)] | None = None

    def report(self) -> ParityReport:
        per_case = {name: c.model_dump() for name, c in self.per_case.items()}
        return ParityReport(**(self.model_dump() | {"per_case": per_case}))


class IndexEntry(_Strict):
    """One checked file: its key, name, sha256 and size, and the verdict with the data it was judged on."""

    key: Hex64
    format: Annotated[str, Field(max_length=64)]
    file: FileName
    sha256: Hex64
    bytes: Annotated[int, Field(ge=1)]
    data_sha256: Hex64
    parity: Verdict
    dynamic_batch: bool | None = None
    notes: Annotated[list[Text], Field(max_length=64)] = []


class IndexFile(_Strict):
    schema_: Literal["slimship-exports/1"] = Field(alias="schema")
    entries: Annotated[list[IndexEntry], Field(max_length=MAX_ENTRIES)]

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class ExportIndexError(SlimshipError):
    """An export folder's index that cannot be read or does not follow the schema."""


# ------------------------------------------------------------------------------------------ keys


def tensors_sha256(batches: Iterable[Sequence[torch.Tensor]] | None) -> str:
    """sha256 over every tensor of `batches` (dtype, shape and bytes, in order); of nothing for None."""
    digest = hashlib.sha256()
    for batch in batches or []:
        digest.update(b"(")
        for t in batch:
            t = t.detach().cpu().contiguous()
            digest.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        digest.update(b")")
    return digest.hexdigest()


def program_sha256(module: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> str | None:
    """The content of an in-memory model: its state (names, dtypes, shapes, bytes) and the code of its
    torch.export graph; None when it does not trace (then nothing is reused or recorded)."""
    try:
        program = torch.export.export(module, example, strict=False)
    except Exception as exc:  # the exporters report what fails to trace
        log.info("exports not reusable: the model does not trace (%s)", str(exc)[:200])
        return None
    graph = program.graph_module.code
    return hashlib.sha256(f"{module_hash(module)}|{graph}".encode()).hexdigest()


def _versions(record: FormatRecord) -> dict[str, str]:
    versions = {"slimship": __version__, "torch": torch.__version__}
    for package in FAMILY_TOOLS.get(record.family, ()):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    return versions


@dataclass(frozen=True)
class Provenance:
    """What an export's files are keyed by: the model's content digest (a .pt2's or folder's bytes, or
    `program_sha256` of an in-memory model)."""

    model_sha256: str

    def key(self, record: FormatRecord, request: ExportRequest) -> str:
        """Everything that changes the file's bytes."""
        calibrated = record.precision == "int8"
        fields = {
            "model": self.model_sha256,
            "format": record.name,
            "precision": record.precision,
            "example": tensors_sha256([request.example]),
            "trace_example": tensors_sha256([request.trace_example]),
            "dynamic_batch": request.dynamic_batch,
            "output_names": request.output_names,
            "calibration": tensors_sha256(request.calibration) if calibrated else None,
            "versions": _versions(record),
        }
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def provenance_of(source: Any) -> Provenance | None:
    """The provenance of a model named on the command line (slimship.sources.ModelSource): the bytes of a
    .pt2 or checkpoint folder, else the in-memory program's content (None when it does not trace)."""
    if source.kind in ("pt2", "folder"):
        return Provenance(source.sha256)
    digest = program_sha256(source.module, source.example)
    return None if digest is None else Provenance(digest)


def data_sha256(request: ExportRequest) -> str:
    """The data a file's verdict is judged on: example, trace example, calibration and evaluation batches."""
    parts = (request.example, request.trace_example)
    digest = "|".join([tensors_sha256([p]) for p in parts] + [tensors_sha256(request.calibration)])
    return hashlib.sha256(f"{digest}|{tensors_sha256(request.eval_batches)}".encode()).hexdigest()


# ------------------------------------------------------------------------------------------ the index


@dataclass
class ExportIndex:
    """An export folder and its index (entries by key, in the order they were added)."""

    folder: Path
    entries: dict[str, IndexEntry] = field(default_factory=dict)
    cache: bool = False  # a cache folder (`run --exports`): its files are its own, evicted with their entry

    @property
    def path(self) -> Path:
        return self.folder / INDEX_NAME

    @classmethod
    def load(cls, folder: Path, *, required: bool = False, cache: bool = False) -> ExportIndex:
        """The index of `folder` (empty without one, unless `required`); ExportIndexError names the file
        and the key that is wrong. A `cache` folder's files are evicted with their entries."""
        folder = Path(folder)
        path = folder / INDEX_NAME
        if not path.is_file():
            if required:
                raise ExportIndexError(
                    f"{path}: no export index there; write one with `slimship export MODEL --out {folder}`"
                )
            return cls(folder, cache=cache)
        with open(path, "rb") as handle:
            data = handle.read(MAX_INDEX_BYTES + 1)
        if len(data) > MAX_INDEX_BYTES:
            raise ExportIndexError(f"{path}: larger than {MAX_INDEX_BYTES} bytes; not an export index")
        try:
            raw = parse_json(data, str(path), unique_keys=False, parse_constant=_no_constant)
            parsed = IndexFile.model_validate(raw)
        except ModelFileError as exc:  # not JSON, or nested too deeply
            why = str(exc).removeprefix(f"{path}: ")
            raise ExportIndexError(f"{path}: not an export index ({why})") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise ExportIndexError(f"{path}: not an export index ({_why(exc)})") from None
        return cls(folder, {e.key: e for e in parsed.entries}, cache)

    def find(self, key: str) -> IndexEntry | None:
        return self.entries.get(key)

    def add(self, entry: IndexEntry) -> None:
        """Add (or refresh) an entry; past MAX_ENTRIES the oldest entries go (in a cache, with their files;
        an export folder's files stay where the user put them)."""
        self.entries.pop(entry.key, None)
        self.entries[entry.key] = entry
        while len(self.entries) > MAX_ENTRIES:
            oldest = self.entries.pop(next(iter(self.entries)))
            if self.cache and all(e.file != oldest.file for e in self.entries.values()):
                (self.folder / oldest.file).unlink(missing_ok=True)

    def save(self) -> None:
        """Write the index atomically (entries whose file is gone are dropped)."""
        entries = [e for e in self.entries.values() if (self.folder / e.file).is_file()]
        payload = IndexFile(schema=SCHEMA, entries=entries).model_dump(mode="json", by_alias=True)
        atomic_write_bytes(self.path, (json.dumps(payload, indent=1, sort_keys=True) + "\n").encode())


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def _why(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "(top level)"
        return f"key {where}: {error['msg']}"
    return str(exc)[:200]


def entry_for(key: str, fmt: str, path: Path, result: Any, data: str) -> IndexEntry | None:
    """The index entry of an exported file at `path` (None when its verdict cannot be stored: a figure
    that is not finite, a name that is not a plain file name)."""
    parity = result.parity
    figures = [parity.max_abs_diff, parity.max_rel_diff, parity.tolerance, parity.top1_agreement or 0.0]
    if not parity.passed or not all(math.isfinite(f) for f in figures):
        return None
    try:
        return IndexEntry(
            key=key, format=fmt, file=path.name, sha256=sha256_file(path), bytes=path.stat().st_size,
            data_sha256=data, parity=Verdict.model_validate(_verdict(parity), strict=False),
            dynamic_batch=getattr(result, "dynamic_batch", None),
            notes=list(getattr(result, "notes", None) or []),
        )  # fmt: skip
    except ValidationError as exc:
        log.info("%s: not recorded in the export index (%s)", path, _why(exc))
        return None


def _verdict(parity: ParityReport) -> dict[str, Any]:
    return {k: getattr(parity, k) for k in Verdict.model_fields} | {"cases": list(parity.cases)}


# ------------------------------------------------------------------------------------------ reuse


@dataclass
class ReusedExport:
    """A checked file taken from an export index instead of exported again (what `describe` and the
    release read of an exporter's result)."""

    path: Path
    bytes: int
    sha256: str
    format: str
    parity: ParityReport
    dynamic_batch: bool | None
    notes: list[str]
    reused_from: Path
    rejudged: bool = False
    timings: dict[str, float] = field(default_factory=dict)


def reuse(
    index: ExportIndex, key: str, record: FormatRecord, dest: Path, data: str, judge: Any
) -> ReusedExport | None:
    """The indexed file of `key` copied to `dest` when its copy's sha256 is the recorded one, its verdict
    judged again by `judge(path, dynamic_batch)` when `data` differs from the verdict's; else None (why
    is said at INFO and nothing is left at `dest`)."""
    entry = index.find(key)
    if entry is None or entry.format != record.name:
        return None
    source = index.folder / entry.file
    if source.is_symlink() or not source.is_file():
        log.info("%s: not reused: %s is missing; exporting again", record.name, source)
        return None
    shutil.copyfile(source, dest)  # the copy is what is checked and released
    digest = sha256_file(dest)
    if digest != entry.sha256:
        dest.unlink(missing_ok=True)
        log.info("%s: not reused: %s changed since it was checked (sha256 %s, recorded %s); exporting again",
                 record.name, source, digest[:12], entry.sha256[:12])  # fmt: skip
        return None
    rejudged = data != entry.data_sha256
    parity, problem = _judged_again(judge, dest, entry) if rejudged else (entry.parity.report(), "")
    if problem:
        dest.unlink(missing_ok=True)
        log.info("%s: not reused: %s: %s; exporting again", record.name, source, problem)
        return None
    log.info("%s: reused %s (sha256 checked%s)", record.name, source,
             ", judged again on this data" if rejudged else "")  # fmt: skip
    return ReusedExport(dest, entry.bytes, digest, record.name, parity, entry.dynamic_batch,
                        list(entry.notes), source, rejudged)  # fmt: skip


def _judged_again(judge: Any, path: Path, entry: IndexEntry) -> tuple[Any, str]:
    """(the verdict on this data, "") when it passes, else (None, why not)."""
    try:
        parity = judge(path, entry.dynamic_batch)
    except SlimshipError as exc:  # the file does not load or run here: exporting it says why
        return None, str(exc)[:300]
    return (parity, "") if parity.passed else (None, "it fails its check on this data")


def atomic_copy(source: Path, dest: Path) -> None:
    """Copy `source` to `dest` through a temp file beside `dest` and a rename (no half-written file)."""
    tmp = dest.with_name(f".{dest.name}.partial")
    try:
        shutil.copyfile(source, tmp)
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


def record_exports(
    index: ExportIndex,
    provenance: Provenance,
    request: ExportRequest,
    files: Mapping[str, tuple[Path, Any]],
) -> int:
    """Add each format's file (already in `index.folder`) with its result to the index and save it; the
    number of entries added."""
    data, added = data_sha256(request), 0
    for fmt, (path, result) in files.items():
        entry = entry_for(provenance.key(FORMATS[fmt], request), fmt, path, result, data)
        if entry is not None:
            index.add(entry)
            added += 1
    index.save()
    return added
