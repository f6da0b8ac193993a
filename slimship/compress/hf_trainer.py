"""transformers: a sparsifier that a ``transformers.Trainer`` drives, as one callback.

    from slimship.compress.hf_trainer import SparsifierTrainerCallback

    callback = SparsifierTrainerCallback("hesso", example_inputs, target=0.5)
    trainer = transformers.Trainer(model, args, train_dataset=data, callbacks=[callback])
    trainer.train()
    slimship.slim(model.eval(), example_inputs)

The contract is the Lightning callback's (``slimship.compress.lightning``): the sparsifier is built for the
Trainer's number of optimizer steps (``state.max_steps``) unless ``total_steps`` is given;
``after_backward`` runs in ``on_pre_optimizer_step`` (complete gradients: after accumulation, unscaling and
clipping), ``after_step`` in ``on_optimizer_step`` (once per optimizer step); its state goes into every
checkpoint folder the Trainer writes (``sparsifier.pt``, or ``sparsifier-rank{R}.pt`` when it holds
parameter chunks under FSDP) and a resumed ``train(resume_from_checkpoint=...)`` continues from it.

Under FSDP the sparsifier must exist before the Trainer shards the model: with ``total_steps`` given (or
``args.max_steps`` set) it is built when the Trainer is created, on the plain model, and follows the
shards; otherwise it is built when training starts and a model sharded by then is refused, saying so.

Import this module only where transformers is installed.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from slimship._util import atomic_write_bytes
from slimship.compress.sparsifier import Sparsifier, check_sparsifier_options, sparsifier
from slimship.errors import CompressionError

STATE_FILE = "sparsifier.pt"


class SparsifierTrainerCallback(TrainerCallback):
    """Drives sparsifier `name` (see ``slimship.compress.SPARSIFIERS``) from a transformers Trainer."""

    def __init__(
        self, name: str, example_inputs: Any, *, total_steps: int | None = None, **options: Any
    ) -> None:
        check_sparsifier_options(name, options)
        self.name, self.example_inputs = name, example_inputs
        self.total_steps, self.options = total_steps, options
        self.sparsifier: Sparsifier | None = None
        self._pending_step = False  # after_backward ran, its optimizer step not yet seen

    def _build(self, model: Any, steps: int) -> None:
        self.sparsifier = sparsifier(self.name, model, self.example_inputs, total_steps=steps, **self.options)

    def on_init_end(self, args, state, control, model=None, **kwargs: Any) -> None:
        steps = (
            self.total_steps
            if self.total_steps is not None
            else (args.max_steps if args.max_steps > 0 else None)
        )
        if self.sparsifier is None and steps is not None and model is not None:
            self._build(model, steps)  # before the Trainer wraps or shards the model

    def on_train_begin(self, args, state, control, model=None, **kwargs: Any) -> None:
        if self.sparsifier is None:
            steps = self.total_steps if self.total_steps is not None else state.max_steps
            if not isinstance(steps, int) or steps < 1:
                raise CompressionError(
                    f"SparsifierTrainerCallback: the Trainer's run has no positive number of optimizer steps "
                    f"({steps}); set max_steps or num_train_epochs, or pass total_steps=..."
                )
            self._build(model, steps)
        if state.global_step > 0:
            self.sparsifier.load_state_dict(self._saved_state(args, state.global_step))
        self._pending_step = False

    def on_pre_optimizer_step(self, args, state, control, **kwargs: Any) -> None:
        if self._pending_step:
            raise CompressionError(
                "SparsifierTrainerCallback: a second optimizer step without the first one's "
                "on_optimizer_step; a sparsifier follows one optimizer step at a time"
            )
        self._pending_step = True
        self._built().after_backward()

    def on_optimizer_step(self, args, state, control, **kwargs: Any) -> None:
        self._pending_step = False
        self._built().after_step()

    def on_save(self, args, state, control, **kwargs: Any) -> None:
        """Write the sparsifier's state into the checkpoint folder the Trainer has just written."""
        sp = self._built()
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        state_dict = sp.state_dict()
        if "shard" in state_dict:  # this rank's parameter chunks: every rank writes its own
            path = folder / f"sparsifier-rank{dist.get_rank()}.pt"
        elif state.is_world_process_zero:
            path = folder / STATE_FILE
        else:
            return
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        atomic_write_bytes(path, buffer.getvalue())

    def on_train_end(self, args, state, control, **kwargs: Any) -> None:
        """A run that ended before the schedule (max_steps cut, early stop) has not reached its targets."""
        sp = self.sparsifier
        if sp is not None and sp.step < sp.total_steps:
            removable = sp.summary()["removable"]  # on every rank (sums over FSDP shards)
            if state.is_world_process_zero:
                warnings.warn(
                    f"SparsifierTrainerCallback: training ended at optimizer step {sp.step} of the "
                    f"{sp.total_steps} the {self.name} schedule spans; its decisions are not finished "
                    f"(removable so far {removable:.3f} of target {sp.target}); resume from a checkpoint "
                    "or slim knowing the model is only partly sparsified",
                    RuntimeWarning,
                    stacklevel=2,
                )

    def _saved_state(self, args, step: int) -> dict[str, Any]:
        """The state saved with the checkpoint of `step` (this rank's own file first)."""
        roots = [Path(p) for p in (args.resume_from_checkpoint,) if isinstance(p, str | Path)]
        roots.append(Path(args.output_dir) / f"checkpoint-{step}")
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        for root in roots:
            for name in (f"sparsifier-rank{rank}.pt", STATE_FILE):
                if (root / name).is_file():
                    return _load(root / name)
        raise CompressionError(
            f"SparsifierTrainerCallback: the Trainer resumes at step {step} but no {STATE_FILE} is in "
            f"{', '.join(str(r) for r in roots)}; resume from a checkpoint written with this callback"
        )

    def _built(self) -> Sparsifier:
        if self.sparsifier is None:
            raise CompressionError("SparsifierTrainerCallback: a step hook ran before training started")
        return self.sparsifier


def _load(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncation, foreign content
        raise CompressionError(
            f"sparsifier state {path} could not be loaded with weights_only=True: {exc}"
        ) from exc
