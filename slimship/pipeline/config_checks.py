"""What the config's model tree cannot see alone, checked before any work: targets, factories and their
kwargs, one trace of the model, the release folder, the latency gate's targets and the training device.
Each check returns its problems (one line each); `READINESS_CHECKS` runs them in order."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimship._util import write_problem
from slimship.budget import INPUT_COPIES, MemoryBudgetError, check_tensor
from slimship.compress.registry import check_options
from slimship.errors import CompressionError, ConfigError, SlimshipError, first_line
from slimship.pipeline.factories import signature_problems

if TYPE_CHECKING:
    from slimship.pipeline.config import PipelineConfig


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
    config.resolve_targets(table)
    return _check_alignment(config)


def _check_alignment(config: PipelineConfig) -> list[str]:
    mode = config.slim.channel_multiple
    if mode not in ("auto", "latency"):
        return []
    if not config.targets:
        return [f"'slim.channel_multiple' is '{mode}' but 'targets' is empty; name one"]
    first = config.target_profiles()[0]
    if first.emulated:
        return [
            f"'slim.channel_multiple' is '{mode}' but the first target {first.name!r} is emulated "
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
    The example batch is checked against the memory budget first (nothing that large is allocated).

    Skipped when the factory or its kwargs are already reported. An input_shape that only works with its
    first entry taken as the batch is named as such."""
    try:
        build = config.factory("model")
    except ConfigError:
        return []
    if signature_problems(build, config.model.kwargs, "model.kwargs", config.model.factory):
        return []
    shape = list(config.model.input_shape)
    try:  # the trace's batch of 2 (float32) against --max-memory, as a file's declared inputs are
        check_tensor("'model.input_shape'", "the example batch", [2, *shape], 4, INPUT_COPIES)
    except MemoryBudgetError as exc:
        return [str(exc).replace("a file's declared sizes are", "an example input is")]
    import torch

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
        return _trace_problems(model, shape) or _output_problems(config, model, shape)


def _output_problems(config: PipelineConfig, model: Any, shape: list[int]) -> list[str]:
    """With data, `data.output` selects one (batch, classes) output to measure accuracy on: a model with
    several named outputs must name it (an ambiguous choice is refused here, not after training)."""
    if config.data is None:
        return []
    import torch

    from slimship.data import select_logits

    with torch.no_grad():
        output = model(torch.randn(1, *shape))
    try:
        select_logits(output, config.data.output)
    except SlimshipError as exc:
        return [f"'data.output': {exc}"]
    return []


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


def _check_options(config: PipelineConfig) -> list[str]:
    """`compress.options` under the rules the method applies when it runs (registry.check_options)."""
    if config.compress is None:
        return []
    try:
        check_options(config.compress.method, config.compress.options.model_dump())
    except CompressionError as exc:
        option = getattr(exc, "option", None)
        return [f"'compress.options{'.' + option if option else ''}': {exc}"]
    return []


def _check_device(config: PipelineConfig) -> list[str]:
    """`train.device` names a device this machine has (cuda asked on a machine without it is refused)."""
    from slimship.compress.device import device_problem

    problem = device_problem(config.device)
    if problem is None:
        return []
    return [f"'train.device' is {config.device!r}; {problem}; use auto or an available device"]


READINESS_CHECKS: tuple[Callable[[PipelineConfig], list[str]], ...] = (
    _check_options,
    _check_device,
    _check_targets,
    _check_kwargs,
    _check_input_shape,
    _check_out,
    _check_latency_gate,
)
