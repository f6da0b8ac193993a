"""The training loop the methods share: `Training` options, `train_loop`, checkpoints, RNG state."""

from __future__ import annotations

import copy
import inspect
import io
import logging
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slimship._util import atomic_write_bytes
from slimship.compress.checks import check_int
from slimship.compress.device import (
    broadcast_module_from_rank0,
    broadcast_object_from_rank0,
    device_of,
    is_shard_copy,
    mean_across_ranks,
    rank,
    strategy,
    to_device,
    unshard_into,
    world_size,
    wrap_for_training,
)
from slimship.errors import CompressionError

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]
Hook = Callable[..., dict[str, Any] | None]


# ---- training loop ---------------------------------------------------------------------------------
def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """The random state of CPU torch, Python and numpy, plus every CUDA device's when CUDA is initialised
    and the MPS generator's when `device` is MPS (a checkpoint's ``rng`` entry; loads with weights_only)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if device is not None and device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def _set_cuda_rng(states: list[torch.Tensor]) -> None:
    count = torch.cuda.device_count()
    if len(states) != count:
        log.warning(
            "training checkpoint: random state saved for %d CUDA devices, %d here; restoring the first %d",
            len(states), count, min(len(states), count),
        )  # fmt: skip
    for index, saved in enumerate(states[:count]):
        torch.cuda.set_rng_state(saved, index)


#: device random states a checkpoint may hold: key -> (whether this machine has the device, restore)
DEVICE_RNG: dict[str, tuple[Callable[[], bool], Callable[[Any], None]]] = {
    "cuda": (torch.cuda.is_available, _set_cuda_rng),
    "mps": (torch.backends.mps.is_available, lambda saved: torch.mps.set_rng_state(saved)),
}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a :func:`rng_state`. A device state for a device this machine lacks (a CUDA run resumed on
    CPU) is skipped with a warning: nothing random is drawn there, the CPU streams are restored as saved."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    for key, (present, restore) in DEVICE_RNG.items():
        if key not in state:
            continue
        if not present():
            log.warning(
                "training checkpoint holds a %s random state but this machine has no %s; skipped "
                "(draws on that device cannot be replayed here, the CPU streams are restored)",
                key, key,
            )  # fmt: skip
            continue
        restore(state[key])


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """torch.save `payload` to `path` atomically (temp file + rename); under torchrun on rank 0 only."""
    if rank() != 0:
        return
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a training checkpoint with ``weights_only=True``; a file that needs more is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpicklable content, truncation, foreign format
        raise CompressionError(
            f"training checkpoint {path} could not be loaded with weights_only=True ({exc}); "
            "delete it to start the training afresh"
        ) from exc


def resume_payload(path: Path | None) -> dict[str, Any] | None:
    """The checkpoint at `path` to resume from (None: start afresh). Under torchrun rank 0 reads the file
    and every rank gets its content (or its error), so all ranks continue from the same state."""
    found: tuple[str, Any] = ("none", None)
    if rank() == 0 and path is not None and path.exists():
        try:
            found = ("ok", load_checkpoint(path))
        except CompressionError as exc:
            found = ("error", str(exc))
    kind, value = broadcast_object_from_rank0(found) if path is not None else found
    if kind == "error":
        raise CompressionError(value)
    return value


def _logits(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple | list) else output


#: learning-rate schedules of `train_loop`: name -> factor(progress in [0, 1], floor) on the base rate
LR_SCHEDULES: dict[str, Callable[[float, float], float]] = {
    "constant": lambda progress, floor: 1.0,
    "cosine": lambda progress, floor: floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)),
}


def lr_factor(schedule: str, step: int, total_steps: int, floor: float = 0.0) -> float:
    """Multiplier of the base learning rate for 0-based `step` of `total_steps` under `schedule`."""
    if schedule not in LR_SCHEDULES:
        raise CompressionError(
            f"lr_schedule={schedule!r} is not a known schedule; allowed: {', '.join(LR_SCHEDULES)}"
        )
    return LR_SCHEDULES[schedule](min(step / max(total_steps, 1), 1.0), floor)


def _check_schedule(schedule: str, floor: float, batches: Iterable[Batch]) -> int | None:
    lr_factor(schedule, 0, 1, floor)  # raises on an unknown name
    if not 0.0 <= floor <= 1.0:
        raise CompressionError(f"lr_floor is a fraction of the base learning rate in [0, 1], got {floor}")
    steps = _len_or_none(batches)
    if schedule != "constant" and steps is None:
        raise CompressionError(
            f"lr_schedule={schedule!r} needs batches with a len() (to know the total steps); "
            "pass a sized batch iterable or lr_schedule='constant'"
        )
    return steps


def _set_lr(optimizer: torch.optim.Optimizer, base_lrs: list[float], factor: float) -> float:
    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = base * factor
    return float(optimizer.param_groups[0]["lr"])


@dataclass(frozen=True)
class Training:
    """The SGD run a training method shares with the others: length, rates, schedule, seed, checkpoint.

    `seed` seeds torch, numpy and `random` before training (initialisations, dropout, random choices a
    method makes); the order of the batches belongs to the batches themselves (``Batches(seed=...)``).
    """

    epochs: int = 30
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    lr_floor: float = 0.01
    seed: int = 0
    checkpoint: Path | str | None = None
    stop_after: int | None = None

    def __post_init__(self) -> None:
        if not self.lr > 0 or self.momentum < 0 or self.weight_decay < 0:
            raise CompressionError(
                f"lr must be > 0 and momentum, weight_decay >= 0; got lr={self.lr}, "
                f"momentum={self.momentum}, weight_decay={self.weight_decay}"
            )
        check_int("epochs", self.epochs, 0)
        if self.stop_after is not None:
            check_int("stop_after", self.stop_after, 1)
            if self.checkpoint is None:
                raise CompressionError(
                    f"stop_after={self.stop_after} ends the run early; give a checkpoint too, or the "
                    "training done so far is lost (the next run starts afresh)"
                )

    def run(
        self,
        model: nn.Module,
        batches: Iterable[Batch],
        *,
        desc: str,
        loss_fn: Callable[..., torch.Tensor] = F.cross_entropy,
        grad_hook: Hook | None = None,
        step_hook: Hook | None = None,
        epoch_hook: Hook | None = None,
        state: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        """`train_loop` with SGD (momentum) and these options."""
        return train_loop(
            model,
            batches,
            LoopOptions(
                epochs=self.epochs,
                seed=self.seed,
                lr_schedule=self.lr_schedule,
                lr_floor=self.lr_floor,
                checkpoint=self.checkpoint,
                stop_after=self.stop_after,
            ),
            optimizer=make_optimizer(model, self.lr, self.momentum, self.weight_decay),
            loss_fn=loss_fn,
            grad_hook=grad_hook,
            step_hook=step_hook,
            epoch_hook=epoch_hook,
            state=state,
            desc=desc,
        )

    def completed(self, history: list[dict[str, Any]]) -> bool:
        """True when `history` reaches the last epoch (False after a `stop_after` cut)."""
        return bool(history) and history[-1]["epoch"] >= self.epochs


def _set_epoch(batches: Iterable[Batch], epoch: int) -> None:
    if hasattr(batches, "set_epoch"):
        batches.set_epoch(epoch)


@dataclass(frozen=True)
class LoopOptions:
    """The options of one :func:`train_loop` run: its length, seed, rate schedule and checkpoint.

    `epochs` passes over the batches; `seed` seeds torch, numpy and `random` first; `lr_schedule` (a name
    in ``LR_SCHEDULES``) and `lr_floor` shape the rate; `checkpoint` is the file a run saves to and
    resumes from; `stop_after` ends the call after that many epochs in total (the checkpoint finishes it).
    """

    epochs: int
    seed: int = 0
    lr_schedule: str = "constant"
    lr_floor: float = 0.0
    checkpoint: Path | str | None = None
    stop_after: int | None = None


def train_loop(
    model: nn.Module,
    batches: Iterable[Batch],
    options: LoopOptions,
    *,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[..., torch.Tensor] = F.cross_entropy,
    step_hook: Hook | None = None,
    epoch_hook: Hook | None = None,
    grad_hook: Hook | None = None,
    state: dict[str, Any] | None = None,
    desc: str = "train",
) -> list[dict[str, Any]]:
    """Train `model` in place for ``options.epochs`` passes over `batches`; return one record per epoch.

    ``train_loop(model, batches, LoopOptions(epochs=3), optimizer=opt)``; the fields of `options` below
    are named as in :class:`LoopOptions`.

    Hooks get ``(model, epoch, step)``: ``grad_hook`` after ``backward`` (may edit gradients),
    ``step_hook`` after ``optimizer.step()``, ``epoch_hook`` at the end of an epoch (its dict is merged
    into the epoch's record). ``loss_fn(outputs, targets, inputs)`` may take the inputs too (distillation).
    ``state`` is a dict of the caller's mutable training state (tensors, numbers, lists); it is saved in
    the checkpoint and restored in place on resume. With `checkpoint`, the model, optimizer, epoch, RNG
    states, history and `state` are written atomically after every epoch and a run that finds the file
    resumes from it. `stop_after` ends this call after that many epochs in total (for time budgets and
    resume tests); the checkpoint then lets a later call finish the run.

    ``lr_schedule`` (a name in ``LR_SCHEDULES``) sets every parameter group's rate before each step from
    the global step: ``"cosine"`` decays per step from the optimizer's rate to ``lr_floor`` x that rate
    over all ``epochs``. The base rates are saved in the checkpoint, so a resumed run follows the same
    curve as an uninterrupted one; epoch records then carry the last rate used (``lr``).

    Each batch moves to the model's device. Under torchrun (an open process group of several ranks) the
    forward runs through DistributedDataParallel, so gradients are averaged across ranks before the hooks
    see them; `batches` should then be this rank's shard with the same number of batches on every rank.
    Rank 0 alone writes the checkpoint, every rank resumes from rank 0's file, and the epoch records count
    the samples of all ranks. At the end every rank takes rank 0's parameters and buffers (under DDP each
    rank's BatchNorm statistics follow its own last batches), so all hold the model rank 0 publishes.
    """
    epochs, seed, checkpoint, stop_after = (
        options.epochs,
        options.seed,
        options.checkpoint,
        options.stop_after,
    )
    lr_schedule, lr_floor = options.lr_schedule, options.lr_floor
    if epochs < 0:
        raise CompressionError(f"epochs must be >= 0, got {epochs}")
    steps_per_epoch = _check_schedule(lr_schedule, lr_floor, batches)
    base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
    path = Path(checkpoint) if checkpoint is not None else None
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    history: list[dict[str, Any]] = []
    start = 0
    device = device_of(model)
    saved = resume_payload(path)
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        set_rng_state(saved["rng"])
        history = list(saved["history"])
        start = int(saved["epoch"])
        base_lrs = _saved_base_lrs(saved, lr_schedule, lr_floor, base_lrs, path)
        if state is not None:
            state.clear()
            state.update(saved.get("state", {}))
        log.info("%s: resuming from checkpoint %s at epoch %d of %d", desc, path, start, epochs)
    takes_inputs = _accepts_inputs(loss_fn)
    end = epochs if stop_after is None else min(epochs, stop_after)
    total_steps = epochs * (steps_per_epoch or 0)
    step = sum(int(h.get("steps", 0)) for h in history)
    lr = base_lrs[0] if base_lrs else 0.0
    if path is not None and strategy() == "fsdp" and world_size() > 1:
        raise CompressionError(f"{desc}: training checkpoints are not written under strategy fsdp; use ddp")
    net = wrap_for_training(model, optimizer)  # DDP under torchrun (or a sharded copy: strategy fsdp)
    hooked = net if is_shard_copy(net) else model  # hooks get `model` itself, or the sharded copy
    for epoch in range(start, end):
        net.train()
        _set_epoch(batches, epoch)
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss x samples, correct, samples
        with _progress(f"{desc} {epoch + 1}/{epochs}", steps_per_epoch) as advance:
            n_steps = 0
            for x, y in batches:
                x, y = to_device(x, device), to_device(y, device)
                optimizer.zero_grad(set_to_none=True)
                if lr_schedule != "constant":
                    lr = _set_lr(optimizer, base_lrs, lr_factor(lr_schedule, step, total_steps, lr_floor))
                out = _logits(net(x))
                loss = loss_fn(out, y, x) if takes_inputs else loss_fn(out, y)
                if not torch.isfinite(loss):
                    raise CompressionError(
                        f"{desc}: the loss became {float(loss)} at epoch {epoch + 1}, step {step}; "
                        "lower the learning rate (lr) or clip the gradients"
                    )
                loss.backward()
                if grad_hook is not None:
                    grad_hook(hooked, epoch, step)
                optimizer.step()
                step += 1
                n_steps += 1
                if step_hook is not None:
                    step_hook(hooked, epoch, step)
                _add_sums(sums, out.detach(), y, loss.detach())
                advance()
        total, correct, count = mean_across_ranks(sums).tolist()  # every rank's samples (ratios only)
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "steps": n_steps,
            "loss": total / count if count else 0.0,
            "train_accuracy": 100.0 * correct / count if count else 0.0,
        }
        if lr_schedule != "constant":
            record["lr"] = lr
        if epoch_hook is not None:
            record.update(epoch_hook(hooked, epoch, step) or {})
        history.append(record)
        log.info("%s epoch %d/%d: %s", desc, epoch + 1, epochs, _fmt_record(record))
        _epoch_line(f"{desc} epoch {epoch + 1}/{epochs}: {_fmt_record(record)}")
        if path is not None:
            save_checkpoint(
                path,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch + 1,
                    "rng": rng_state(device),
                    "history": history,
                    "state": state if state is not None else {},
                    "lr_schedule": {"name": lr_schedule, "floor": lr_floor, "base_lrs": base_lrs},
                },
            )
    unshard_into(net, model, optimizer)  # strategy fsdp: the trained shards into `model` on every rank
    del net, hooked
    if world_size() > 1:  # DDP left each rank its own last buffers (BatchNorm statistics): take rank 0's
        broadcast_module_from_rank0(model)
    model.eval()
    return history


def _add_sums(sums: torch.Tensor, out: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> None:
    """Add one batch to (loss x samples, correct, samples) on the device, without a host copy."""
    n = len(y)
    sums[0] += loss.double() * n
    sums[2] += n
    if out.dim() == 2 and y.dim() == 1:
        sums[1] += (out.argmax(1) == y).sum()


def _saved_base_lrs(
    saved: dict[str, Any], schedule: str, floor: float, base_lrs: list[float], path: Path
) -> list[float]:
    """The base rates of the run a checkpoint belongs to; a different schedule is refused."""
    info = saved.get("lr_schedule", {"name": "constant", "floor": 0.0, "base_lrs": base_lrs})
    if info["name"] != schedule or float(info["floor"]) != floor:
        raise CompressionError(
            f"training checkpoint {path} was written with lr_schedule={info['name']!r}, "
            f"lr_floor={info['floor']}, this run asks for {schedule!r}, {floor}; "
            "use the same options or delete the checkpoint"
        )
    return [float(v) for v in info["base_lrs"]]


def _accepts_inputs(fn: Callable[..., Any]) -> bool:
    try:
        params = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
    except (TypeError, ValueError):
        return False
    return len(params) >= 3


def _len_or_none(batches: Iterable[Batch]) -> int | None:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None


def _fmt_record(record: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())


def _epoch_line(text: str) -> None:
    """One lasting line per epoch (loss, accuracy, sparsity ...) on a terminal's stderr, below the bar."""
    from rich.console import Console

    console = Console(stderr=True)
    if console.is_terminal and rank() == 0 and not log.isEnabledFor(logging.INFO):  # with -v: the log line
        console.print(f"  {text}", highlight=False)


class _progress:
    """A rich progress bar for one epoch on a terminal's stderr (nothing when stderr is not a terminal)."""

    def __init__(self, desc: str, total: int | None) -> None:
        self.desc, self.total = desc, total
        self.progress: Any = None

    def __enter__(self) -> Callable[[], None]:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            transient=True,
            console=console,
            disable=not console.is_terminal or rank() != 0,
        )
        self.progress.start()
        task = self.progress.add_task(self.desc, total=self.total)
        return lambda: self.progress.advance(task)

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


#: the progress bar other modules use (public name of :class:`_progress`)
progress = _progress


def working_copy(model: nn.Module) -> nn.Module:
    """A deep copy to train, so the caller's model is left untouched."""
    return copy.deepcopy(model)


def make_optimizer(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
    """SGD with momentum (the methods' default optimiser)."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def maybe_accuracy(model: nn.Module, batches: Iterable[Batch] | None) -> float | None:
    """Top-1 accuracy in percent on `batches` (None without batches)."""
    if batches is None:
        return None
    from slimship.data import evaluate_accuracy

    return float(evaluate_accuracy(model, batches))
