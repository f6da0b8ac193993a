"""SparsifierCallback: a sparsifier driven by a real lightning.Trainer (CPU, one process)."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimship.compress import sparsifier
from slimship.compress.lightning import SparsifierCallback
from slimship.errors import CompressionError
from slimship.slimming import slim

BATCHES, BATCH = 8, 16


class Net(pl.LightningModule):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (BATCHES * BATCH,), generator=g)
    x = torch.randn(BATCHES * BATCH, 1, 8, 8, generator=g) * 0.5 + (y.float() - 1.5)[:, None, None, None]
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)


def example() -> tuple[torch.Tensor]:
    return (torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)),)


def trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    options |= dict(default_root_dir=tmp_path, enable_checkpointing=False)
    return pl.Trainer(**(options | kwargs))


def fit(tmp_path: Path, callback: SparsifierCallback, **kwargs) -> Net:
    net = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and logging
        trainer(tmp_path, callbacks=[callback], **kwargs).fit(net, loader())
    return net


OPTIONS = {"target": 0.5, "warmup_steps": 4, "pruning_steps": 8, "periods": 2}


def test_trainer_drives_the_sparsifier_like_a_plain_loop(tmp_path: Path) -> None:
    """The callback gives the same decisions and bit-identical weights as the plain loop it stands for,
    and the model then slims with equal outputs."""
    callback = SparsifierCallback("hesso", example(), **OPTIONS)
    net = fit(tmp_path, callback, max_epochs=2)
    sp = callback.sparsifier
    assert sp is not None and sp.total_steps == 2 * BATCHES and sp.step == 2 * BATCHES
    assert sp.summary()["group_sparsity"] == pytest.approx(0.5, abs=0.1)

    plain = Net()  # the same run written by hand
    ref = sparsifier("hesso", plain, example(), total_steps=2 * BATCHES, **OPTIONS)
    optimizer = plain.configure_optimizers()
    for _ in range(2):
        for x, y in loader():
            optimizer.zero_grad()
            F.cross_entropy(plain(x), y).backward()
            ref.after_backward()
            optimizer.step()
            ref.after_step()
    assert sp.decisions() == ref.decisions()
    for (name, a), b in zip(net.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    result = slim(net.eval(), example())
    assert result.params_after < result.params_before
    assert torch.allclose(result.model(*example()), net(*example()), atol=1e-5)


def test_accumulated_batches_step_the_sparsifier_once_per_optimizer_step(tmp_path: Path) -> None:
    callback = SparsifierCallback("hesso", example(), **(OPTIONS | {"warmup_steps": 2, "pruning_steps": 4}))
    fit(tmp_path, callback, max_epochs=2, accumulate_grad_batches=2)
    assert callback.sparsifier is not None
    assert callback.sparsifier.total_steps == BATCHES  # 2 epochs x 8 batches / 2
    assert callback.sparsifier.step == BATCHES


def test_lightning_checkpoint_resumes_the_sparsifier(tmp_path: Path) -> None:
    """Stop after one epoch with a Lightning checkpoint, resume in a new Trainer: same weights as one run."""
    whole = fit(tmp_path / "whole", SparsifierCallback("hesso", example(), **OPTIONS), max_epochs=2)

    first = SparsifierCallback("hesso", example(), total_steps=2 * BATCHES, **OPTIONS)
    net = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = trainer(tmp_path / "part", max_epochs=1, callbacks=[first])
        t.fit(net, loader())
        t.save_checkpoint(tmp_path / "epoch1.ckpt")
    second = SparsifierCallback("hesso", example(), **OPTIONS)
    resumed = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t2 = trainer(tmp_path / "part", max_epochs=2, callbacks=[second])
        t2.fit(resumed, loader(), ckpt_path=tmp_path / "epoch1.ckpt")
    assert second.sparsifier is not None and second.sparsifier.step == 2 * BATCHES
    for (name, a), b in zip(resumed.state_dict().items(), whole.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_unknown_option_is_named_at_construction() -> None:
    with pytest.raises(CompressionError, match="no option 'targett'"):
        SparsifierCallback("hesso", example(), targett=0.5)


def test_endless_run_needs_total_steps(tmp_path: Path) -> None:
    callback = SparsifierCallback("hesso", example(), target=0.5)
    with pytest.raises(CompressionError, match="total_steps"):
        fit(tmp_path, callback, max_epochs=-1, max_steps=-1)


def test_a_fit_that_ends_early_says_the_schedule_is_unfinished(tmp_path: Path) -> None:
    """max_steps below the epochs' steps (like early stopping) ends the fit early: one RuntimeWarning."""
    callback = SparsifierCallback("hesso", example(), total_steps=2 * BATCHES, **OPTIONS)
    net = Net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, callbacks=[callback], max_epochs=2, max_steps=5).fit(net, loader())
    ours = [w for w in caught if "SparsifierCallback" in str(w.message)]
    assert len(ours) == 1 and "optimizer step 5 of the 16" in str(ours[0].message)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        whole = SparsifierCallback("hesso", example(), **OPTIONS)
        trainer(tmp_path, callbacks=[whole], max_epochs=2).fit(Net(), loader())
    assert whole.sparsifier is not None and whole.sparsifier.step == 2 * BATCHES
    assert not [w for w in caught if "SparsifierCallback" in str(w.message)]


def test_a_longer_resumed_fit_keeps_the_saved_schedule(tmp_path: Path) -> None:
    """Resuming with a larger max_epochs continues the checkpoint's schedule (the extra steps hold its
    zeros) instead of refusing the saved state for a different total_steps."""
    options = OPTIONS | {"warmup_steps": 2, "pruning_steps": 4}
    first = SparsifierCallback("hesso", example(), **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = trainer(tmp_path, max_epochs=1, callbacks=[first])
        t.fit(Net(), loader())
        t.save_checkpoint(tmp_path / "one.ckpt")
    second = SparsifierCallback("hesso", example(), **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        longer = trainer(tmp_path, max_epochs=2, callbacks=[second])
        longer.fit(Net(), loader(), ckpt_path=tmp_path / "one.ckpt")
    assert second.sparsifier is not None and second.sparsifier.total_steps == BATCHES
    assert second.sparsifier.step == 2 * BATCHES
    assert second.sparsifier.decisions() == first.sparsifier.decisions()  # nothing new decided past the end
    assert [w for w in caught if "total_steps" in str(w.message)]  # the steps past the end are said once


class TwoOptimizers(Net):
    """Manual optimization stepping two optimizers per batch (a sparsifier follows one step per batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        first, second = self.optimizers()
        for optimizer in (first, second):
            optimizer.zero_grad()
            self.manual_backward(F.cross_entropy(self(x), y))
            optimizer.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.parameters(), lr=0.01), torch.optim.SGD(self.parameters(), lr=0.01)]


def test_two_optimizer_steps_in_one_batch_are_named(tmp_path: Path) -> None:
    callback = SparsifierCallback("hesso", example(), total_steps=2 * BATCHES, **OPTIONS)
    with warnings.catch_warnings(), pytest.raises(CompressionError, match="a second optimizer step in one"):
        warnings.simplefilter("ignore")
        trainer(tmp_path, callbacks=[callback], max_epochs=1).fit(TwoOptimizers(), loader())
