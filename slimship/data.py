"""scikit-learn's bundled digits (8x8 images, 10 classes) as deterministic splits and torch batches.

Nothing is downloaded: ``sklearn.datasets.load_digits`` ships with scikit-learn.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

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

    With ``world > 1`` this is rank ``rank``'s shard: every rank draws the same epoch order, pads it by
    wrapping around to a multiple of ``world`` and takes every ``world``-th sample from position ``rank``,
    so all ranks get as many batches of ``batch_size`` and together see the epoch once (as
    ``DistributedSampler`` does). ``shard(rank, world)`` gives a rank's shard of unsharded batches.
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        batch_size: int = 64,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seed = _check_int("seed", seed, 0)
        self.world = _check_int("world", world, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.world:
            raise SlimshipError(f"Batches: rank {rank} is not below world {world}; ranks count from 0")
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
        """Samples per epoch on this rank (all of them without sharding)."""
        return -(-len(self.x) // self.world)

    def shard(self, rank: int, world: int) -> Batches:
        """The same batches as rank `rank` of `world` sees them (see the class docstring)."""
        if self.world != 1:
            raise SlimshipError(f"Batches: already rank {self.rank} of {self.world}; shard unsharded batches")
        return Batches(self.x, self.y, self.batch_size, self.shuffle, self.seed, self.drop_last, rank, world)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = _check_int("epoch", epoch, 0)

    def order(self, epoch: int) -> np.ndarray:
        """Sample order of a given epoch (this rank's share of it when sharded)."""
        n = len(self.x)
        full = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        if self.world == 1:
            return full
        padded = np.resize(full, self.num_samples * self.world)  # wraps around, like DistributedSampler
        return padded[self.rank :: self.world]

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


OutputChoice = int | str | None  # the `data.output` option: a leaf index, a dict key, or None


def output_leaves(output: object) -> list[tuple[str, Any]]:
    """A model's output flattened the way the exported files order it (tensor, tuple, dict ...), each leaf
    with its name: the keys on its path joined by '.' (`cls`, `heads.box`), or its index for a tuple."""
    from torch.utils import _pytree as pytree

    leaves, _ = pytree.tree_flatten_with_path(output)
    named = []
    for i, (path, leaf) in enumerate(leaves):
        keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        named.append((".".join(keys) or str(i), leaf))
    return named


def _is_named(output: object) -> bool:
    from torch.utils import _pytree as pytree

    leaves, _ = pytree.tree_flatten_with_path(output)
    return any(isinstance(k, pytree.MappingKey | pytree.GetAttrKey) for path, _ in leaves for k in path)


def describe_outputs(output: object) -> str:
    """`0 'cls' [1, 7], 1 'box' [1, 4]`: the leaves a `data.output` can select."""
    return ", ".join(
        f"{i} {name!r} {list(getattr(leaf, 'shape', []))}"
        for i, (name, leaf) in enumerate(output_leaves(output))
    )


def output_index(output: object, choice: OutputChoice) -> int:
    """The index of the leaf `choice` selects (see `select_logits`); ConfigError naming the outputs and the
    `data.output` option when it selects none or the choice is ambiguous."""
    leaves = output_leaves(output)
    names = [name for name, _ in leaves]
    how = "set data.output to one of their indices or keys"
    if choice is None:
        if len(leaves) > 1 and _is_named(output):
            raise ConfigError(
                f"the model returns {len(leaves)} named outputs ({describe_outputs(output)}); which one "
                f"holds the class logits accuracy is measured on is ambiguous: {how}"
            )
        return 0  # one output, or a tuple: its first (the convention of (logits, ...) models)
    if isinstance(choice, int) and not isinstance(choice, bool):
        if 0 <= choice < len(leaves):
            return choice
    elif choice in names:
        return names.index(choice)
    raise ConfigError(
        f"'data.output' is {choice!r}, but the model's outputs are {describe_outputs(output)}; {how}"
    )


def select_logits(output: object, choice: OutputChoice = None) -> torch.Tensor:
    """The (batch, classes) logits among a model's outputs: the leaf `choice` selects (index or dict key;
    None: the only one, or the first of a tuple). SlimshipError naming the outputs otherwise."""
    if isinstance(output, np.ndarray):
        output = torch.from_numpy(output)
    leaves = output_leaves(output)
    logits = leaves[output_index(output, choice)][1] if leaves else None
    if isinstance(logits, np.ndarray):
        logits = torch.from_numpy(logits)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        chosen = "" if choice is None else f" selected by data.output={choice!r}"
        raise SlimshipError(
            f"accuracy: the model output{chosen} must be (batch, classes) logits, got "
            f"{type(logits).__name__} with shape {list(getattr(logits, 'shape', []))} (outputs: "
            f"{describe_outputs(output) or type(output).__name__}); name the logits with data.output"
        )
    return logits


def evaluate_accuracy(
    model_or_fn: nn.Module | Callable[[torch.Tensor], object],
    batches: Iterable[Batch],
    output: OutputChoice = None,
) -> float:
    """Top-1 accuracy in percent of the logits `output` selects (see `select_logits`). A module runs in eval
    mode (its mode is restored after) without grad."""
    from slimship.compress.device import device_of, to_device

    was_training = isinstance(model_or_fn, nn.Module) and model_or_fn.training
    device = device_of(model_or_fn) if isinstance(model_or_fn, nn.Module) else None
    if isinstance(model_or_fn, nn.Module):
        model_or_fn.eval()
    correct = total = 0
    try:
        with torch.no_grad():
            for x, y in batches:
                x = x if device is None else to_device(x, device)  # a module: its inputs go where it is
                pred = select_logits(model_or_fn(x), output).argmax(dim=1)
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


# ---- torchrun: each rank's share of the train data ---------------------------------------------------
class ShardedLoader:
    """A DataLoader over a map-style dataset rebuilt with a ``DistributedSampler``; ``set_epoch`` reshuffles
    (train_loop calls it every epoch)."""

    def __init__(self, loader: torch.utils.data.DataLoader, sampler: torch.utils.data.DistributedSampler):
        self.loader, self.sampler = loader, sampler

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


def _sampler(dataset: Any, rank: int, world: int, shuffle: bool, seed: int, drop_last: bool):
    from torch.utils.data import DistributedSampler

    return DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
    )


