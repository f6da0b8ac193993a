"""Up-front argument checks of the compression entry points: a CompressionError naming the argument.

Every public function of the methods' user-loop pieces (HAKD, ADC, LoRITa) checks the types and ranges
of its arguments with these before it does any work, so a wrong call fails with the argument's name and
what it must be instead of a Python error deep inside torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

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


def check_int(name: str, value: Any, minimum: int) -> int:
    """`value` must be an int (not a bool) >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise refuse(name, f"an integer >= {minimum}", value)
    return value


def check_number(name: str, value: Any, low: float, high: float, *, low_open: bool, high_open: bool) -> float:
    """`value` must be a real number (not a bool) in the interval from `low` to `high` (ends as given)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise refuse(name, f"a number in {interval}", value)
    return float(value)


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
