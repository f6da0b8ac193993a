"""A bundle's files: their names and kinds, and the byte-reproducible writers (.npz, tarball, modes) that
both writing (`release`) and checking (`verify`) a bundle rely on."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimship._util import current_umask, new_file_mode
from slimship.errors import ReleaseError
from slimship.exporters.registry import FAMILY_BY_SUFFIX, FORMATS

PT2_NAME, WEIGHTS_NAME, REFERENCE_NAME = "model.pt2", "model.safetensors", "reference_io.npz"
CARD_NAME, REPORT_NAME, MODEL_STEM = "MODEL_CARD.md", "report.html", "model"
RESERVED_ROLES = frozenset({"pt2", "safetensors", "reference-io", "model-card", "report", "manifest"})
# Model file kinds verify re-runs (parity required at release time): the registry's families and the .pt2.
RUNNABLE_FORMATS = frozenset({*FAMILY_BY_SUFFIX.values(), "pt2"})
_FORMAT_BY_SUFFIX = {**FAMILY_BY_SUFFIX, ".pt2": "pt2", ".md": "markdown", ".html": "html"}
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_TAR_MTIME = 0


def bundle_file_name(role: str, source: Path) -> str:
    """The name of a model file in the bundle: `model.onnx`, `model.fp32.tflite`, `model.int8.pte`, ...

    A role naming a registered format whose suffix the file has is named by its format record; any other
    role keeps its name: `model.ROLE.EXT`.
    """
    record, suffix = FORMATS.get(role), source.suffix.lower()
    if record is not None and record.suffix == suffix:
        return record.file_name(MODEL_STEM)
    return f"{MODEL_STEM}.{role}{suffix}"


def bundle_file_names(model_files: dict[str, Path]) -> dict[str, str]:
    """Role -> bundle file name for every model file; ReleaseError when two roles get the same name."""
    names: dict[str, str] = {}
    for role in sorted(model_files):
        rel = bundle_file_name(role, Path(model_files[role]))
        clash = next((r for r, n in names.items() if n == rel), None)
        if clash is not None or rel in (PT2_NAME, WEIGHTS_NAME, REFERENCE_NAME, CARD_NAME, REPORT_NAME):
            raise ReleaseError(
                f"model_files[{role!r}] would be stored as {rel}, which "
                + (f"model_files[{clash!r}] already is" if clash else "the bundle uses for its own file")
                + "; give the roles distinct names"
            )
        names[role] = rel
    return names


def normalise_modes(root: Path) -> None:
    """Give every file below `root` the mode `open()` would (0644 under umask 022), folders 0755 likewise.

    Some writers (mkstemp, the staging folder) create 0600/0700; a published bundle is readable like any
    other file the user writes."""
    file_mode = new_file_mode()
    dir_mode = 0o777 & ~current_umask()
    os.chmod(root, dir_mode)
    for path in _walk_sorted(root):
        os.chmod(path, dir_mode if path.is_dir() else file_mode)


def format_of(path: Path) -> str:
    return _FORMAT_BY_SUFFIX.get(path.suffix.lower(), path.suffix.lower().lstrip(".") or "bin")


def flatten_outputs(result: Any, where: str) -> list[np.ndarray]:
    leaves, _ = torch.utils._pytree.tree_flatten(result)
    if not leaves or not all(isinstance(leaf, torch.Tensor) for leaf in leaves):
        raise ReleaseError(
            f"{where} must return tensors (or a tuple/list/dict of tensors), got {type(result)}"
        )
    return [leaf.detach().cpu().contiguous().numpy() for leaf in leaves]


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz (readable by np.load) with fixed entry order and timestamps, so its bytes are reproducible."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for key in sorted(arrays):
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            data = io.BytesIO()
            np.lib.format.write_array(data, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            archive.writestr(info, data.getvalue())
    return buffer.getvalue()


def _walk_sorted(root: Path) -> Iterator[Path]:
    """Every entry below root (directories before their contents), in sorted order."""
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        yield entry
        if entry.is_dir() and not entry.is_symlink():
            yield from _walk_sorted(entry)


def write_tarball(bundle: Path, dest: Path) -> Path:
    """A reproducible .tar.gz of `bundle` (entries under `bundle.name/`), written to `dest`."""
    raw = io.BytesIO()
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        tar.addfile(_tarinfo(bundle.name, tarfile.DIRTYPE, 0))
        for path in _walk_sorted(bundle):
            arcname = f"{bundle.name}/{path.relative_to(bundle).as_posix()}"
            if path.is_symlink() or not (path.is_dir() or path.is_file()):
                raise ReleaseError(f"{path}: only regular files and directories can go into a bundle")
            if path.is_dir():
                tar.addfile(_tarinfo(arcname, tarfile.DIRTYPE, 0))
            else:
                with path.open("rb") as handle:
                    tar.addfile(_tarinfo(arcname, tarfile.REGTYPE, path.stat().st_size), handle)
    dest.write_bytes(raw.getvalue())
    return dest


def _tarinfo(name: str, kind: bytes, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.mtime = _TAR_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info
