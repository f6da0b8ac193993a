"""SparsifierTrainerCallback: a sparsifier driven by a real transformers.Trainer (CPU, one process, data
generated here: nothing is downloaded)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainingArguments

from slimship.compress import sparsifier
from slimship.compress.hf_trainer import SparsifierTrainerCallback
from slimship.errors import CompressionError
from slimship.slimming import slim
from tests.compress.test_lightning import BATCH, BATCHES, example
from tests.compress.test_sparsifier import OPTIONS

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (a dev dependency)")

EPOCHS = 3  # 8 batches per epoch: 24 optimizer steps, the steps OPTIONS are written for


class Net(nn.Module):
    """The Lightning test's CNN, with the Trainer's calling convention (keyword inputs, loss first)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 12, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(12, 4),
        )

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        logits = self.body(x)
        return logits if labels is None else (F.cross_entropy(logits, labels), logits)


def samples() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (BATCHES * BATCH,), generator=g)
    x = torch.randn(BATCHES * BATCH, 1, 8, 8, generator=g) * 0.5 + (y.float() - 1.5)[:, None, None, None]
    return [{"x": x[i], "labels": y[i]} for i in range(len(y))]


class InOrder(Trainer):
    """The samples in their order (the plain loop's batches), not shuffled."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def trainer(tmp_path: Path, model: nn.Module, callback, **kwargs) -> Trainer:
    options = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=BATCH, num_train_epochs=EPOCHS,
        learning_rate=0.05, lr_scheduler_type="constant", max_grad_norm=0.0, use_cpu=True, report_to=[],
        save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    options.update(kwargs)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return InOrder(
        model=model,
        args=TrainingArguments(**options),
        train_dataset=samples(),
        callbacks=[callback],
        optimizers=(optimizer, None),
    )


def plain_loop(name: str) -> tuple[nn.Module, list]:
    """The user's loop over the same batches with the same optimizer."""
    model, data = Net(), samples()
    sp = sparsifier(name, model, example(), total_steps=EPOCHS * BATCHES, **OPTIONS[name])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    decisions = []
    model.train()
    for _ in range(EPOCHS):
        for b in range(BATCHES):
            rows = data[b * BATCH : (b + 1) * BATCH]
            x, y = torch.stack([r["x"] for r in rows]), torch.stack([r["labels"] for r in rows])
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            sp.after_backward()
            optimizer.step()
            sp.after_step()
            decisions.append(sp.decisions())
    return model, decisions


class Recorder(SparsifierTrainerCallback):
    def on_optimizer_step(self, args, state, control, **kwargs) -> None:
        super().on_optimizer_step(args, state, control, **kwargs)
        self.record.append(self.sparsifier.decisions())


@pytest.mark.parametrize("name", ["hesso", "csgd"])
def test_trainer_is_bit_identical_to_the_plain_loop(tmp_path: Path, name: str) -> None:
    """Built for the Trainer's max_steps, hooks around each optimizer step: the same decisions at every step
    and the same weights to the bit as the user's loop; the result slims (smaller, outputs equal)."""
    model = Net()
    callback = Recorder(name, example(), **OPTIONS[name])
    callback.record = []
    trainer(tmp_path, model, callback).train()
    sp = callback.sparsifier
    assert sp.total_steps == sp.step == EPOCHS * BATCHES
    reference, decisions = plain_loop(name)
    assert callback.record == decisions
    ours, theirs = model.state_dict(), reference.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert sp.summary()["removable"] == 0.5
    result = slim(model.eval(), example())
    assert result.params_after < result.params_before
    x = example()[0]
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-5, atol=1e-6)


def test_trainer_checkpoint_resumes_the_sparsifier(tmp_path: Path) -> None:
    """The state rides in each checkpoint folder; a new Trainer resumed from the step-8 checkpoint ends with
    the uninterrupted run's decisions and weights. A checkpoint without it is refused, naming the folder."""
    whole = Net()
    callback = SparsifierTrainerCallback("drop", example(), **OPTIONS["drop"])
    trainer(tmp_path / "whole", whole, callback).train()

    first = Net()
    cut = SparsifierTrainerCallback("drop", example(), total_steps=EPOCHS * BATCHES, **OPTIONS["drop"])
    trainer(tmp_path / "cut", first, cut, save_strategy="steps", save_steps=8, max_steps=8).train()
    folder = tmp_path / "cut" / "out" / "checkpoint-8"
    assert (folder / "sparsifier.pt").is_file()
    again = Net()
    resumed = SparsifierTrainerCallback("drop", example(), **OPTIONS["drop"])
    kwargs = {"output_dir": str(tmp_path / "cut" / "out")}
    trainer(tmp_path / "cut", again, resumed, **kwargs).train(resume_from_checkpoint=str(folder))
    assert resumed.sparsifier.decisions() == callback.sparsifier.decisions()
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), whole.state_dict().values()))

    (folder / "sparsifier.pt").unlink()
    lost = SparsifierTrainerCallback("drop", example(), **OPTIONS["drop"])
    with pytest.raises(CompressionError, match=r"no sparsifier\.pt is in"):
        trainer(tmp_path / "cut", Net(), lost, **kwargs).train(resume_from_checkpoint=str(folder))


def test_trainer_misuse_is_named(tmp_path: Path) -> None:
    """An unknown option is refused when the callback is made; a run cut short by max_steps warns."""
    with pytest.raises(CompressionError, match="has no option 'periodz'"):
        SparsifierTrainerCallback("hesso", example(), periodz=3)
    callback = SparsifierTrainerCallback("hesso", example(), total_steps=EPOCHS * BATCHES, **OPTIONS["hesso"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, Net(), callback, max_steps=5).train()
    assert any("ended at optimizer step 5 of the 24" in str(w.message) for w in caught)
