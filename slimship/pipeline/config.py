"""The pipeline's YAML config: loading and validation with messages that name the key path."""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from slimship.errors import ConfigError

FORMATS = ("onnx", "tflite-fp32", "tflite-fp16", "tflite-int8-dynamic", "tflite-int8")

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "model": {"kwargs": {}},
    "data": None,
    "train": None,
    "compress": None,
    "slim": {"merge": True, "fold_constants": True, "rtol": 1e-5, "channel_multiple": None},
    "export": {"formats": ["onnx", "tflite-fp32"], "dynamic_batch": True},
    "targets": ["mobile-1t"],
    "bench": {"runs": 50, "warmup": 5},
    "release": {"name": "model", "version": "0.1.0", "out": "artifacts"},
}

# key path -> (check, what is allowed); a trailing ".*" entry lists a section's allowed keys
Check = Callable[[Any], bool]
SCHEMA: dict[str, tuple[Check, str]] = {
    "seed": (lambda v: isinstance(v, int) and v >= 0, "a non-negative integer"),
    "model": (lambda v: isinstance(v, dict), "a mapping with factory, input_shape, kwargs"),
    "model.factory": (lambda v: isinstance(v, str) and ":" in v, "an import path 'package.module:function'"),
    "model.input_shape": (
        lambda v: isinstance(v, list) and v and all(isinstance(i, int) and i > 0 for i in v),
        "a list of positive integers without the batch dim, e.g. [1, 8, 8]",
    ),
    "model.kwargs": (lambda v: isinstance(v, dict), "a mapping of keyword arguments"),
    "model.checkpoint": (lambda v: isinstance(v, str), "a path to a state_dict file"),
    "model.allow_pickle": (lambda v: isinstance(v, bool), "true only for a trusted checkpoint"),
    "data": (lambda v: v is None or isinstance(v, dict), "a mapping with factory and kwargs, or null"),
    "data.factory": (lambda v: isinstance(v, str) and ":" in v, "an import path returning (train, test)"),
    "data.kwargs": (lambda v: isinstance(v, dict), "a mapping of keyword arguments"),
    "train": (lambda v: v is None or isinstance(v, dict), "a mapping with epochs and lr, or null"),
    "train.epochs": (lambda v: isinstance(v, int) and v >= 0, "a non-negative integer"),
    "train.lr": (lambda v: isinstance(v, int | float) and v > 0, "a positive number"),
    "compress": (lambda v: v is None or isinstance(v, dict), "a mapping with method and options, or null"),
    "compress.method": (lambda v: isinstance(v, str), "a method name (see `slimship methods`)"),
    "compress.options": (lambda v: isinstance(v, dict), "a mapping of the method's options"),
    "slim": (lambda v: isinstance(v, dict), "a mapping"),
    "slim.merge": (lambda v: isinstance(v, bool), "true or false"),
    "slim.fold_constants": (lambda v: isinstance(v, bool), "true or false"),
    "slim.rtol": (lambda v: isinstance(v, int | float) and 0 < v < 1, "a number in (0, 1)"),
    "slim.channel_multiple": (
        lambda v: v is None or v == "auto" or (type(v) is int and v >= 1),
        "a positive integer, 'auto' (measured on the first target) or null",
    ),
    "slim.align_runtime": (
        lambda v: v in ("onnxruntime", "litert", "tflite_runtime"),
        "onnxruntime, litert or tflite_runtime (the runtime 'auto' measures on)",
    ),
    "export": (lambda v: isinstance(v, dict), "a mapping"),
    "export.formats": (
        lambda v: isinstance(v, list) and bool(v) and all(f in FORMATS for f in v),
        f"a non-empty list of {', '.join(FORMATS)}",
    ),
    "export.dynamic_batch": (lambda v: isinstance(v, bool), "true or false"),
    "targets": (
        lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v),
        "a list of target names (built-in or from targets_file)",
    ),
    "targets_file": (lambda v: isinstance(v, str), "a path to a targets YAML file"),
    "bench": (lambda v: isinstance(v, dict), "a mapping"),
    "bench.runs": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "bench.warmup": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    "release": (lambda v: isinstance(v, dict), "a mapping with name, version, out"),
    "release.name": (
        lambda v: isinstance(v, str) and v.replace("-", "").replace("_", "").replace(".", "").isalnum(),
        "letters, digits, '.', '-' and '_'",
    ),
    "release.version": (lambda v: isinstance(v, str) and v[:1].isdigit(), "a version such as 1.0.0"),
    "release.out": (lambda v: isinstance(v, str), "a directory path"),
    "release.notes": (lambda v: isinstance(v, str), "text for the model card"),
}
REQUIRED = ("model.factory", "model.input_shape")


