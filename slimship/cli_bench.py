"""`slimship bench`: files measured on a target, speedups against a dense model of the same format."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from slimship._console import Steps, note
from slimship.cli_io import emit, human, print_notes, text_generation
from slimship.errors import ConfigError


def cmd_bench(args: argparse.Namespace) -> int:
    from slimship.runtimes.measure import bench, format_bench_table, format_profile_table
    from slimship.runtimes.targets import get_target, load_targets
    from slimship.sources import bench_files

    if args.task == "text-generation":
        return text_generation("bench_command", args)

    extra = load_targets(args.targets_file) if args.targets_file else None
    target = get_target(args.target, extra)
    models = [Path(m) for m in args.models]
    dense = Path(args.dense) if args.dense else None
    if dense is not None and dense not in models:
        models.insert(0, dense)
    steps = Steps()
    with tempfile.TemporaryDirectory(prefix="slimship-bench-") as tmp:  # checkpoint folders -> .pt2
        models, dense, notes = bench_files(models, dense, Path(tmp))
        print_notes(notes)
        inputs = bench_inputs(args, models)
        calibration = bench_calibration(args, dense, inputs)
        with steps.step(f"bench {len(models)} model(s) on {target.name}, {args.runs} runs each"):
            result = bench(
                models, target, inputs, dense=dense, runs=args.runs, warmup=args.warmup, profile=args.profile,
                calibration=calibration,
            )  # fmt: skip
    human(args).print(format_bench_table(result))
    for profile in result.profiles:
        human(args).print(format_profile_table(profile))
    emit(args, result)
    return 0


def bench_calibration(args: argparse.Namespace, dense: Path | None, inputs: list[Any]) -> list[Any] | None:
    """--calibration's batches for a dense .pt2's full-int8 twins (checked against the bench inputs)."""
    if not args.calibration:
        return None
    if dense is None or dense.suffix.lower() != ".pt2":
        raise ConfigError(
            f"--calibration {args.calibration}: it calibrates the int8 files bench exports from a dense .pt2 "
            "(--dense MODEL.pt2); the files given are already calibrated"
        )
    import torch

    from slimship.pipeline.calibration import from_file

    return from_file(Path(args.calibration), tuple(torch.from_numpy(a) for a in inputs)).batches


def bench_inputs(args: argparse.Namespace, models: list[Path]) -> list[Any]:
    """--inputs (checked against every model's inputs, read on this host), else random inputs of the shapes
    read from the first model file (--input-shape replaces the first input's shape)."""
    from slimship.inputs import check_inputs, load_npz_inputs
    from slimship.sources import input_specs, random_inputs

    specs = {model: input_specs(model) for model in models}  # each model opened here first
    if not args.inputs:
        inputs, notes = random_inputs(specs[models[0]], args.input_shape)
        print_notes(notes)
        shapes = ", ".join(f"{s.name} {list(a.shape)} {a.dtype}" for s, a in zip(specs[models[0]], inputs))
        note(f"random inputs from {models[0].name}: {shapes}")
        for model, model_specs in specs.items():  # a shape the file fixes otherwise fails "on the device"
            check_inputs(inputs, model_specs, f"random inputs of --input-shape / {models[0]} (for {model})")
        return inputs
    inputs = load_npz_inputs(args.inputs, specs[models[0]])  # shapes checked from headers, before data
    for model, model_specs in specs.items():
        check_inputs(inputs, model_specs, f"{args.inputs} (for {model})")
    return inputs
