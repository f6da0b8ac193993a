"""One memory budget for what a file declares, checked before anything is allocated.

Sizes written inside a file (a model input's shape, a graph node's output, a stored weight's sizes and
strides, an .npz array's header) are claims: each is checked here against one limit before slimship
allocates it. The limit is a quarter of this machine's memory unless `--max-memory` sets it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from slimship.errors import SlimshipError

_SHARE = 4  # default budget: 1/_SHARE of the machine's physical memory
#: copies of its inputs a run holds at once (generated, written for the runner, read back, the runtime's)
INPUT_COPIES = 4
_override: int | None = None


class MemoryBudgetError(SlimshipError):
    """A file declares a tensor (or inputs) larger than the memory budget."""


def machine_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def max_memory() -> int:
    """The budget in bytes: `--max-memory` when given, else a quarter of the machine's memory."""
    return _override if _override is not None else machine_memory() // _SHARE


def set_max_memory(limit: int | None) -> None:
    """Set (or with None, reset to the default) the budget for this process."""
    global _override
    if limit is not None and limit <= 0:
        raise SlimshipError(f"--max-memory {limit}: give a positive size such as 4GiB")
    _override = limit


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(i?)b?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'4GiB', '512M', '1.5g', '1000000' -> bytes (K/M/G/T are powers of 1024, as in the GiB units)."""
    match = _SIZE.fullmatch(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (e.g. 4GiB, 512MiB)")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"not a size: {text!r} (e.g. 4GiB, 512MiB)")
    return int(value)


def human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(nbytes) < 1024 or unit == "PiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError  # unreachable


def numel(shape: Iterable[int]) -> int:
    """Elements of a shape (Python ints: no overflow); a negative dim is refused by the callers."""
    return math.prod(int(n) for n in shape)


def _limit_text() -> str:
    if _override is not None:
        return f"the --max-memory budget of {human(_override)}"
    machine = human(machine_memory())
    share = f"a quarter of this machine's {machine}; --max-memory sets it"
    return f"the memory budget of {human(max_memory())} ({share})"


def check_tensor(where: str, what: str, shape: Iterable[int], itemsize: int, copies: int = 1) -> int:
    """Refuse `what` of `shape` (`itemsize` bytes per element) when `copies` of it exceed the budget;
    returns its size in bytes."""
    dims = [int(n) for n in shape]
    if any(n < 0 for n in dims):
        raise MemoryBudgetError(f"{where}: {what} declares a negative size {dims}")
    nbytes = numel(dims) * int(itemsize)
    check_bytes(where, f"{what} of shape {dims}", nbytes, copies)
    return nbytes


def check_bytes(where: str, what: str, nbytes: int, copies: int = 1) -> None:
    """Refuse `copies` x `nbytes` over the budget, naming `where` (the file) and `what` (the tensor)."""
    if nbytes * copies > max_memory():
        held = f" ({copies} copies: {human(nbytes * copies)})" if copies > 1 else ""
        raise MemoryBudgetError(
            f"{where}: {what} would take {human(nbytes)}{held}, over {_limit_text()}; a file's declared "
            "sizes are checked before anything is allocated"
        )
