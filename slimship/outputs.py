"""Where a command writes: every output location is checked creatable and writable before any work, and
an OSError in the final write is an error naming the path (the one place the CLI checks its outputs)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from slimship._util import file_in_the_way, write_problem
from slimship.errors import SlimshipError


def check_output_file(path: Path, option: str) -> None:
    """Refuse an output file path that is a folder, whose parent is not an existing folder, or whose
    folder cannot be written (found by trying)."""
    path = Path(path)
    if path.is_dir():
        raise SlimshipError(f"{option} {path}: is a folder; give the path of a file to write")
    if not path.parent.is_dir():
        what = "is a file" if path.parent.exists() else "does not exist"
        raise SlimshipError(f"{option} {path}: its folder {path.parent} {what}; create the folder first")
    _check_writable(path.parent, path, option)


def check_output_dir(path: Path, option: str) -> None:
    """Refuse an output folder path that is an existing file (or lies below one), or that cannot be created
    and written (found by trying in its nearest existing folder)."""
    path = Path(path)
    blocker = file_in_the_way(path)
    if blocker is not None:
        raise SlimshipError(f"{option} {path}: {blocker} is a file, not a folder; give a folder path")
    _check_writable(path, path, option)


def check_new_dir(path: Path, option: str) -> None:
    """An output folder that must not exist yet, in an existing folder that can be written."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise SlimshipError(f"{option} {path}: already exists; remove it or choose another {option}")
    check_output_file(path, option)


def refuse_existing(paths: list[Path], option: str) -> None:
    """Nothing is overwritten: an output file that already exists is an error before any work."""
    taken = [p for p in paths if p.exists() or p.is_symlink()]
    if taken:
        names = ", ".join(str(p) for p in taken)
        raise SlimshipError(f"{option}: {names} already exists; remove it or choose another {option}")


def _check_writable(folder: Path, path: Path, option: str) -> None:
    """Refuse `path` when nothing can be created in `folder` (or its nearest existing ancestor)."""
    problem = write_problem(folder)
    if problem:
        raise SlimshipError(f"{option} {path}: {problem}; give a writable location")


@contextlib.contextmanager
def writing(path: Path, option: str) -> Iterator[None]:
    """The final write of `path`: an OSError (a disk full, a folder made read-only meanwhile) becomes an
    error naming the path instead of a traceback."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise SlimshipError(f"{option} {path}: could not be written ({reason}); nothing was kept") from exc


def move_all(moves: list[tuple[Path, Path]], option: str) -> None:
    """Move each (source, dest) file; on any failure the files already moved are removed again (whole or
    nothing) and the error names the destination."""
    done: list[Path] = []
    try:
        for source, dest in moves:
            with writing(dest, option):
                shutil.move(str(source), dest)
            done.append(dest)
    except BaseException:
        for dest in done:
            dest.unlink(missing_ok=True)
        raise
