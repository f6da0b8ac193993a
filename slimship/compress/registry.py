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
from slimship.compress.shards import sharded_model
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
    name: str,
    *,
    training: Training | None = None,
    options: type | None = None,
    check: Callable[..., None] | None = None,
) -> Callable[[Callable[..., CompressResult]], Callable[..., CompressResult]]:
    """Decorator: make `fn` available as ``compress(name, ...)``.

    With `options` (a frozen dataclass of the method's options), `fn` takes ``options: that class``;
    with `training`, `fn` takes a ``training: Training`` argument. The registered method takes the
    fields of both as flat keyword options (Training's defaulting to `training`'s values), checked by
    name; it also takes ``options=`` a ready options object, which the flat options then override.
    """

    def wrap(fn: Callable[..., CompressResult]) -> Callable[..., CompressResult]:
        method = fn if training is None and options is None else _with_options(fn, training, options)
        if name in METHODS and METHODS[name] is not method:
            raise CompressionError(f"compression method {name!r} is registered twice")
        if check is not None:
            method.option_check = check  # type: ignore[attr-defined]
        METHODS[name] = method
        return method

    return wrap


def _option_fields(training: Training | None, options: type | None) -> list[inspect.Parameter]:
    """The flat keyword options an options class and Training give (fields, defaults, annotations)."""
    kw = inspect.Parameter.KEYWORD_ONLY
    own = [] if options is None else [(f, f.default) for f in fields(options)]
    shared = [] if training is None else [(f, getattr(training, f.name)) for f in fields(Training)]
    return [inspect.Parameter(f.name, kw, default=default, annotation=f.type) for f, default in own + shared]


def _with_options(
    fn: Callable[..., CompressResult], training: Training | None, options: type | None
) -> Callable[..., CompressResult]:
    """`fn(..., training=Training, options=Options)` as a method with their fields as flat keyword options."""
    signature = inspect.signature(fn)
    takes = {"training": training is not None, "options": options is not None}
    own = [p for p in signature.parameters.values() if not takes.get(p.name)]
    flat = _option_fields(training, options)
    names = [p.name for p in flat]
    clash = ({p.name for p in own} & set(names)) | {n for n in names if names.count(n) > 1}
    missing = [k for k, wanted in takes.items() if wanted and k not in signature.parameters]
    if missing or clash:
        raise CompressionError(
            f"method {fn.__name__} must take {missing} and none of its flat options itself "
            f"(clash: {sorted(clash)})"
        )
    train_names = {f.name for f in fields(Training)} if training is not None else set()
    option_names = {f.name for f in fields(options)} if options is not None else set()

    @functools.wraps(fn)
    def method(
        model: nn.Module,
        example_inputs: Any,
        train: Any,
        test: Any = None,
        *,
        options: Any = None,
        **flat: Any,
    ) -> CompressResult:
        kwargs = {k: v for k, v in flat.items() if k not in train_names | option_names}
        if training is not None:
            kwargs["training"] = replace(training, **{k: v for k, v in flat.items() if k in train_names})
        if options_type is not None:
            base = options_type() if options is None else options
            if not isinstance(base, options_type):
                raise CompressionError(
                    f"{fn.__name__}: options must be a {options_type.__name__}, got {type(base).__name__}"
                )
            kwargs["options"] = replace(base, **{k: v for k, v in flat.items() if k in option_names})
            check_object(kwargs["options"])
        elif options is not None:
            raise CompressionError(f"{fn.__name__} takes no options object")
        return fn(model, example_inputs, train, test, **kwargs)

    options_type = options
    method.__signature__ = signature.replace(parameters=own + flat)  # type: ignore[attr-defined]
    method.options_type = options  # type: ignore[attr-defined]
    method.training_defaults = training  # type: ignore[attr-defined]
    return method


def check_object(options: Any) -> None:
    """Run an options object's own rules: its ``check()`` method, when its class defines one."""
    check = getattr(options, "check", None)
    if callable(check):
        check()


def check_options(method: str, values: dict[str, Any]) -> None:
    """The rules `method` applies to its flat options when it runs, applied to `values` now (a config is
    checked with them before any work): Training's for the shared ones, the options object's for the rest.
    A method registered without an options object or Training has no rules here."""
    fn = _lookup(method)
    options, training = getattr(fn, "options_type", None), getattr(fn, "training_defaults", None)
    shared = {f.name for f in fields(Training)} if training is not None else set()
    if training is not None:
        replace(training, **{k: v for k, v in values.items() if k in shared})  # Training.__post_init__
    if options is not None:
        own = {f.name for f in fields(options)}
        check_object(options(**{k: v for k, v in values.items() if k in own}))
    rule = getattr(fn, "option_check", None)
    if rule is not None:
        rule(**(method_options(method) | values))


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
    if sharded_model(model):
        raise CompressionError(
            f"compress({method!r}): the model is already sharded (DTensor parameters); pass the plain model: "
            "slimship's loop shards its own copy under training_strategy('fsdp') (train.strategy: fsdp)"
        )
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