def _shard_loader(loader: torch.utils.data.DataLoader, rank: int, world: int, seed: int) -> ShardedLoader:
    """The loader's dataset, batch size, collate and workers, with a DistributedSampler (shuffled when the
    loader shuffled)."""
    from torch.utils.data import DataLoader, RandomSampler

    shuffle = isinstance(loader.sampler, RandomSampler)
    sampler = _sampler(loader.dataset, rank, world, shuffle, seed, loader.drop_last)
    rebuilt = DataLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
        collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
        worker_init_fn=loader.worker_init_fn, persistent_workers=loader.persistent_workers,
    )  # fmt: skip
    return ShardedLoader(rebuilt, sampler)


def _shard_dataset(dataset: Any, rank: int, world: int, seed: int) -> ShardedLoader:
    """A map-style dataset's items are the batches (as without torchrun): each rank takes every world-th."""
    from torch.utils.data import DataLoader

    sampler = _sampler(dataset, rank, world, False, seed, False)
    return ShardedLoader(DataLoader(dataset, batch_size=None, sampler=sampler), sampler)


def _shard_sequence(batches: Any, rank: int, world: int, seed: int) -> list[Any]:
    """A list or tuple of batches: every world-th from `rank`, wrapped around to equal counts."""
    index = np.resize(np.arange(len(batches)), -(-len(batches) // world) * world)
    return [batches[i] for i in index[rank::world]]


def _loader_over(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, torch.utils.data.DataLoader) and test(v.dataset)


def _iterable_style(value: Any) -> bool:
    return isinstance(value, torch.utils.data.IterableDataset)


def _map_style(value: Any) -> bool:
    dataset = isinstance(value, torch.utils.data.Dataset)
    return dataset and hasattr(value, "__len__") and not _iterable_style(value)


def _indexable(value: Any) -> bool:
    """What a DataLoader can sample by index: a map-style Dataset, or any sequence (a list of samples)."""
    sized = hasattr(value, "__len__") and hasattr(value, "__getitem__")
    return _map_style(value) or (sized and not _iterable_style(value))


def _own_batch_sampler(value: Any) -> bool:
    loader = isinstance(value, torch.utils.data.DataLoader)
    return loader and value.batch_size is None and value.batch_sampler is not None


def _own_sampler(value: Any) -> bool:
    """A DataLoader whose sampler is not torch's plain in-order or shuffled one (a subset, weights, ...)."""
    from torch.utils.data import RandomSampler, SequentialSampler

    if not isinstance(value, torch.utils.data.DataLoader) or _iterable_style(value.dataset):
        return False
    plain = type(value.sampler) in (SequentialSampler, RandomSampler)
    if isinstance(value.sampler, RandomSampler):  # replacement or num_samples pick another epoch
        plain = plain and not value.sampler.replacement and value.sampler.num_samples == len(value.dataset)
    return not plain


def _distributed_sampler(value: Any) -> bool:
    loader = isinstance(value, torch.utils.data.DataLoader)
    return loader and isinstance(value.sampler, torch.utils.data.DistributedSampler)


def _keep_distributed(loader: torch.utils.data.DataLoader, rank: int, world: int, seed: int) -> ShardedLoader:
    """A DataLoader the user sharded with a DistributedSampler: kept as it is when it is set for this job."""
    sampler = loader.sampler
    if (sampler.num_replicas, sampler.rank) != (world, rank):
        raise ConfigError(
            f"'data.factory' returned a DataLoader whose DistributedSampler is set for rank {sampler.rank} "
            f"of {sampler.num_replicas}, but this is rank {rank} of {world}; build it with the process "
            "group's rank and world size, or return the DataLoader without a sampler and slimship shards it"
        )
    return ShardedLoader(loader, sampler)


def _single_pass(value: Any) -> bool:
    """A generator or iterator: iterating it again gives nothing."""
    return isinstance(value, Iterator)


RETURN_INSTEAD = (
    "return slimship.data.Batches, a torch DataLoader over a map-style Dataset (with __len__ and "
    "__getitem__), a map-style Dataset of batches, or a list of batches"
)
OWN_SAMPLER = (
    "cannot be split across {world} torchrun processes: its sampler decides which samples an epoch holds, "
    "and a DistributedSampler would replace it (leaking the samples it leaves out); "
    "for a subset return DataLoader(torch.utils.data.Subset(dataset, indices), shuffle=True), for weights "
    "resample the dataset itself"
)

Sharder = Callable[[Any, int, int, int], Any]


@dataclass(frozen=True)
class DataRule:
    """How one kind of train data is split across torchrun ranks (`shard` None: refused there, for `why`)
    and whether one process can train on it for several epochs (`reusable`; None: when it has a len())."""

    kind: str
    matches: Callable[[Any], bool]
    shard: Sharder | None
    reusable: bool | None = True
    why: str = "cannot be split across {world} torchrun processes with equal batch counts"


#: train data rules, first match wins
DATA_RULES: tuple[DataRule, ...] = (
    DataRule("slimship.data.Batches", lambda v: isinstance(v, Batches), lambda v, r, w, seed: v.shard(r, w)),
    DataRule("a generator or iterator", _single_pass, None, False),
    DataRule("a DataLoader over an IterableDataset", _loader_over(_iterable_style), None, None),
    DataRule("a DataLoader with its own batch_sampler", _own_batch_sampler, None),
    DataRule("a DataLoader with a DistributedSampler", _distributed_sampler, _keep_distributed),
    DataRule("a DataLoader with its own sampler", _own_sampler, None, why=OWN_SAMPLER),
    DataRule("a DataLoader over a map-style dataset or a list", _loader_over(_indexable), _shard_loader),
    DataRule("an IterableDataset", _iterable_style, None, None),
    DataRule("a map-style Dataset", _map_style, _shard_dataset),
    DataRule("a list or tuple of batches", lambda v: isinstance(v, list | tuple), _shard_sequence),
)
UNKNOWN = DataRule("an iterable without a length or indexing", lambda v: True, None, None)


def data_rule(train: Any) -> DataRule:
    """The first of :data:`DATA_RULES` that `train` matches."""
    return next((rule for rule in DATA_RULES if rule.matches(train)), UNKNOWN)


def _described(train: Any) -> str:
    sampler = f" with a {type(train.sampler).__name__}" if _own_sampler(train) else ""
    return type(train).__name__ + sampler


def check_train(train: Any, source: str = "data.factory") -> Any:
    """`train` when one process can train on it for several epochs: re-iterable, with a len(). A generator
    or iterator (read once) or unsized data raises a ConfigError naming `source` and what to return."""
    if train is None:
        return train
    rule = data_rule(train)
    reusable = rule.reusable if rule.reusable is not None else _has_len(train)
    if not reusable:
        what = "can be read only once" if rule.reusable is False else "has no len()"
        raise ConfigError(  # printed by every rank that has it: a factory may return other data per rank
            f"'{source}' returned train data of type {_described(train)} ({rule.kind}), which {what}; "
            f"training makes several passes and needs the number of batches per epoch; {RETURN_INSTEAD}"
        )
    if reusable and _has_len(train) and len(train) == 0:
        raise ConfigError(
            f"'{source}' returned empty train data ({rule.kind} of 0 batches); training needs batches"
        )
    return train


def _has_len(value: Any) -> bool:
    try:
        len(value)
    except TypeError:
        return False
    return True


def shard_train(train: Any, rank: int, world: int, source: str = "data.factory", seed: int = 0) -> Any:
    """This rank's share of `train` with the same number of batches on every rank (`train` itself when
    `world` is 1). Data that cannot be split so (a generator, an iterator, an IterableDataset) raises a
    ConfigError naming `source`, the type found and what to return instead."""
    if world <= 1 or train is None:
        return train
    rule = data_rule(train)
    if rule.shard is None:
        raise ConfigError(  # printed by every rank that has it: a factory may return other data per rank
            f"'{source}' returned train data of type {_described(train)} ({rule.kind}), which "
            f"{rule.why.format(world=world)}; {RETURN_INSTEAD}"
        )
    return rule.shard(train, rank, world, seed)
