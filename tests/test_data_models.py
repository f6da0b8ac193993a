"""slimship.data (digits split, batches, accuracy) and slimship.models (demo model factories)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import RandomSampler, SubsetRandomSampler, WeightedRandomSampler

from slimship.data import (
    Batches,
    DigitsSplit,
    calibration_batches,
    check_train,
    digits_arrays,
    digits_loaders,
    evaluate_accuracy,
    shard_train,
)
from slimship.errors import ConfigError, SlimshipError
from slimship.models import MODEL_FACTORIES, digits_cnn


@pytest.fixture(scope="module")
def split() -> DigitsSplit:
    return digits_arrays(seed=0)


def test_split_shapes_dtypes_and_standardisation(split: DigitsSplit) -> None:
    assert split.x_train.shape[1:] == (1, 8, 8) and split.x_test.shape[1:] == (1, 8, 8)
    assert split.x_train.dtype == np.float32 and split.x_test.dtype == np.float32
    assert split.y_train.dtype == np.int64 and split.y_test.dtype == np.int64
    assert len(split.x_train) + len(split.x_test) == 1797
    assert len(split.x_test) == pytest.approx(0.25 * 1797, abs=1)
    assert abs(float(split.x_train.mean())) < 1e-4
    assert float(split.x_train.std()) == pytest.approx(1.0, abs=1e-4)
    # Undoing the standardisation gives pixels in [0, 1].
    raw = split.x_test * split.std + split.mean
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5


def test_split_is_deterministic_and_seed_dependent(split: DigitsSplit) -> None:
    again = digits_arrays(seed=0)
    assert np.array_equal(split.x_train, again.x_train) and np.array_equal(split.y_test, again.y_test)
    other = digits_arrays(seed=1)
    assert not np.array_equal(split.y_train, other.y_train)


def test_split_is_stratified(split: DigitsSplit) -> None:
    train = np.bincount(split.y_train, minlength=10) / len(split.y_train)
    test = np.bincount(split.y_test, minlength=10) / len(split.y_test)
    assert np.abs(train - test).max() < 0.01


def test_split_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="test_fraction"):
        digits_arrays(test_fraction=1.5)
    with pytest.raises(ConfigError, match="seed"):
        digits_arrays(seed=-1)


def test_batches_reiterate_and_shuffle_per_epoch() -> None:
    x = np.arange(10, dtype=np.float32).reshape(10, 1)
    y = np.arange(10, dtype=np.int64)
    batches = Batches(x, y, batch_size=4, shuffle=True, seed=3)
    assert len(batches) == 3
    epoch0 = torch.cat([b[1] for b in batches])
    epoch1 = torch.cat([b[1] for b in batches])
    assert sorted(epoch0.tolist()) == list(range(10)) == sorted(epoch1.tolist())
    assert not torch.equal(epoch0, epoch1)
    batches.set_epoch(0)
    assert torch.equal(torch.cat([b[1] for b in batches]), epoch0)
    # Same seed in a fresh object -> same order; the features follow their labels.
    fresh = Batches(x, y, batch_size=4, shuffle=True, seed=3)
    first_x, first_y = next(iter(fresh))
    assert torch.equal(first_x[:, 0].long(), first_y)
    assert torch.equal(first_y, epoch0[:4])


def test_batches_in_order_and_drop_last() -> None:
    x = np.zeros((10, 2), dtype=np.float32)
    y = np.arange(10, dtype=np.int64)
    ordered = Batches(x, y, batch_size=4)
    assert [b[1].tolist() for b in ordered] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [b[1].tolist() for b in ordered] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    dropped = Batches(x, y, batch_size=4, drop_last=True)
    assert len(dropped) == 2 and sum(len(b[1]) for b in dropped) == 8


def test_batches_reject_bad_arguments() -> None:
    x = np.zeros((4, 2), dtype=np.float32)
    with pytest.raises(ConfigError, match="batch_size"):
        Batches(x, np.zeros(4, dtype=np.int64), batch_size=0)
    with pytest.raises(SlimshipError, match="equal length"):
        Batches(x, np.zeros(3, dtype=np.int64))
    with pytest.raises(ConfigError, match="batch_size"):
        digits_loaders(batch_size=-2)


def test_loaders_cover_the_split(split: DigitsSplit) -> None:
    train, test = digits_loaders(batch_size=100, seed=0)
    assert train.shuffle and not test.shuffle
    assert len(test) == -(-len(split.y_test) // 100)
    xs, ys = zip(*test)
    assert np.array_equal(torch.cat(ys).numpy(), split.y_test)
    assert np.array_equal(torch.cat(xs).numpy(), split.x_test)
    assert sorted(torch.cat([y for _, y in train]).tolist()) == sorted(split.y_train.tolist())


def test_evaluate_accuracy_counts_top1_and_restores_mode() -> None:
    x = np.zeros((6, 3), dtype=np.float32)
    y = np.array([0, 1, 2, 0, 1, 2], dtype=np.int64)
    batches = Batches(x, y, batch_size=4)
    always_one = torch.nn.Linear(3, 3)
    with torch.no_grad():
        always_one.weight.zero_()
        always_one.bias.copy_(torch.tensor([0.0, 1.0, 0.0]))
    always_one.train()
    assert evaluate_accuracy(always_one, batches) == pytest.approx(100 * 2 / 6)
    assert always_one.training
    # A plain function returning numpy logits also works.
    assert evaluate_accuracy(lambda t: np.eye(3, dtype=np.float32)[[0, 1, 2, 0][: len(t)]], batches) > 0
    with pytest.raises(SlimshipError, match="logits"):
        evaluate_accuracy(lambda t: t.sum(), batches)


def test_calibration_batches() -> None:
    train, _ = digits_loaders(batch_size=32)
    calib = calibration_batches(train, 3)
    assert len(calib) == 3 and all(len(item) == 1 and item[0].shape == (32, 1, 8, 8) for item in calib)
    assert len(calibration_batches(Batches(np.zeros((5, 1), np.float32), np.zeros(5, np.int64), 2), 10)) == 3
    with pytest.raises(ConfigError, match="'n'"):
        calibration_batches(train, 0)


@pytest.mark.parametrize("name", sorted(MODEL_FACTORIES))
def test_factory_builds_runs_and_exports(name: str) -> None:
    factory = MODEL_FACTORIES[name]
    model = factory(seed=0).eval()
    x = torch.from_numpy(digits_arrays().x_test[:5])
    with torch.no_grad():
        out = model(x)
    assert out.shape == (5, 10) and torch.isfinite(out).all()
    same = factory(seed=0).eval()
    other = factory(seed=1).eval()
    with torch.no_grad():
        assert torch.equal(same(x), out)
        assert not torch.equal(other(x), out)
    program = torch.export.export(model, (x,), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), out)


def test_factories_keep_the_global_rng() -> None:
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    digits_cnn(seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_factories_reject_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="widths"):
        MODEL_FACTORIES["digits_cnn"](widths=(64,))
    with pytest.raises(ConfigError, match="blocks"):
        MODEL_FACTORIES["small_resnet"](widths=(8, 16), blocks=(1,))
    with pytest.raises(ConfigError, match="heads"):
        MODEL_FACTORIES["digits_vit"](dim=30, heads=4)
    with pytest.raises(ConfigError, match="patch"):
        MODEL_FACTORIES["digits_vit"](patch=3)


def test_digits_cnn_trains_to_80_percent_in_two_epochs() -> None:
    # Half the demo widths and one thread keep this fast on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train, test = digits_loaders(batch_size=64, seed=0)
        model = digits_cnn(widths=(32, 64, 64), seed=0)
        before = evaluate_accuracy(model, test)
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
        model.train()
        for _ in range(2):
            for x, y in train:
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
        after = evaluate_accuracy(model, test)
    finally:
        torch.set_num_threads(threads)
    assert after > 80.0
    assert after > before + 30.0


# ---- torchrun shards ----------------------------------------------------------------------------------
def _arrays(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(n, dtype=np.float32).reshape(n, 1), np.arange(n, dtype=np.int64)


def _labels(batches) -> list[list[int]]:
    return [torch.as_tensor(y).reshape(-1).tolist() for _, y in batches]


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield torch.zeros(2, 1), torch.zeros(2, dtype=torch.int64)


def _tensor_dataset(n: int = 10) -> torch.utils.data.TensorDataset:
    x, y = _arrays(n)
    return torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))


#: kind of train data -> (a factory making it, whether it can be sharded)
SHARD_CASES = {
    "Batches": (lambda: Batches(*_arrays(10), batch_size=3, shuffle=True), True),
    "DataLoader over a map-style dataset": (
        lambda: torch.utils.data.DataLoader(_tensor_dataset(), batch_size=3, shuffle=True),
        True,
    ),
    "map-style Dataset of batches": (_tensor_dataset, True),
    "list of batches": (lambda: [(torch.zeros(2, 1), torch.tensor([i, i])) for i in range(5)], True),
    "generator": (lambda: ((torch.zeros(2, 1), torch.zeros(2)) for _ in range(3)), False),
    "iterator": (lambda: iter([(torch.zeros(2, 1), torch.zeros(2))]), False),
    "IterableDataset": (_Stream, False),
    "DataLoader over an IterableDataset": (
        lambda: torch.utils.data.DataLoader(_Stream(), batch_size=None),
        False,
    ),
    "DataLoader with its own batch_sampler": (
        lambda: torch.utils.data.DataLoader(_tensor_dataset(), batch_sampler=[[0, 1], [2, 3, 4]]),
        False,
    ),
    "DataLoader over a list of samples": (
        lambda: torch.utils.data.DataLoader(list(zip(*map(torch.from_numpy, _arrays(10)))), batch_size=3),
        True,
    ),
    "DataLoader of whole batches (batch_size=None)": (
        lambda: torch.utils.data.DataLoader(_tensor_dataset(), batch_size=None, shuffle=True),
        True,
    ),
    "DataLoader with a SubsetRandomSampler": (
        lambda: torch.utils.data.DataLoader(
            _tensor_dataset(), 2, sampler=SubsetRandomSampler(range(0, 10, 2))
        ),
        False,
    ),
    "DataLoader with a WeightedRandomSampler": (
        lambda: torch.utils.data.DataLoader(
            _tensor_dataset(), 2, sampler=WeightedRandomSampler([1.0] * 10, 6)
        ),
        False,
    ),
    "DataLoader with a RandomSampler drawing with replacement": (
        lambda: torch.utils.data.DataLoader(_tensor_dataset(), 2, sampler=RandomSampler(range(10), True)),
        False,
    ),
}


@pytest.mark.parametrize("case", SHARD_CASES)
def test_train_data_is_sharded_with_equal_batch_counts_or_refused(case: str) -> None:
    make, shardable = SHARD_CASES[case]
    if not shardable:
        with pytest.raises(ConfigError) as caught:
            shard_train(make(), 1, 2, "data.factory")
        message = str(caught.value)
        assert (
            message.startswith("'data.factory' returned train data of type ")
            and type(make()).__name__ in message
        )
        assert "return slimship.data.Batches" in message
        if "Sampler " in case:  # named, with the subset idiom that keeps the user's split
            assert (
                f"with a {type(make().sampler).__name__}" in message and "Subset(dataset, indices)" in message
            )
        return
    train = make()
    assert shard_train(train, 0, 1) is train  # one process: as it is
    shards = [shard_train(make(), r, 2, "data.factory") for r in (0, 1)]
    for epoch in (0, 1):
        for s in shards:
            if hasattr(s, "set_epoch"):
                s.set_epoch(epoch)
        seen = [_labels(s) for s in shards]
        assert len(seen[0]) == len(seen[1]) == len(shards[0]) == len(shards[1]) > 0
        assert [len(b) for b in seen[0]] == [len(b) for b in seen[1]]  # same batch sizes, step by step
        union = {v for rank in seen for batch in rank for v in batch}
        assert union == {v for batch in _labels(make()) for v in batch}  # together: the whole epoch


#: train data one process cannot train on for several epochs, and what the refusal says about it
ONE_PROCESS_REFUSED = {
    "generator": "can be read only once",
    "iterator": "can be read only once",
    "IterableDataset": "has no len()",
    "DataLoader over an IterableDataset": "has no len()",
}


@pytest.mark.parametrize("case", SHARD_CASES)
def test_one_process_takes_reusable_sized_train_data_and_refuses_the_rest(case: str) -> None:
    train = SHARD_CASES[case][0]()
    if case not in ONE_PROCESS_REFUSED:
        assert check_train(train, "data.factory") is train
        return
    with pytest.raises(ConfigError) as caught:
        check_train(train, "data.factory")
    message = str(caught.value)
    assert (
        message.startswith("'data.factory' returned train data of type ")
        and ONE_PROCESS_REFUSED[case] in message
    )
    assert "lr_schedule" not in message and "return slimship.data.Batches" in message


def test_batches_shards_of_b_make_the_global_batches_of_one_process_with_2b() -> None:
    x, y = _arrays(24)
    single = Batches(x, y, batch_size=8, shuffle=True, seed=4)
    ranks = [Batches(x, y, batch_size=4, shuffle=True, seed=4).shard(r, 2) for r in (0, 1)]
    for epoch in (0, 3):
        single.set_epoch(epoch)
        for r in ranks:
            r.set_epoch(epoch)
        per_rank = [_labels(r) for r in ranks]
        merged = [sorted(a + b) for a, b in zip(*per_rank, strict=True)]
        assert merged == [sorted(b) for b in _labels(single)]
    assert len(Batches(x[:9], y[:9], 2).shard(1, 2)) == 3  # 9 samples: 5 per rank after wrapping, 3 batches
    with pytest.raises(SlimshipError, match="already rank 0 of 2"):
        ranks[0].shard(0, 2)
    with pytest.raises(SlimshipError, match="rank 2 is not below world 2"):
        Batches(x, y, rank=2, world=2)


def test_a_loader_the_user_sharded_is_kept_when_it_fits_this_rank() -> None:
    """The standard DDP idiom, DataLoader(sampler=DistributedSampler(...)), is this rank's shard already."""
    from torch.utils.data import DataLoader, DistributedSampler

    def loader(rank: int) -> DataLoader:
        sampler = DistributedSampler(_tensor_dataset(), num_replicas=2, rank=rank, shuffle=True, seed=3)
        return DataLoader(_tensor_dataset(), batch_size=2, sampler=sampler)

    shards = [shard_train(loader(r), r, 2, "data.factory") for r in (0, 1)]
    for epoch in (0, 1):
        for s in shards:
            s.set_epoch(epoch)
        seen = [_labels(s) for s in shards]
        assert len(seen[0]) == len(seen[1]) > 0
        assert sorted(v for rank in seen for batch in rank for v in batch) == sorted(
            int(y) for _, y in _tensor_dataset()
        )  # the two shards together: the epoch once
    with pytest.raises(ConfigError, match="DistributedSampler is set for rank 0 of 2, but this is rank 1"):
        shard_train(loader(0), 1, 2, "data.factory")


def test_empty_train_data_is_named() -> None:
    for empty in ([], torch.utils.data.DataLoader(_tensor_dataset(0), batch_size=2)):
        with pytest.raises(ConfigError, match=r"'data.factory' returned empty train data .* of 0 batches"):
            check_train(empty, "data.factory")
