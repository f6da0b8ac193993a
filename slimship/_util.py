"""Small shared helpers: hashing, atomic writes, a cache folder's lock, JSON conversion, seeding."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import fcntl
import hashlib
import json
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def current_umask() -> int:
    """The process umask: from /proc on Linux (no change to the process), else set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0666 minus the umask (0644 with the usual 022)."""
    return 0o666 & ~current_umask()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` through a temp file in the same directory and a rename.

    The file gets the mode a plain `open()` would give it (0644 under the usual umask), not mkstemp's 0600.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold `folder`'s lock (a `.lock` file in it, created with the folder): one preparer of a shared cache
    at a time, other processes wait."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def dangling_link(folder: Path) -> Path | None:
    """The first of `folder` and its parents that is a symlink to nothing (None: there is none)."""
    for part in (folder, *folder.parents):
        if part.is_symlink() and not part.exists():
            return part
    return None


def write_problem(folder: Path) -> str | None:
    """Why a folder cannot be created and written at `folder`, found by trying: a temporary folder is made
    (and removed) in its nearest existing ancestor. None when it can."""
    link = dangling_link(folder)
    if link is not None:
        return f"{link} is a symlink to {os.readlink(link)}, which does not exist"
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".slimship-probe-", dir=probe))
    except OSError as exc:
        return f"nothing can be written in {probe} ({exc.strerror or type(exc).__name__})"
    return None


def file_in_the_way(folder: Path) -> Path | None:
    """The first of `folder` and its parents that exists and is not a folder (None: it can be a folder)."""
    for part in (folder, *folder.parents):
        if part.exists() and not part.is_dir():
            return part
    return None


def to_jsonable(value: Any) -> Any:
    """Convert dataclasses, enums, paths, numpy and torch scalars into plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "item") and hasattr(value, "numel") and value.numel() == 1:  # torch scalar
        return value.item()
    return value


def dump_json(value: Any) -> str:
    """Deterministic JSON text (sorted keys, 2-space indent, trailing newline)."""
    return json.dumps(to_jsonable(value), indent=2, sort_keys=True) + "\n"


def set_seed(seed: int) -> None:
    """Seed Python, numpy and torch."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
