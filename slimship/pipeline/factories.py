"""The config's factories: `package.module:function` import paths resolved (beside the config file first)
and their keyword arguments checked against the function's signature."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from slimship.errors import ConfigError, first_line


def signature_problems(fn: Callable[..., Any], kwargs: dict[str, Any], key: str, name: str) -> list[str]:
    """What is wrong with calling `fn(**kwargs)`: unknown keys, missing required arguments."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = []
    else:
        takes = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        unknown = [k for k in kwargs if k not in takes]
        if unknown:
            allowed = ", ".join(sorted(takes)) or "no keyword arguments"
            return [f"unknown key '{key}.{k}'; {name} takes: {allowed}" for k in unknown]
    missing = [
        n for n, p in params.items()
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in kwargs
    ]  # fmt: skip
    return [f"missing required key '{key}.{n}' ({name} has no default for it)" for n in missing]


def resolve(import_path: str, key: str, base_dir: str | Path | None = None) -> Callable[..., Any]:
    """Import 'package.module:function'; ConfigError names the config key on failure.

    With `base_dir` (the config file's folder), a module or package found there (`myfactory.py` or
    `mypkg/`) is imported from there, whatever the current folder; anything else from the installed
    packages. `sys.path` is changed only for the duration of that import."""
    module_name, _, attr = import_path.partition(":")
    try:
        module = _import(module_name, Path(base_dir) if base_dir is not None else None)
    except ImportError as exc:
        where = f" (looked in {base_dir} and the installed packages)" if base_dir is not None else ""
        raise ConfigError(f"'{key}': cannot import module {module_name!r}{where} ({exc})") from None
    except Exception as exc:  # the module itself failed while importing
        raise ConfigError(
            f"'{key}': importing module {module_name!r} raised {type(exc).__name__}: {first_line(exc)}"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"'{key}': module {module_name!r} has no callable {attr!r}")
    return fn


def _import(module_name: str, base_dir: Path | None) -> types.ModuleType:
    top = module_name.split(".", 1)[0]
    if base_dir is None or not ((base_dir / f"{top}.py").is_file() or (base_dir / top).is_dir()):
        return importlib.import_module(module_name)
    _forget_if_elsewhere(top, base_dir)
    with _on_sys_path(base_dir):
        return importlib.import_module(module_name)


def _forget_if_elsewhere(top: str, base_dir: Path) -> None:
    """Drop a cached module `top` (and its submodules) imported from another folder than `base_dir`, so the
    one beside this config is imported (two configs in two folders may both have a `myfactory.py`)."""
    cached = sys.modules.get(top)
    where = getattr(cached, "__file__", None)
    if top == "slimship" or top in sys.stdlib_module_names:
        return
    if cached is None or where is None or Path(where).resolve().is_relative_to(base_dir.resolve()):
        return
    for name in [n for n in sys.modules if n == top or n.startswith(f"{top}.")]:
        del sys.modules[name]


@contextlib.contextmanager
def _on_sys_path(folder: Path) -> Iterator[None]:
    """`folder` first on sys.path for the duration of the block only."""
    entry = str(folder.resolve())
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)
