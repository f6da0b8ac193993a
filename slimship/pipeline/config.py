"""The pipeline's config: one typed model tree (pydantic v2), validated before any work starts.

Every section forbids unknown keys and takes strict types (a bool is not an int; an int is accepted
where a float is expected). Each field's description is what an error message says is expected, so a
problem reads `CONFIG: 'export.formats' is ['onnx', 'coreml']; expected a non-empty list of ...`.
`compress.options` is typed per method (one model built from the method's signature). Validation then
resolves what the model tree cannot see alone: targets (and the targets file), the factories'
signatures against their kwargs, and whether `release.out` can be written.
"""

from __future__ import annotations

import collections.abc
import contextlib
import copy
import functools
import importlib
import inspect
import os
import sys
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, create_model
from pydantic.fields import FieldInfo

from slimship._util import write_problem
from slimship._yaml import load_yaml
from slimship.compress.device import DEVICE_RE, DEVICE_RULE
from slimship.errors import ConfigError, SlimshipError, first_line
from slimship.exporters.registry import FORMATS as FORMAT_TABLE
from slimship.pipeline.names import NAME_RE, NAME_RULE, VERSION_RE, VERSION_RULE
from slimship.runtimes.registry import RUNTIMES

# names come from the format and runtime registries (one table each; adding one there adds it here)
FORMATS: tuple[str, ...] = tuple(FORMAT_TABLE)
ALIGN_RUNTIMES: tuple[str, ...] = tuple(name for name, r in RUNTIMES.items() if r.times_alignment)
IMPORT_PATH = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"

Format = Literal[FORMATS]  # type: ignore[valid-type]
AlignRuntime = Literal[ALIGN_RUNTIMES]  # type: ignore[valid-type]


def _f(default: Any, expected: str, **constraints: Any) -> Any:
    """A field whose description is what an error message says is expected."""
    if callable(default):
        return Field(default_factory=default, description=expected, **constraints)
    return Field(default, description=expected, **constraints)


