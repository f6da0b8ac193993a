"""Up-front argument checks of the compression entry points: a CompressionError naming the argument.

Every public function of the methods' user-loop pieces (HAKD, ADC, LoRITa) checks the types and ranges
of its arguments with these before it does any work, so a wrong call fails with the argument's name and
what it must be instead of a Python error deep inside torch.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from slimship.errors import CompressionError


def refuse(name: str, what: str, value: Any) -> CompressionError:
    """The error for argument `name` that must be `what` but is `value` (shown with its type)."""
    if isinstance(value, torch.Tensor):
        shown = f"of shape {tuple(value.shape)}"
    else:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    return CompressionError(f"{name} must be {what}, got {type(value).__name__} {shown}")


def check_module(name: str, value: Any, *, optional: bool = False) -> None:
    """`value` must be a torch ``nn.Module`` (or None when `optional`)."""
    if optional and value is None:
        return
    if not isinstance(value, nn.Module):
        raise refuse(name, "a torch nn.Module" + (" or None" if optional else ""), value)


def named(name: str, message: str) -> CompressionError:
    """A CompressionError about option `name`; its ``option`` attribute holds the bare option name (what a
    config names as ``compress.options.NAME``), or None when `name` names no option."""
    found = re.match(r"(?:option ')?([A-Za-z_]\w*)(?:'|\[|$)", name)
    error = CompressionError(message)
    error.option = found.group(1) if found else None  # type: ignore[attr-defined]
    return error


def label(name: str) -> str:
    """How an argument is named in a message: a bare option name as ``option 'name'``, else as given."""
    return f"option {name!r}" if name.isidentifier() else name


def is_number(value: Any) -> bool:
    """A real number: Python's or numpy's ints and floats (a bool is not a number here)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def is_int(value: Any) -> bool:
    """An integer: Python's or numpy's (a bool is not an integer here)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def check_int(name: str, value: Any, low: int = 0) -> int:
    """`value` as an int if it is an integer (not a bool) >= `low`, else CompressionError naming it."""
    if not is_int(value) or value < low:
        raise named(name, f"{label(name)} must be an int >= {low}, got {value!r}")
    return int(value)


def check_number(
    name: str,
    value: Any,
    low: float = 0.0,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = True,
) -> float:
    """`value` as a float if it is a finite number in the interval from `low` to `high` (ends closed or
    open as given; no upper end by default), else CompressionError naming the argument."""
    ok = is_number(value) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        if high == math.inf:
            bound = f"{'>' if low_open else '>='} {low:g}"
        else:
            bound = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise named(name, f"{label(name)} must be a number {bound}, got {value!r}")
    return float(value)


def check_fraction(name: str, value: Any, high_open: bool = True) -> float:
    """`value` as a float if it is a number in [0, 1) (or [0, 1]), else CompressionError naming it."""
    return check_number(name, value, 0.0, 1.0, high_open=high_open)


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> Any:
    """`value` if it is one of `allowed`, else CompressionError naming the option."""
    if value not in allowed:
        raise named(name, f"{name}={value!r} is not one of {tuple(allowed)}")
    return value


def check_callable(name: str, value: Any, what: str, *, optional: bool = False) -> None:
    """`value` must be callable (`what` says as what), or None when `optional`."""
    if (optional and value is None) or callable(value):
        return
    raise refuse(name, what + (" or None" if optional else ""), value)


def check_batches(name: str, value: Any) -> list[tuple[Any, Any]]:
    """`value` must be an iterable of ``(inputs, targets)`` pairs; returns them as a list."""
    if not isinstance(value, Iterable) or isinstance(value, str | bytes):
        raise refuse(name, "an iterable of (inputs, targets) batches", value)
    batches = list(value)
    for i, batch in enumerate(batches):
        if not isinstance(batch, tuple | list) or len(batch) != 2:
            raise refuse(f"{name}[{i}]", "an (inputs, targets) pair", batch)
    return [tuple(b) for b in batches]


def with_overrides(what: str, options: Any, overrides: dict[str, Any]) -> Any:
    """`options` (a frozen dataclass) with the fields `overrides` names replaced; other names refused."""
    if not dataclasses.is_dataclass(options) or isinstance(options, type):
        raise refuse(f"{what} options", "an options object (a frozen dataclass)", options)
    known = {f.name for f in dataclasses.fields(options)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise CompressionError(
            f"{what} has no option {', '.join(map(repr, unknown))}; "
            f"allowed options: {', '.join(sorted(known))}"
        )
    return dataclasses.replace(options, **overrides)
