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
import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, PrivateAttr, ValidationError, create_model
from pydantic.fields import FieldInfo

from slimship._yaml import load_yaml
from slimship.compress.device import DEVICE_RE, DEVICE_RULE, STRATEGIES
from slimship.compress.registry import METHODS, load_builtin_methods
from slimship.compress.training import Training
from slimship.errors import ConfigError, SlimshipError, first_line
from slimship.exporters.registry import FORMATS as FORMAT_TABLE
from slimship.pipeline.config_checks import READINESS_CHECKS
from slimship.pipeline.factories import resolve
from slimship.pipeline.gates import GatesSpec
from slimship.pipeline.names import NAME_RE, NAME_RULE, VERSION_RE, VERSION_RULE
from slimship.pipeline.section import Section
from slimship.pipeline.section import spec_field as _f
from slimship.runtimes.registry import RUNTIMES

# names come from the format and runtime registries (one table each; adding one there adds it here)
FORMATS: tuple[str, ...] = tuple(name for name, r in FORMAT_TABLE.items() if r.task is None)  # one pass
ALIGN_RUNTIMES: tuple[str, ...] = tuple(name for name, r in RUNTIMES.items() if r.times_alignment)
SEED_MAX = 2**32 - 1  # np.random.seed's largest (torch and random take more)
IMPORT_PATH = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"

Format = Literal[FORMATS]  # type: ignore[valid-type]
AlignRuntime = Literal[ALIGN_RUNTIMES]  # type: ignore[valid-type]


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
    output: Annotated[int, Field(ge=0)] | str | None = _f(
        None,
        "which model output holds the (batch, classes) logits accuracy is measured on: its index among "
        "the flattened outputs (0, 1 ...) or its dict key (e.g. cls); needed when the model returns "
        "named outputs (a dict)",
    )


class TrainSpec(Section):
    epochs: int = _f(0, "a non-negative integer", ge=0)
    lr: float = _f(1e-3, "a positive number", gt=0)
    device: str = _f(
        "auto",
        f"{DEVICE_RULE} (where dense training and compression run; auto: cuda, else mps, else cpu)",
        pattern=DEVICE_RE.pattern,
    )
    strategy: Literal[STRATEGIES] = _f(  # type: ignore[valid-type]
        "ddp", "ddp or fsdp (under torchrun: replicas with DistributedDataParallel, or FSDP2 shards)"
    )


class SlimSpec(Section):
    merge: bool = _f(True, "true or false")
    fold_constants: bool = _f(True, "true or false")
    rtol: float = _f(1e-5, "a number in (0, 1)", gt=0, lt=1)
    channel_multiple: Annotated[int, Field(ge=1)] | Literal["auto", "latency"] | None = _f(
        None,
        "a positive integer, 'auto' (one multiple measured on the first target), 'latency' (per channel "
        "space, the kept count measured fastest on the first target) or null",
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


class CompressSpec(Section):
    """Base of the per-method `compress` models (see `compress_model`)."""

    method: str
    options: BaseModel


class PipelineConfig(Section):
    """The whole config. `targets_file` entries are resolved into `target_profiles()` at validation."""

    seed: int = _f(0, f"a non-negative integer up to {SEED_MAX} (numpy's seed range)", ge=0, le=SEED_MAX)
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

    def resolve_targets(self, table: dict[str, Any]) -> None:
        """Record the Target of every name in `targets` (from `table`; set once, at validation)."""
        self._profiles = {name: table[name] for name in self.targets}

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
    """Option name -> (YAML annotation, default): the fields of the method's options object and of its
    Training (a user's method without them: its keyword-only parameters and type hints)."""
    fn = METHODS[method]
    options, training = getattr(fn, "options_type", None), getattr(fn, "training_defaults", None)
    hints: dict[str, Any] = {}
    for source in (Training, options or getattr(fn, "__wrapped__", fn)):
        with contextlib.suppress(Exception):  # a user's method with unresolvable hints: options untyped
            hints |= typing.get_type_hints(source)
    if options is None:  # a method without an options object: its keyword-only parameters
        defaults = {
            p.name: p.default
            for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
    else:
        defaults = {f.name: f.default for f in dataclasses.fields(options)}
        if training is not None:
            defaults |= {f.name: getattr(training, f.name) for f in dataclasses.fields(Training)}
    out = {}
    for name, default in defaults.items():
        tp = _yaml_type(hints.get(name, Any))
        if tp is not None:
            out[name] = (tp, default)
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
    return create_model(title, __config__=Section.model_config, **fields)


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


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read (bounded YAML) and validate a config file; `overrides` (e.g. from the CLI) win.

    Factory modules are looked for beside the config file as well as among the installed packages."""
    return validate(load_yaml(path, "config file"), str(path), overrides, base_dir=Path(path).parent)