class Section(BaseModel):
    """Base of every config section: unknown keys refused, strict types."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ModelSpec(Section):
    factory: str = _f(
        ..., "an import path 'package.module:function' returning an nn.Module", pattern=IMPORT_PATH
    )
    input_shape: list[Annotated[int, Field(gt=0)]] = _f(
        ..., "a list of positive integers without the batch dim, e.g. [1, 8, 8]", min_length=1
    )
    kwargs: dict[str, Any] = _f(dict, "a mapping of the factory's keyword arguments")
    checkpoint: str | None = _f(None, "a path to a state_dict file")
    allow_pickle: bool = _f(False, "true only for a trusted checkpoint")


class DataSpec(Section):
    factory: str = _f(
        ..., "an import path 'package.module:function' returning (train, test)", pattern=IMPORT_PATH
    )
    kwargs: dict[str, Any] = _f(dict, "a mapping of the factory's keyword arguments")


class TrainSpec(Section):
    epochs: int = _f(0, "a non-negative integer", ge=0)
    lr: float = _f(1e-3, "a positive number", gt=0)
    device: str = _f(
        "auto",
        f"{DEVICE_RULE} (where dense training and compression run; auto: cuda, else mps, else cpu)",
        pattern=DEVICE_RE.pattern,
    )


class SlimSpec(Section):
    merge: bool = _f(True, "true or false")
    fold_constants: bool = _f(True, "true or false")
    rtol: float = _f(1e-5, "a number in (0, 1)", gt=0, lt=1)
    channel_multiple: Annotated[int, Field(ge=1)] | Literal["auto"] | None = _f(
        None, "a positive integer, 'auto' (measured on the first target) or null"
    )
    align_runtime: AlignRuntime | None = _f(
        None, f"{', '.join(ALIGN_RUNTIMES)} (the runtime 'auto' measures on) or null"
    )


class ExportSpec(Section):
    formats: list[Format] = _f(
        lambda: ["onnx", "tflite-fp32"], f"a non-empty list of {', '.join(FORMATS)}", min_length=1
    )
    dynamic_batch: bool = _f(True, "true or false")


class BenchSpec(Section):
    runs: int = _f(50, "an integer >= 1", ge=1)
    warmup: int = _f(5, "an integer >= 0", ge=0)
    profile: bool = _f(False, "true or false (a per-layer dense vs slim profile on onnxruntime / ExecuTorch)")


class ReleaseSpec(Section):
    name: str = _f("model", NAME_RULE, pattern=NAME_RE.pattern)
    version: str = _f("0.1.0", VERSION_RULE, pattern=VERSION_RE.pattern)
    out: str = _f("artifacts", "a directory path (created if missing)", min_length=1)
    notes: str = _f("", "text for the model card")


class GatesSpec(Section):
    """What a release must meet; a gate set to null is off. See slimship.pipeline.gates."""

    max_accuracy_drop: float | None = _f(
        1.0, "percentage points of top-1 the slim model may lose against the dense one (>= 0), or null", ge=0
    )
    min_speedup: float | None = _f(
        None, "the smallest dense/slim speedup accepted per target (> 0), or null", gt=0
    )
    max_latency_ms: Annotated[float, Field(gt=0)] | dict[str, Annotated[float, Field(gt=0)]] | None = _f(
        None, "the largest p50 latency in ms, one number for every target or a mapping target -> ms, or null"
    )
    min_agreement: float | None = _f(
        0.9, "the smallest top-1 agreement of quantised variants with the slim model, in [0, 1], or null",
        ge=0, le=1,
    )  # fmt: skip


class CompressSpec(Section):
    """Base of the per-method `compress` models (see `compress_model`)."""

    method: str
    options: BaseModel


class PipelineConfig(Section):
    """The whole config. `targets_file` entries are resolved into `target_profiles()` at validation."""

    seed: int = _f(0, "a non-negative integer", ge=0)
    model: ModelSpec = _f(..., "a mapping with factory, input_shape, kwargs")
    data: DataSpec | None = _f(None, "a mapping with factory and kwargs, or null")
    train: TrainSpec | None = _f(None, "a mapping with epochs and lr, or null")
    compress: CompressSpec | None = _f(None, "a mapping with method and options, or null")
    slim: SlimSpec = _f(SlimSpec, "a mapping")
    export: ExportSpec = _f(ExportSpec, "a mapping")
    targets: list[str] = _f(lambda: ["mobile-1t"], "a list of target names (built-in or from targets_file)")
    targets_file: str | None = _f(None, "a path to a targets YAML file")
    bench: BenchSpec = _f(BenchSpec, "a mapping")
    release: ReleaseSpec = _f(ReleaseSpec, "a mapping with name, version, out")
    gates: GatesSpec = _f(GatesSpec, "a mapping of quality gates")
    _profiles: dict[str, Any] = PrivateAttr(default_factory=dict)
    _base_dir: Path | None = PrivateAttr(default=None)

    @property
    def base_dir(self) -> Path | None:
        """The config file's folder: factories are looked for there as well as in installed packages."""
        return self._base_dir

    def factory(self, section: Literal["model", "data"]) -> Callable[..., Any]:
        """The `model.factory` or `data.factory` function (see `resolve`)."""
        return resolve(getattr(self, section).factory, f"{section}.factory", self._base_dir)

    def build(self, section: Literal["model", "data"]) -> Any:
        """What the `model.factory` or `data.factory` function returns for its kwargs. The user's code
        raising (anything but a SlimshipError) is a ConfigError naming the key, the function and the error."""
        spec = getattr(self, section)
        fn = self.factory(section)
        try:
            return fn(**spec.kwargs)
        except SlimshipError:
            raise
        except Exception as exc:
            raise ConfigError(
                f"'{section}.factory' {spec.factory} raised {type(exc).__name__} with {section}.kwargs "
                f"{spec.kwargs}: {first_line(exc)}; fix the factory or its kwargs"
            ) from exc

    @property
    def device(self) -> str:
        """`train.device` (auto without a train section): where training and compression run."""
        return self.train.device if self.train is not None else "auto"

    def target_profiles(self) -> list[Any]:
        """The `targets` as resolved Target records (built-in or from `targets_file`), in order."""
        return [self._profiles[name] for name in self.targets]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (for the manifest)."""
        data = self.model_dump(mode="json")
        if self.compress is not None:
            data["compress"]["options"] = self.compress.options.model_dump(mode="json", exclude_unset=True)
        return data


# ------------------------------------------------------------------------------------ compress options


def _yaml_type(tp: Any) -> Any:
    """The annotation a YAML value can satisfy: tuples and sequences become lists, paths strings.
    None for what YAML cannot hold (callables)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Path:
        return str
    if origin in (tuple, list, Sequence, collections.abc.Sequence) and args:
        item = _yaml_type(args[0])
        return None if item is None else list[item]
    if origin in (Union, types.UnionType):
        parts = [p for p in dict.fromkeys(_yaml_type(a) for a in args) if p is not None]
        real = [p for p in parts if p is not type(None)]
        return Union[tuple(parts)] if real else None  # noqa: UP007
    if origin is collections.abc.Callable or tp is collections.abc.Callable:
        return None
    return tp


