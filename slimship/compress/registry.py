"""The method registry: ``@register("name")`` makes a method callable as ``compress("name", ...)``.

A method is a function ``fn(model, example_inputs, train, test=None, *, option=default, ...)`` that
returns a :class:`CompressResult`. A method that trains with SGD takes ``training: Training`` instead of
repeating the shared options: ``@register("name", training=Training(epochs=20))`` gives it flat keyword
options (``epochs=``, ``lr=``, ...) with those per-method defaults, visible in its signature and in
``method_options``. Methods work on the channel groups ``slimship.slimming.find_groups`` derives from the
graph, never on hand-listed layers, and leave structure the slimming engine can remove: exactly-zero
groups or exactly identical groups.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from torch import nn

from slimship.compress.device import (
    strategy,
    world_size,
)
from slimship.compress.training import Batch, Training
from slimship.errors import CompressionError

log = logging.getLogger(__name__)

#: modules whose import registers methods; missing ones are skipped (they may not exist yet)
BUILTIN_MODULES = ("hspg", "csgd", "drop", "distill", "imports", "adc", "simguided", "lorita")


@dataclass
class CompressResult:
    """A compressed model (same architecture; structure shows as zero or identical groups)."""

    model: nn.Module
    method: str
    history: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


METHODS: dict[str, Callable[..., CompressResult]] = {}
#: methods that train under the fsdp strategy (their sparsifier follows the shards; see sparsifier.py)
SHARDABLE: set[str] = set()


def register(
    name: str, *, training: Training | None = None
) -> Callable[[Callable[..., CompressResult]], Callable[..., CompressResult]]:
    """Decorator: make `fn` available as ``compress(name, ...)``.

    With `training`, `fn` takes a ``training: Training`` argument; the registered method takes the
    fields of :class:`Training` as flat keyword options instead, defaulting to `training`'s values.
    """

    def wrap(fn: Callable[..., CompressResult]) -> Callable[..., CompressResult]:
        method = fn if training is None else _with_training(fn, training)
        if name in METHODS and METHODS[name] is not method:
            raise CompressionError(f"compression method {name!r} is registered twice")
        METHODS[name] = method
        return method

    return wrap


def _with_training(fn: Callable[..., CompressResult], defaults: Training) -> Callable[..., CompressResult]:
    """`fn(..., training=Training)` as a method with the Training fields as flat keyword options."""
    signature = inspect.signature(fn)
    own = [p for p in signature.parameters.values() if p.name != "training"]
    shared = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=getattr(defaults, f.name))
        for f in fields(Training)
    ]
    clash = {p.name for p in own} & {p.name for p in shared}
    if "training" not in signature.parameters or clash:
        raise CompressionError(
            f"method {fn.__name__} must take `training` and none of the Training options "
            f"itself (clash: {sorted(clash)})"
        )
    names = {p.name for p in shared}

    @functools.wraps(fn)
    def method(model: nn.Module, example_inputs: Any, train: Any, test: Any = None, **options: Any):
        run = {k: options.pop(k) for k in list(options) if k in names}
        return fn(model, example_inputs, train, test, training=replace(defaults, **run), **options)

    method.__signature__ = signature.replace(parameters=own + shared)  # type: ignore[attr-defined]
    return method


def load_builtin_methods() -> None:
    """Import the method modules that exist so that they register themselves."""
    for module in BUILTIN_MODULES:
        try:
            importlib.import_module(f"slimship.compress.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"slimship.compress.{module}":
                raise


def method_options(method: str) -> dict[str, Any]:
    """The keyword options of `method` with their defaults."""
    fn = _lookup(method)
    return {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def _lookup(method: str) -> Callable[..., CompressResult]:
    load_builtin_methods()
    if method not in METHODS:
        raise CompressionError(
            f"unknown compression method {method!r}; allowed: {', '.join(sorted(METHODS)) or '(none)'}"
        )
    return METHODS[method]


def compress(
    method: str,
    model: nn.Module,
    example_inputs: Any,
    train: Iterable[Batch] | None,
    test: Iterable[Batch] | None = None,
    **options: Any,
) -> CompressResult:
    """Run compression `method` on a copy of `model`; unknown methods or options raise CompressionError."""
    fn = _lookup(method)
    allowed = method_options(method)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise CompressionError(
            f"compression method {method!r} has no option {', '.join(map(repr, unknown))}; "
            f"allowed options: {', '.join(sorted(allowed))}"
        )
    if strategy() == "fsdp" and world_size() > 1 and method not in SHARDABLE:
        raise CompressionError(
            f"compression method {method!r} does not train under strategy fsdp (its hooks assume a plain "
            f"model); methods that do: {', '.join(sorted(SHARDABLE))}; or use strategy ddp"
        )
    log.info("compress: %s with %s", method, options or "defaults")
    result = fn(model, example_inputs, train, test, **options)
    result.method = method
    return result
