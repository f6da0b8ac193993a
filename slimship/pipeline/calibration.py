"""What int8 formats are calibrated on, decided once for `slimship run` and the CLI.

The user's samples when there are any: the first CALIBRATION_SAMPLES samples of the data factory's train
split (its test split without one) for `run`, the --calibration file for the CLI. Without samples, an int8
format is calibrated on RANDOM_CALIBRATION batches of seeded random inputs shaped like the example, said on
stderr and recorded as such: never on the one example alone, and never silently. The record
{samples, source} goes into the export's JSON and the manifest when an int8 format is exported.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from slimship.exporters.common import TensorSpec, random_like
from slimship.exporters.registry import get_format
from slimship.pipeline.records import Calibration, CalibrationData

CALIBRATION_SAMPLES = 64  # samples `run` takes from the data factory
RANDOM_CALIBRATION = 32  # batches of random inputs an int8 format calibrates on without samples


def int8_formats(formats: Iterable[str]) -> list[str]:
    """The formats among `formats` that are calibrated (full int8)."""
    return [f for f in dict.fromkeys(formats) if get_format(f).precision == "int8"]


def _batch(example: tuple[torch.Tensor, ...]) -> int:
    return int(example[0].shape[0]) if example and example[0].dim() else 1


def calibration(
    formats: Iterable[str],
    example: tuple[torch.Tensor, ...],
    given: CalibrationData | None,
    lacking: str,
    hint: str,
) -> CalibrationData:
    """The calibration of `formats`: the `given` samples, else (for an int8 format) the random fallback,
    noted on stderr with `lacking` (what was not given) and `hint` (how to give real samples). The record
    is kept only when an int8 format is exported; the batches are kept either way (the CLI also checks
    parity on them)."""
    needs = int8_formats(formats)
    if given is None or not given.batches:
        if not needs:
            return CalibrationData()
        source = f"{RANDOM_CALIBRATION} batches of random inputs ({lacking})"
        print(
            f"note: {', '.join(needs)} calibrated on {source}; {hint} for a representative int8 model",
            file=sys.stderr,
        )
        batches = [random_like(example, seed=1000 + i) for i in range(RANDOM_CALIBRATION)]
        return CalibrationData(batches, Calibration(RANDOM_CALIBRATION * _batch(example), source), real=False)
    return given if needs else CalibrationData(given.batches, None, given.real)


def from_data(
    train: Any, test: Any, factory: str | None, limit: int = CALIBRATION_SAMPLES
) -> CalibrationData | None:
    """The first `limit` samples (one per batch) of the data factory's train split, else its test split;
    None without data."""
    for split, batches in (("train", train), ("test", test)):
        if batches is None:
            continue
        samples: list[tuple[torch.Tensor, ...]] = []
        for batch in batches:
            x = batch[0] if isinstance(batch, tuple | list) else batch
            samples += [(x[i : i + 1],) for i in range(min(len(x), limit - len(samples)))]
            if len(samples) >= limit:
                break
        if samples:
            source = f"data.factory {factory}: first {len(samples)} samples of the {split} split"
            return CalibrationData(samples, Calibration(len(samples), source), real=True)
    return None


def from_file(path: Path, example: tuple[torch.Tensor, ...]) -> CalibrationData:
    """--calibration FILE.npz as tensor tuples, checked against the model's inputs (a static batch must
    match the file's samples)."""
    from slimship.inputs import load_calibration

    specs = [
        TensorSpec(f"input_{i}", ["batch", *t.shape[1:]], str(t.dtype).removeprefix("torch."))
        for i, t in enumerate(example)
    ]
    batch = _batch(example)
    samples = load_calibration(path, specs, batch)
    batches = [tuple(torch.from_numpy(a.copy()) for a in sample) for sample in samples]
    return CalibrationData(batches, Calibration(len(batches) * batch, str(path)), real=True)