def _option_types(method: str) -> dict[str, tuple[Any, Any]]:
    """Option name -> (YAML annotation, default) from the method's signature and type hints."""
    from slimship.compress.base import METHODS, Training

    fn = METHODS[method]
    hints: dict[str, Any] = {}
    for source in (Training, getattr(fn, "__wrapped__", fn)):
        with contextlib.suppress(Exception):  # a user's method with unresolvable hints: options untyped
            hints |= typing.get_type_hints(source)
    out = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        tp = _yaml_type(hints.get(p.name, Any))
        if tp is not None:
            out[p.name] = (tp, p.default)
    return out


def _describe(tp: Any, default: Any) -> str:
    name = getattr(tp, "__name__", None) if typing.get_origin(tp) is None else None
    return f"{name or str(tp).replace('typing.', '')} (default {default!r})"


@functools.cache
def options_model(method: str) -> type[BaseModel]:
    """One pydantic model of `method`'s options (types and defaults from its signature)."""
    fields = {
        name: (tp, Field(default, description=_describe(tp, default)))
        for name, (tp, default) in _option_types(method).items()
    }
    title = "".join(part.capitalize() for part in method.replace("-", "_").split("_")) + "Options"
    return create_model(title, __config__=ConfigDict(extra="forbid", strict=True, frozen=True), **fields)


@functools.cache
def compress_model(method: str) -> type[CompressSpec]:
    """The `compress` section for one method: `method` fixed, `options` typed."""
    options = options_model(method)
    return create_model(
        f"Compress{options.__name__.removesuffix('Options')}",
        __base__=CompressSpec,
        method=(Literal[method], Field(description="the compression method")),
        options=(options, Field(default_factory=options, description="the method's options")),
    )


def _methods() -> list[str]:
    from slimship.compress.base import METHODS, load_builtin_methods

    load_builtin_methods()
    return sorted(METHODS)


@functools.cache
def _root_model(methods: tuple[str, ...]) -> type[PipelineConfig]:
    variants = tuple(compress_model(m) for m in methods)
    union = Annotated[Union[variants], Field(discriminator="method")]  # noqa: UP007
    return create_model(
        "SlimshipConfig",
        __base__=PipelineConfig,
        compress=(union | None, _f(None, "a mapping with method and options, or null")),
    )


def config_model() -> type[PipelineConfig]:
    """The root model with `compress` typed for every registered method."""
    return _root_model(tuple(_methods()))


def config_json_schema() -> dict[str, Any]:
    """The JSON Schema of a pipeline config (written to configs/slimship.schema.json)."""
    schema = config_model().model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "slimship pipeline config"
    return schema


# ------------------------------------------------------------------------------------ errors


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The BaseModel classes an annotation can hold (through Optional, Annotated and unions)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _tag(model: type[BaseModel]) -> Any:
    field = model.model_fields.get("method")
    args = typing.get_args(field.annotation) if field else ()
    return args[0] if len(args) == 1 else None


def _locate(
    root: type[BaseModel], loc: tuple[Any, ...]
) -> tuple[list[str], list[Any], FieldInfo | None, Any]:
    """Walk a pydantic error location: (field path, the rest of loc, last field, the model it ended in)."""
    models: list[type[BaseModel]] = [root]
    path: list[str] = []
    info: FieldInfo | None = None
    for i, part in enumerate(loc):
        owner = next((m for m in models if isinstance(part, str) and part in m.model_fields), None)
        if owner is not None:
            info = owner.model_fields[part]
            path.append(part)
            models = _models_in(info.annotation)
            continue
        tagged = [m for m in models if _tag(m) == part]
        if tagged:  # a discriminated union puts the tag in the location
            models = tagged
            continue
        return path, list(loc[i:]), info, models
    return path, [], info, models


def _raw_at(raw: Any, path: list[str]) -> Any:
    for part in path:
        raw = raw.get(part) if isinstance(raw, dict) else None
    return raw


