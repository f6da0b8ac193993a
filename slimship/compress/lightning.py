"""Lightning: a sparsifier that a ``lightning.Trainer`` drives, as one callback.

    from slimship.compress.lightning import SparsifierCallback

    trainer = lightning.Trainer(callbacks=[SparsifierCallback("hesso", example_inputs, target=0.5)])
    trainer.fit(module, loader)
    slimship.slim(module.eval(), example_inputs)

The callback builds the sparsifier when fitting starts, on the LightningModule itself, for the
Trainer's number of optimizer steps (``trainer.estimated_stepping_batches``) unless ``total_steps`` is
given. Its hooks sit where Lightning has the complete gradients and the finished step:
``after_backward`` in ``on_before_optimizer_step`` (after gradient accumulation, after AMP unscaling),
``after_step`` in ``on_train_batch_end`` of the batches that stepped the optimizer. The sparsifier's
state is the callback's state, so Lightning checkpoints resume it. Under the Trainer's DDP strategy the
sparsifier averages its data-dependent scores across ranks as in any loop.

Import this module only where Lightning is installed (``pip install lightning``).
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl

from slimship.compress.sparsifier import Sparsifier, check_sparsifier_options, sparsifier
from slimship.errors import CompressionError


class SparsifierCallback(pl.Callback):
    """Drives sparsifier `name` (see ``slimship.compress.SPARSIFIERS``) from a Lightning Trainer."""

    def __init__(
        self, name: str, example_inputs: Any, *, total_steps: int | None = None, **options: Any
    ) -> None:
        check_sparsifier_options(name, options)
        self.name, self.example_inputs = name, example_inputs
        self.total_steps, self.options = total_steps, options
        self.sparsifier: Sparsifier | None = None
        self._pending: dict[str, Any] | None = None  # state restored before the sparsifier exists
        self._stepped_at = 0
        self._pending_step = False  # after_backward ran, its optimizer step not yet seen

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.sparsifier is None:
            steps = self.total_steps if self.total_steps is not None else self._saved_steps()
            steps = steps if steps is not None else _stepping_batches(trainer)
            self.sparsifier = sparsifier(
                self.name, pl_module, self.example_inputs, total_steps=steps, **self.options
            )
        if self._pending is not None:
            self.sparsifier.load_state_dict(self._pending)
            self._pending = None
        self._stepped_at = trainer.global_step
        self._pending_step = False

    def _saved_steps(self) -> int | None:
        """A resumed fit keeps the schedule it was saved with (a longer max_epochs only holds the result)."""
        saved = (self._pending or {}).get("config", {})
        return int(saved["total_steps"]) if "total_steps" in saved else None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if self._pending_step:
            raise CompressionError(
                "SparsifierCallback: a second optimizer step in one batch (several optimizers, or manual "
                "optimization stepping twice); a sparsifier follows one optimizer step per batch: call "
                "sp.after_backward() / sp.after_step() yourself around the step it should follow"
            )
        self._pending_step = True
        self._built().after_backward()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step != self._stepped_at:  # this batch ended with an optimizer step
            self._stepped_at = trainer.global_step
            self._pending_step = False
            self._built().after_step()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A fit that ended before the schedule (early stopping, max_time, an interrupt) has not reached its
        targets: say so, with how far it got (a checkpoint resumes it)."""
        sp = self.sparsifier
        if sp is None or sp.step >= sp.total_steps:
            return
        removable = sp.summary()["removable"]  # on every rank: a collective when the model is sharded
        if trainer.is_global_zero:
            warnings.warn(
                f"SparsifierCallback: fitting ended at optimizer step {sp.step} of the {sp.total_steps} the "
                f"{self.name} schedule spans; its decisions are not finished (removable so far "
                f"{removable:.3f} of target {sp.target}); resume from a checkpoint or "
                "slim knowing the model is only partly sparsified",
                RuntimeWarning,
                stacklevel=2,
            )

    def state_dict(self) -> dict[str, Any]:
        return self.sparsifier.state_dict() if self.sparsifier is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.sparsifier is None:
            self._pending = state_dict
        else:
            self.sparsifier.load_state_dict(state_dict)

    def _built(self) -> Sparsifier:
        if self.sparsifier is None:
            raise CompressionError("SparsifierCallback: a step hook ran before fitting started")
        return self.sparsifier


def _stepping_batches(trainer: pl.Trainer) -> int:
    steps = trainer.estimated_stepping_batches
    if not isinstance(steps, int | float) or steps == float("inf") or steps < 1:
        raise CompressionError(
            f"SparsifierCallback: the Trainer's run has no finite number of optimizer steps ({steps}); "
            "set max_epochs or max_steps, or pass total_steps=..."
        )
    return int(steps)