def _merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = _merge(base.get(key), value) if key in base else value
        return out
    return copy.deepcopy(override)


def validate(raw: Any, source: str = "config") -> dict[str, Any]:
    """Merge defaults into `raw` and check every key; ConfigError names the key path and what is allowed."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
    config = _merge(DEFAULTS, raw)
    _check_section(config, "", source)
    for path in REQUIRED:
        if _get(config, path) is None:
            raise ConfigError(f"{source}: missing required key '{path}' ({SCHEMA[path][1]})")
    _check_compress(config.get("compress"), source)
    _check_alignment(config, source)
    return config


def _check_alignment(config: dict[str, Any], source: str) -> None:
    """`slim.channel_multiple: auto` measures on the first target (built-in or from `targets_file`):
    there must be one, and an emulated one is refused before any work starts."""
    if config["slim"].get("channel_multiple") != "auto":
        return
    from slimship.runtimes.targets import get_target, load_targets

    if not config["targets"]:
        raise ConfigError(f"{source}: 'slim.channel_multiple' is 'auto' but 'targets' is empty; name one")
    extra = load_targets(config["targets_file"]) if config.get("targets_file") else None
    first = get_target(config["targets"][0], extra)
    if first.emulated:
        raise ConfigError(
            f"{source}: 'slim.channel_multiple' is 'auto' but the first target {first.name!r} is emulated "
            "(its timings are not a device's); put a real target first or give the multiple as a number"
        )


def _check_compress(section: dict[str, Any] | None, source: str) -> None:
    """The method exists and takes every option given (checked before any training starts)."""
    if not section or section.get("method") is None:
        return
    from slimship.compress.base import METHODS, load_builtin_methods, method_options

    load_builtin_methods()
    method = section["method"]
    if method not in METHODS:
        raise ConfigError(f"{source}: 'compress.method' is {method!r}; allowed: {', '.join(sorted(METHODS))}")
    allowed = method_options(method)
    for key in section.get("options") or {}:
        if key not in allowed:
            raise ConfigError(
                f"{source}: unknown key 'compress.options.{key}' for method {method!r}; "
                f"allowed: {', '.join(sorted(allowed))}"
            )


def _check_section(section: dict[str, Any], prefix: str, source: str) -> None:
    for key, value in section.items():
        path = f"{prefix}{key}"
        if path not in SCHEMA:
            level = [k[len(prefix) :] for k in SCHEMA if k.startswith(prefix)]
            siblings = sorted(k for k in level if "." not in k)
            raise ConfigError(f"{source}: unknown key '{path}'; allowed here: {', '.join(siblings)}")
        check, allowed = SCHEMA[path]
        if value is None and path in ("data", "train", "compress"):
            continue
        if not check(value):
            raise ConfigError(f"{source}: '{path}' is {value!r}; expected {allowed}")
        if isinstance(value, dict) and not path.endswith(("kwargs", "options")):
            _check_section(value, f"{path}.", source)


def _get(config: dict[str, Any], path: str) -> Any:
    value: Any = config
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def load_config(path: str | Path) -> dict[str, Any]:
    """Read and validate a YAML config file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return validate(raw, str(path))


def resolve(import_path: str, key: str) -> Callable[..., Any]:
    """Import 'package.module:function'; ConfigError names the config key on failure."""
    module_name, _, attr = import_path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"'{key}': cannot import module {module_name!r} ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"'{key}': module {module_name!r} has no callable {attr!r}")
    return fn