def _problem(root: type[BaseModel], raw: Any, error: dict[str, Any]) -> str:
    path, rest, info, models = _locate(root, tuple(error["loc"]))
    key = ".".join(path)
    expected = info.description if info is not None and info.description else "a valid value"
    kind = error["type"]
    if kind == "extra_forbidden":
        full = ".".join([*path, *(str(p) for p in rest)])
        allowed = sorted({f for m in models for f in m.model_fields}) if models else []
        return f"unknown key '{full}'; allowed here: {', '.join(allowed) or '(none)'}"
    if kind in ("missing", "union_tag_not_found"):
        name = ".".join([*path, *(str(p) for p in rest)]) if kind == "missing" else f"{key}.method"
        return f"missing required key '{name}'" + (f" ({expected})" if kind == "missing" else "")
    if kind == "union_tag_invalid":
        ctx = error.get("ctx", {})
        allowed = str(ctx.get("expected_tags", "")).replace("'", "")
        return f"'{key}.method' is {ctx.get('tag')!r}; allowed: {allowed}"
    return f"'{key}' is {_raw_at(raw, path)!r}; expected {expected}"


def _error(source: str, problems: list[str]) -> ConfigError:
    if len(problems) == 1:
        return ConfigError(f"{source}: {problems[0]}")
    return ConfigError(f"{source}: {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))


# ------------------------------------------------------------------------------------ validation


def validate(
    raw: Any,
    source: str = "config",
    overrides: dict[str, Any] | None = None,
    base_dir: str | Path | None = None,
) -> PipelineConfig:
    """Check `raw` (with `overrides` merged in) and resolve what the pipeline needs before any work.

    `base_dir` (the config file's folder) is where factory modules are looked for first. One ConfigError
    lists every problem, each naming the key path, the value and what is allowed."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
    raw = merge(raw, overrides or {})
    root = config_model()
    try:
        config = root.model_validate(raw)
    except ValidationError as exc:
        problems = list(dict.fromkeys(_problem(root, raw, e) for e in exc.errors()))
        raise _error(source, problems) from None
    config._base_dir = None if base_dir is None else Path(base_dir).resolve()
    problems = [p for check in READINESS_CHECKS for p in check(config)]
    if problems:
        raise _error(source, problems)
    return config


def gates_from_options(values: dict[str, Any], source: str = "options") -> GatesSpec:
    """Gate limits given as command-line options, checked like the `gates:` section (named as flags)."""
    try:
        return GatesSpec.model_validate(values)
    except ValidationError as exc:
        problems = [_problem(GatesSpec, values, e) for e in exc.errors()]
        for name in GatesSpec.model_fields:
            problems = [p.replace(f"'{name}'", f"'--{name.replace('_', '-')}'") for p in problems]
        raise _error(source, problems) from None


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` with `override` merged in, mapping by mapping (neither is changed)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _check_targets(config: PipelineConfig) -> list[str]:
    """Every target exists (built-in or in `targets_file`); `channel_multiple: auto` has a real first one."""
    from slimship.runtimes.targets import BUILTIN_TARGETS, load_targets

    try:
        extra = load_targets(config.targets_file) if config.targets_file else {}
    except ConfigError as exc:
        return [f"'targets_file': {exc}"]
    table = {**BUILTIN_TARGETS, **extra}
    doubled = sorted({t for t in config.targets if config.targets.count(t) > 1})
    if doubled:
        twice = ", ".join(map(repr, doubled))
        return [f"'targets' is {config.targets!r}; {twice} appears twice; name each once"]
    unknown = [t for t in config.targets if t not in table]
    if unknown:
        names = ", ".join(map(repr, unknown))
        return [f"'targets' is {config.targets!r}; unknown {names}; known: {', '.join(sorted(table))}"]
    config._profiles = {name: table[name] for name in config.targets}
    return _check_alignment(config)


def _check_alignment(config: PipelineConfig) -> list[str]:
    if config.slim.channel_multiple != "auto":
        return []
    if not config.targets:
        return ["'slim.channel_multiple' is 'auto' but 'targets' is empty; name one"]
    first = config.target_profiles()[0]
    if first.emulated:
        return [
            f"'slim.channel_multiple' is 'auto' but the first target {first.name!r} is emulated "
            "(its timings are not a device's); put a real target first or give the multiple as a number"
        ]
    return []


def _check_kwargs(config: PipelineConfig) -> list[str]:
    """The factories import and take the kwargs given (a wrong key is named before any work)."""
    specs = [("model", config.model)] + ([("data", config.data)] if config.data else [])
    problems = []
    for section, spec in specs:
        try:
            fn = config.factory(section)
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        problems += signature_problems(fn, spec.kwargs, f"{section}.kwargs", spec.factory)
    return problems


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


def _check_out(config: PipelineConfig) -> list[str]:
    """`release.out` is a directory (or can be created) and is writable; nothing is created here."""
    if "\x00" in config.release.out or any(ord(c) < 32 for c in config.release.out):
        return [f"'release.out' is {config.release.out!r}; a path may not hold control characters"]
    out = Path(config.release.out)
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        what = "is a file" if probe == out else f"cannot be created: {probe} is a file"
        return [f"'release.out' is {config.release.out!r}; it {what}; expected a directory"]
    if not os.access(probe, os.W_OK | os.X_OK):
        return [
            f"'release.out' is {config.release.out!r}; {probe} is not writable; choose a writable directory"
        ]
    problem = write_problem(out)  # tried with a real (removed) temporary folder: /proc passes os.access
    return (
        [f"'release.out' is {config.release.out!r}; {problem}; choose a writable directory"]
        if problem
        else []
    )


def _check_latency_gate(config: PipelineConfig) -> list[str]:
    limit = config.gates.max_latency_ms
    if not isinstance(limit, dict):
        return []
    return [
        f"'gates.max_latency_ms.{name}' names no configured target; targets: {', '.join(config.targets)}"
        for name in limit
        if name not in config.targets
    ]


def _check_input_shape(config: PipelineConfig) -> list[str]:
    """One trace before any training: build the model, run one forward on a batch of 1 and export it once.

    Skipped when the factory or its kwargs are already reported. An input_shape that only works with its
    first entry taken as the batch is named as such."""
    try:
        build = config.factory("model")
    except ConfigError:
        return []
    if signature_problems(build, config.model.kwargs, "model.kwargs", config.model.factory):
        return []
    import torch

    shape = list(config.model.input_shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        try:
            model = build(**config.model.kwargs)
        except Exception as exc:  # the user's code: any failure is a config problem to report
            return [
                f"'model.factory' {config.model.factory} raised {type(exc).__name__} with model.kwargs: {exc}"
            ]
        if not isinstance(model, torch.nn.Module):
            return [
                f"'model.factory' {config.model.factory} returned {type(model).__name__}, not an nn.Module"
            ]
        model.eval()
        return _trace_problems(model, shape)


def _trace_problems(model: Any, shape: list[int]) -> list[str]:
    import torch

    try:
        with torch.no_grad():
            model(torch.randn(1, *shape))
    except Exception as exc:
        if _runs(model, shape):
            return [
                f"'model.input_shape': {shape} looks like it includes the batch dim; give the shape without "
                f"it, e.g. {shape[1:]}"
            ]
        return [
            f"'model.input_shape' is {shape}: one forward pass on a batch of shape {[1, *shape]} failed "
            f"({type(exc).__name__}: {first_line(exc)}); give the shape of one sample without the batch dim"
        ]
    try:
        torch.export.export(model, (torch.randn(2, *shape),), strict=False)
    except Exception as exc:
        return [
            f"'model': torch.export cannot trace the model on a batch of shape {[2, *shape]} "
            f"({type(exc).__name__}: {first_line(exc)}); slimming needs a traceable forward"
        ]
    return []


def _runs(model: Any, shape: list[int]) -> bool:
    """Whether the model runs on `shape` taken as a whole batch."""
    import torch

    if len(shape) < 2:
        return False
    try:
        with torch.no_grad():
            model(torch.randn(*shape))
    except Exception:
        return False
    return True


def _check_device(config: PipelineConfig) -> list[str]:
    """`train.device` names a device this machine has (cuda asked on a machine without it is refused)."""
    from slimship.compress.device import device_problem

    problem = device_problem(config.device)
    if problem is None:
        return []
    return [f"'train.device' is {config.device!r}; {problem}; use auto or an available device"]


READINESS_CHECKS: tuple[Callable[[PipelineConfig], list[str]], ...] = (
    _check_device,
    _check_targets,
    _check_kwargs,
    _check_input_shape,
    _check_out,
    _check_latency_gate,
)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read (bounded YAML) and validate a config file; `overrides` (e.g. from the CLI) win.

    Factory modules are looked for beside the config file as well as among the installed packages."""
    return validate(load_yaml(path, "config file"), str(path), overrides, base_dir=Path(path).parent)


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
