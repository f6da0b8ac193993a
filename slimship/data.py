"""scikit-learn's bundled digits (8x8 images, 10 classes) as deterministic splits and torch batches.

Nothing is downloaded: ``sklearn.datasets.load_digits`` ships with scikit-learn.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from slimship.errors import ConfigError, SlimshipError

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class DigitsSplit:
    """Stratified digits split. Images are (N, 1, 8, 8) float32, labels int64.

    Pixels are scaled to [0, 1], then standardised with the scalar mean/std of the training images.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    mean: float
    std: float


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ConfigError(f"data argument '{name}' must be an int >= {minimum}, got {value!r}")
    return int(value)


def digits_arrays(seed: int = 0, test_fraction: float = 0.25) -> DigitsSplit:
    """Load digits and split them (stratified by label) with ``seed``; same seed, same arrays."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    seed = _check_int("seed", seed, 0)
    if not isinstance(test_fraction, float | int) or not 0.0 < float(test_fraction) < 1.0:
        raise ConfigError(
            f"data argument 'test_fraction' must be a number strictly between 0 and 1, got {test_fraction!r}"
        )
    digits = load_digits()
    images = (digits.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=float(test_fraction), random_state=seed, stratify=labels
    )
    mean = float(x_train.mean())
    std = float(x_train.std())

    def norm(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray((x - mean) / std, dtype=np.float32)

    return DigitsSplit(norm(x_train), y_train, norm(x_test), y_test, mean, std)


class Batches:
    """A re-iterable of ``(x, y)`` torch batches over numpy arrays.

    With ``shuffle=True`` each pass uses the permutation drawn from ``(seed, epoch)``; the epoch counter
    starts at 0 and advances after every full or partial pass, so a rerun of the same loop gives the same
    batches. ``set_epoch`` rewinds or moves it.
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        batch_size: int = 64,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seed = _check_int("seed", seed, 0)
        if len(x) != len(y):
            raise SlimshipError(
                f"Batches: x has {len(x)} samples but y has {len(y)}; pass arrays of equal length"
            )
        if len(x) == 0:
            raise SlimshipError("Batches: the arrays are empty; pass at least one sample")
        self.x = np.asarray(x)
        self.y = np.asarray(y)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.epoch = 0

    @property
    def num_samples(self) -> int:
        return len(self.x)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = _check_int("epoch", epoch, 0)

    def order(self, epoch: int) -> np.ndarray:
        """Sample order of a given epoch."""
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def __iter__(self) -> Iterator[Batch]:
        index = self.order(self.epoch)
        self.epoch += 1
        for batch in range(len(self)):
            take = index[batch * self.batch_size : (batch + 1) * self.batch_size]
            yield torch.from_numpy(self.x[take]), torch.from_numpy(self.y[take])


def digits_loaders(batch_size: int = 64, seed: int = 0) -> tuple[Batches, Batches]:
    """(train batches shuffled per epoch, test batches in order) over ``digits_arrays(seed)``."""
    split = digits_arrays(seed)
    train = Batches(split.x_train, split.y_train, batch_size, shuffle=True, seed=seed)
    test = Batches(split.x_test, split.y_test, batch_size, shuffle=False, seed=seed)
    return train, test


def _logits(output: object) -> torch.Tensor:
    if isinstance(output, tuple | list):
        output = output[0]
    if isinstance(output, np.ndarray):
        output = torch.from_numpy(output)
    if not isinstance(output, torch.Tensor) or output.ndim != 2:
        raise SlimshipError(
            f"evaluate_accuracy: the model must return (batch, classes) logits, got {type(output).__name__}"
            f" with shape {getattr(output, 'shape', None)}"
        )
    return output


def evaluate_accuracy(
    model_or_fn: nn.Module | Callable[[torch.Tensor], object], batches: Iterable[Batch]
) -> float:
    """Top-1 accuracy in percent. A module runs in eval mode (its mode is restored after) without grad."""
    was_training = isinstance(model_or_fn, nn.Module) and model_or_fn.training
    if isinstance(model_or_fn, nn.Module):
        model_or_fn.eval()
    correct = total = 0
    try:
        with torch.no_grad():
            for x, y in batches:
                pred = _logits(model_or_fn(x)).argmax(dim=1)
                correct += int((pred.cpu() == torch.as_tensor(y)).sum())
                total += len(y)
    finally:
        if was_training:
            model_or_fn.train()
    if total == 0:
        raise SlimshipError("evaluate_accuracy: the batches yielded no samples")
    return 100.0 * correct / total


def calibration_batches(batches: Iterable[Batch], n: int) -> list[tuple[torch.Tensor, ...]]:
    """The inputs ``(x,)`` of the first ``n`` batches of one pass (fewer if the pass is shorter)."""
    n = _check_int("n", n, 1)
    out: list[tuple[torch.Tensor, ...]] = []
    for x, _ in batches:
        out.append((x,))
        if len(out) == n:
            break
    if not out:
        raise SlimshipError("calibration_batches: the batches yielded nothing; pass a non-empty loader")
    if len(out) < n:
        log.warning("calibration_batches: asked for %d batches, the loader has only %d", n, len(out))
    return out
