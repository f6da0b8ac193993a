"""Training and compression helpers of the pipeline: the model and data from the config's factories, dense
training, the completion check of a compression method, and the plots its history makes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from slimship._util import sha256_bytes
from slimship.compress.training import LoopOptions, train_loop
from slimship.errors import ConfigError, StoppedEarly
from slimship.pipeline.config import PipelineConfig


def top1_accuracy(model: torch.nn.Module, test: Any, output: int | str | None = None) -> float | None:
    """Top-1 (percent) on `test` of the logits `output` (the config's `data.output`) selects."""
    if test is None:
        return None
    from slimship.data import evaluate_accuracy

    return round(float(evaluate_accuracy(model, test, output)), 3)


def train_dense(model: torch.nn.Module, train: Any, epochs: int, lr: float, seed: int) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    train_loop(
        model, train, LoopOptions(epochs=epochs, seed=seed), optimizer=optimizer, desc="dense training"
    )


@dataclass
class Trained:
    """What every rank holds after training and compression (on CPU again), for rank 0 to publish."""

    compressed: torch.nn.Module
    result: Any  # the CompressResult, or None without compression
    compress_info: dict[str, Any]
    compress_plots: dict[str, Any]
    dense_acc: float | None
    train: Any  # the data factory's train data, unsharded (calibration, factorisation)
    test: Any
    example: tuple[torch.Tensor, ...]
    trace_example: tuple[torch.Tensor, ...]
    ranks: dict[str, Any] = field(default_factory=dict)  # processes, and whether they ended alike


def build_model(config: PipelineConfig) -> torch.nn.Module:
    model_cfg = config.model
    model = config.build("model")
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"'model.factory' returned {type(model).__name__}, not an nn.Module")
    if model_cfg.checkpoint is not None:
        from slimship.compress.imports import load_state_checkpoint

        built = model
        model = load_state_checkpoint(
            model_cfg.checkpoint, lambda: built, allow_pickle=model_cfg.allow_pickle
        )
    return model


def check_completed(method: str, options: Any, result: Any) -> None:
    """Raise StoppedEarly when `result` ended before its last epoch (the `stop_after` option): the method's
    ``info["completed"]``, else its last epoch record against its `epochs` option."""
    stop, epochs = getattr(options, "stop_after", None), getattr(options, "epochs", None)
    done = int(result.history[-1].get("epoch", 0)) if result.history else 0
    completed = result.info.get("completed")
    if completed is None:
        completed = stop is None or epochs is None or done >= epochs
    if completed:
        return
    checkpoint = getattr(options, "checkpoint", None)
    resume = (
        "raise or remove compress.options.stop_after and run the same command again to resume from "
        f"{checkpoint}"
        if checkpoint is not None
        else "set compress.options.checkpoint to resume a stopped run; without it the run starts afresh"
    )
    raise StoppedEarly(
        f"compress ({method}) stopped after epoch {done} of {epochs} (stop_after={stop}); nothing released; "
        + resume
    )


def train_and_test(data: Any, factory: str) -> tuple[Any, Any]:
    """The data factory's (train, test) pair; anything else is a ConfigError naming it."""
    if not isinstance(data, tuple | list) or len(data) != 2:
        raise ConfigError(
            f"'data.factory' {factory} returned {type(data).__name__}; return a pair (train, test) "
            "(either may be None)"
        )
    return data[0], data[1]


def state_digest(model: torch.nn.Module) -> str:
    return sha256_bytes(
        b"".join(
            t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            for t in model.state_dict().values()
        )
    )


def plain_info(info: dict[str, Any]) -> dict[str, Any]:
    """Keep JSON-friendly scalars and short lists of a compression method's info."""
    out = {}
    for key, value in info.items():
        scalar = isinstance(value, int | float | str | bool) or value is None
        if scalar or (isinstance(value, list | dict) and len(str(value)) < 4000):
            out[key] = value
    return out


_NOT_PLOTTED = ("epoch", "steps")  # counters, not quantities a person reads off a training plot


def history_plots(method: str, history: list[dict[str, Any]]) -> dict[str, Any]:
    """One report plot per numeric series a compression method recorded per epoch."""
    keys = sorted(
        {k for rec in history for k, v in rec.items() if isinstance(v, int | float) and k not in _NOT_PLOTTED}
    )
    series = {}
    for key in keys:
        points = [
            (i, float(rec[key])) for i, rec in enumerate(history, 1) if isinstance(rec.get(key), int | float)
        ]
        if len(points) > 1:
            series[key] = {"x": [p[0] for p in points], "y": [p[1] for p in points]}
    if not series:
        return {}
    return {f"{method} training": {"series": series, "xlabel": "epoch", "ylabel": "value"}}


def search_plots(method: str, info: dict[str, Any]) -> dict[str, Any]:
    """Plots of a policy search (ADC): its reward per episode and the kept fraction it chose per space."""
    plots: dict[str, Any] = {}
    curve = info.get("reward_curve") or []
    if len(curve) > 1:
        plots[f"{method} search reward"] = {
            "series": {"reward": {"x": list(range(1, len(curve) + 1)), "y": [float(r) for r in curve]}},
            "xlabel": "episode",
            "ylabel": "reward",
        }
    policy = info.get("policy") or {}
    if policy:
        plots[f"{method} policy"] = {
            "kind": "barh",
            "labels": list(policy),
            "values": [float(f) for f in policy.values()],
            "xlabel": "kept fraction of the space's channels",
        }
    return plots
