"""Registry, option checking, train_loop determinism and checkpoint resume, group helpers."""

from __future__ import annotations

import inspect
import logging
from dataclasses import asdict, dataclass, fields

import numpy as np
import pytest
import torch
from torch import nn

from slimship.compress import LoopOptions, compress, group_norms, train_loop
from slimship.compress.groups import GroupTensors, prunable_groups
from slimship.compress.registry import METHODS, CompressResult, method_options, register
from slimship.compress.training import Training, lr_factor, make_optimizer
from slimship.data import Batches
from slimship.errors import CompressionError
from slimship.slimming import find_groups, slim


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models train fastest on one thread (and do not fight other processes for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def tiny_model(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyNet().eval()


def tiny_data(n: int = 128, seed: int = 0) -> Batches:
    """Four classes: noise images whose brightness depends on the class (learnt in a few steps)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = (
        rng.normal(0, 0.5, (n, 1, 8, 8)).astype(np.float32)
        + (y.astype(np.float32) - 1.5)[:, None, None, None]
    )
    return Batches(x, y.astype(np.int64), batch_size=32, shuffle=True, seed=seed)


def example() -> tuple[torch.Tensor]:
    return (torch.from_numpy(tiny_data(8, seed=1).x),)


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def check_slims(model: nn.Module) -> None:
    """`slim` removes the structure: fewer params, outputs equal within 1e-5 relative."""
    inputs = example()
    result = slim(model, inputs)
    assert result.params_after < result.params_before
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(5, 1, 8, 8, generator=generator)
    with torch.no_grad():
        ref, got = model.eval()(x), result.model(x)
    assert float((ref - got).abs().max()) <= 1e-5 * max(float(ref.abs().max()), 1e-8)


def test_unknown_method_lists_allowed() -> None:
    with pytest.raises(CompressionError, match=r"unknown compression method 'nope'.*hesso"):
        compress("nope", tiny_model(), example(), tiny_data())


def test_unknown_option_named_with_allowed() -> None:
    with pytest.raises(CompressionError, match=r"no option 'sparsity'.*allowed options:.*target"):
        compress("hesso", tiny_model(), example(), tiny_data(), sparsity=0.5)


def test_training_options_are_flat_with_per_method_defaults() -> None:
    hspg_options, csgd_options = method_options("hspg"), method_options("csgd")
    for field in fields(Training):
        assert field.name in hspg_options and field.name in csgd_options
    assert "training" not in hspg_options
    assert csgd_options["epochs"] == 20 and hspg_options["epochs"] == Training().epochs
    assert inspect.signature(METHODS["drop"]).parameters["lr"].default == Training().lr


def test_training_options_reach_the_run(tmp_path) -> None:
    result = compress("hesso", tiny_model(), example(), tiny_data(), epochs=2, lr=0.02, target=0.5, periods=4)
    assert [h["epoch"] for h in result.history] == [1, 2] and result.info["completed"]
    ck = tmp_path / "ck.pt"
    options = {"epochs": 3, "stop_after": 1, "periods": 4, "checkpoint": ck}
    cut = compress("hesso", tiny_model(), example(), tiny_data(), **options)
    assert len(cut.history) == 1 and not cut.info["completed"] and ck.exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"stop_after": 0, "checkpoint": "c.pt"}, "option 'stop_after' must be an int >= 1, got 0"),
        ({"stop_after": -1, "checkpoint": "c.pt"}, "option 'stop_after' must be an int >= 1, got -1"),
        ({"stop_after": 1}, "give a checkpoint too"),
    ],
)
def test_stop_after_needs_a_positive_count_and_a_checkpoint(options, message) -> None:
    with pytest.raises(CompressionError, match=message):
        compress("hesso", tiny_model(), example(), tiny_data(), epochs=3, periods=4, **options)


def test_bad_training_option_is_named() -> None:
    with pytest.raises(CompressionError, match="lr must be > 0"):
        compress("csgd", tiny_model(), example(), tiny_data(), lr=0.0)


def test_method_may_not_redeclare_a_training_option() -> None:
    def clashing(model, example_inputs, train, test=None, *, training: Training, lr: float = 0.1):
        raise AssertionError("never called")

    with pytest.raises(CompressionError, match=r"clash: \['lr'\]"):
        register("clashing", training=Training())(clashing)
    assert "clashing" not in METHODS


@dataclass(frozen=True)
class EchoOptions:
    width: float = 0.5
    name: str = "a"


def test_an_options_object_and_its_flat_fields_reach_the_method() -> None:
    def echo(model, example_inputs, train, test=None, *, training: Training, options: EchoOptions):
        return CompressResult(model=model, method="echo", info={"options": options, "training": training})

    method = register("echo-options", training=Training(epochs=7), options=EchoOptions)(echo)
    try:
        assert method_options("echo-options") == {"width": 0.5, "name": "a", **asdict(Training(epochs=7))}
        flat = compress("echo-options", tiny_model(), example(), None, width=0.25, lr=0.1).info
        assert flat["options"] == EchoOptions(width=0.25) and flat["training"] == Training(epochs=7, lr=0.1)
        typed = method(tiny_model(), example(), None, options=EchoOptions(name="b"), width=0.25).info
        assert typed["options"] == EchoOptions(width=0.25, name="b")
        with pytest.raises(CompressionError, match="options must be a EchoOptions, got dict"):
            method(tiny_model(), example(), None, options={"width": 0.25})
        with pytest.raises(CompressionError, match="has no option 'widht'"):
            compress("echo-options", tiny_model(), example(), None, widht=0.25)
        with pytest.raises(CompressionError, match=r"clash: \['width'\]"):
            register("clash-options", options=EchoOptions)(
                lambda model, example_inputs, train, test=None, *, options, width=1: None
            )
    finally:
        METHODS.pop("echo-options")


def _train(epochs: int, checkpoint=None, stop_after=None, model=None):
    model = model or tiny_model()
    opt = make_optimizer(model, 0.05)
    data = tiny_data()
    hist = train_loop(
        model, data, LoopOptions(epochs, checkpoint=checkpoint, stop_after=stop_after), optimizer=opt
    )
    return model, hist


def test_train_loop_deterministic_and_learns() -> None:
    a, ha = _train(3)
    b, hb = _train(3)
    assert same_state(a, b)
    assert ha == hb
    assert ha[-1]["loss"] < ha[0]["loss"]


def test_train_loop_resume_equals_uninterrupted(tmp_path, caplog) -> None:
    full, hist_full = _train(3)
    ckpt = tmp_path / "run.pt"
    _, partial = _train(3, checkpoint=ckpt, stop_after=1)
    assert len(partial) == 1 and ckpt.exists()
    with caplog.at_level(logging.INFO, logger="slimship.compress.training"):
        resumed, hist = _train(3, checkpoint=ckpt)
    assert "resuming from checkpoint" in caplog.text
    assert same_state(full, resumed)
    assert hist == hist_full


def test_corrupt_checkpoint_is_refused(tmp_path) -> None:
    ckpt = tmp_path / "run.pt"
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(CompressionError, match=r"run\.pt"):
        _train(1, checkpoint=ckpt)


def test_group_norms_match_slices() -> None:
    model = tiny_model()
    found = find_groups(model, example())
    norms = group_norms(model, found)
    g = found.groups[0]
    manual = torch.cat(
        [model.get_parameter(n).detach().select(d, p[0]).reshape(-1) for n, d, p in g.produce
         if n in dict(model.named_parameters())]
    ).norm()  # fmt: skip
    assert norms.shape == (len(found.groups),)
    assert torch.isclose(norms[0].float(), manual, rtol=1e-5)
    GroupTensors(model, found.groups).zero(0)
    assert group_norms(model, found)[0] == 0


def test_prunable_groups_rejects_unknown_space() -> None:
    with pytest.raises(CompressionError, match="not prunable channel spaces"):
        prunable_groups(tiny_model(), example(), spaces=["nope"])


def _train_cosine(epochs: int, checkpoint=None, stop_after=None, floor: float = 0.1):
    model = tiny_model()
    opt = make_optimizer(model, 0.05)
    options = LoopOptions(
        epochs, lr_schedule="cosine", lr_floor=floor, checkpoint=checkpoint, stop_after=stop_after
    )
    hist = train_loop(model, tiny_data(), options, optimizer=opt)
    return model, hist, opt


def test_lr_factor_cosine_endpoints() -> None:
    assert lr_factor("cosine", 0, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor("cosine", 50, 100, 0.1) == pytest.approx(0.55)
    assert lr_factor("cosine", 100, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor("constant", 70, 100, 0.1) == 1.0
    with pytest.raises(CompressionError, match=r"lr_schedule='step'.*cosine"):
        lr_factor("step", 0, 10)


def test_cosine_schedule_decays_and_is_deterministic() -> None:
    a, ha, opt = _train_cosine(3)
    b, hb, _ = _train_cosine(3)
    assert same_state(a, b) and ha == hb
    lrs = [h["lr"] for h in ha]
    assert lrs == sorted(lrs, reverse=True) and len(set(lrs)) == 3
    steps = 3 * len(tiny_data())
    # the last step used is steps - 1 of steps: just above the floor
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * lr_factor("cosine", steps - 1, steps, 0.1))
    constant, hc = _train(3)
    assert not same_state(a, constant)
    assert "lr" not in hc[0]


def test_cosine_resume_equals_uninterrupted(tmp_path) -> None:
    full, hist_full, opt_full = _train_cosine(4)
    ckpt = tmp_path / "cos.pt"
    _, partial, _ = _train_cosine(4, checkpoint=ckpt, stop_after=2)
    assert len(partial) == 2
    resumed, hist, opt = _train_cosine(4, checkpoint=ckpt)
    assert same_state(full, resumed)
    assert hist == hist_full
    assert opt.param_groups[0]["lr"] == opt_full.param_groups[0]["lr"]


def test_checkpoint_of_other_schedule_refused(tmp_path) -> None:
    ckpt = tmp_path / "cos.pt"
    _train_cosine(3, checkpoint=ckpt, stop_after=1)
    with pytest.raises(CompressionError, match=r"lr_schedule='cosine'.*'constant'"):
        _train(3, checkpoint=ckpt)
    with pytest.raises(CompressionError, match="lr_floor"):
        _train_cosine(3, checkpoint=ckpt, floor=0.2)
