"""Sparsifiers in a user's own loop: targets reached, exact slimming, resume, across processes, README."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from slimship.compress import sparsifier
from slimship.compress.sparsifier import SPARSIFIERS
from slimship.errors import CompressionError
from slimship.slimming import slim
from tests.compress.gloo import single_process_group
from tests.compress.test_base import check_slims, example, one_thread, same_state, tiny_data, tiny_model
from tests.parallel import free_port

assert one_thread  # autouse fixture

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 6
#: per method: options (steps: 4 batches per epoch x 6 epochs = 24) and the base rate of each optimizer
OPTIONS = {
    "hesso": {"warmup_steps": 4, "pruning_steps": 12, "periods": 3},
    "hspg": {"warmup_steps": 4, "projection_steps": 12},
    "drop": {"pruning_steps": 16, "rounds": 4, "drop_in": 0.5},
    "csgd": {"centripetal": 0.5},
    "magnitude": {"prune_steps": 3, "pruning_steps": 12},
    "simguided": {"prune_steps": 3, "pruning_steps": 12},
}
OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01),
}
ZERO_TARGET = {"conv1.weight[0]": 4, "conv2.weight[0]": 6}  # target 0.5 of 8 and 12 channels


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every step's batch of the whole run, in order (each pass over the data reshuffles)."""
    data = tiny_data()
    return [(x, y) for _ in range(EPOCHS) for x, y in data]


def options(name: str, opt: str) -> dict:
    extra = {"lr": 0.01} if name == "hspg" and opt == "adamw" else {}
    return {**OPTIONS[name], **extra}


def train(model, sp, optimizer, steps, record: list | None = None) -> None:
    """The user's loop: forward, backward, the sparsifier's two calls around the optimizer step."""
    model.train()
    for x, y in steps:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        sp.after_backward()
        optimizer.step()
        sp.after_step()
        if record is not None:
            record.append(sp.decisions())
    model.eval()


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_user_loop_reaches_target_and_slims(name: str, opt: str) -> None:
    model, steps = tiny_model(), batches()
    sp = sparsifier(name, model, example(), total_steps=len(steps), **options(name, opt))
    train(model, sp, OPTIMIZERS[opt](model.parameters()), steps)
    summary = sp.summary()
    if name == "csgd":
        assert {s: v["clustered"] for s, v in summary["spaces"].items()} == ZERO_TARGET
        merged = {s.name: s.merged for s in slim(model, example()).report.spaces if s.merged}
        assert merged == ZERO_TARGET
    else:
        assert {s: v["zero"] for s, v in summary["spaces"].items()} == ZERO_TARGET
        assert {s: v["decided"] for s, v in summary["spaces"].items()} == ZERO_TARGET
    # what slim removes, for every method alike (C-SGD merges rather than zeroes: its sparsity stays 0)
    assert {s: v["removable"] for s, v in summary["spaces"].items()} == ZERO_TARGET
    assert summary["removable"] == sum(ZERO_TARGET.values()) / len(sp.groups)
    check_slims(model)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_state_dict_resume_takes_the_same_decisions(name: str) -> None:
    steps = batches()
    model = tiny_model()
    sp = sparsifier(name, model, example(), total_steps=len(steps), **OPTIONS[name])
    whole: list = []
    train(model, sp, OPTIMIZERS["sgd"](model.parameters()), steps, whole)

    cut = 9  # inside the pruning stage of every method
    first = tiny_model()
    sp1 = sparsifier(name, first, example(), total_steps=len(steps), **OPTIONS[name])
    opt1 = OPTIMIZERS["sgd"](first.parameters())
    parts: list = []
    train(first, sp1, opt1, steps[:cut], parts)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict(), "sp": sp1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    second = tiny_model(seed=1)  # a fresh process: other weights until the checkpoint is loaded
    second.load_state_dict(saved["model"])
    sp2 = sparsifier(name, second, example(), total_steps=len(steps), **OPTIONS[name])
    sp2.load_state_dict(saved["sp"])
    opt2 = OPTIMIZERS["sgd"](second.parameters())
    opt2.load_state_dict(saved["opt"])
    train(second, sp2, opt2, steps[cut:], parts)
    assert parts == whole
    assert same_state(model, second)


def test_decisions_change_during_the_run() -> None:
    """The recorded decisions are not constant (so the equality checks above compare something)."""
    steps = batches()
    model = tiny_model()
    sp = sparsifier("hesso", model, example(), total_steps=len(steps), **OPTIONS["hesso"])
    record: list = []
    train(model, sp, OPTIMIZERS["sgd"](model.parameters()), steps, record)
    assert record[0]["zero"] == [] and len({json.dumps(r) for r in record}) >= 4


def test_unknown_name_and_option_are_named() -> None:
    with pytest.raises(CompressionError, match=r"no sparsifier 'lasso'; allowed: .*hesso"):
        sparsifier("lasso", tiny_model(), example(), total_steps=10)
    with pytest.raises(CompressionError, match=r"has no option 'epochs'.*periods"):
        sparsifier("hesso", tiny_model(), example(), total_steps=10, epochs=3)
    with pytest.raises(CompressionError, match="total_steps must be a positive int"):
        sparsifier("hesso", tiny_model(), example(), total_steps=0)
    model = tiny_model()
    state = sparsifier("hspg", model, example(), total_steps=20).state_dict()
    with pytest.raises(CompressionError, match="state is for 'hspg', not 'hesso'"):
        sparsifier("hesso", model, example(), total_steps=20).load_state_dict(state)
    assert set(OPTIONS) <= set(SPARSIFIERS)


def test_ddp_wrapper_is_unwrapped(tmp_path: Path) -> None:
    """A DDP-wrapped model (one gloo process) gives the same groups and decisions as the plain one."""
    with single_process_group(tmp_path):
        model = tiny_model()
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        sp = sparsifier("hesso", wrapped, example(), total_steps=len(batches()), **OPTIONS["hesso"])
        plain = sparsifier("hesso", tiny_model(), example(), total_steps=len(batches()), **OPTIONS["hesso"])
        assert sp.model is model and [g.produce for g in sp.groups] == [g.produce for g in plain.groups]
        train(wrapped, sp, OPTIMIZERS["sgd"](wrapped.parameters()), batches())
        assert {s: v["zero"] for s, v in sp.summary()["spaces"].items()} == ZERO_TARGET
        del wrapped, sp  # a DDP reducer must not outlive its process group (its teardown then hangs)


def run_readme_example(heading: str, tmp_path: Path) -> str:
    """Run the first python block after `heading` in README.md as a script (it must exit 0); its stdout."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index(heading) :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_readme_example_runs(tmp_path: Path) -> None:
    """The README's "In your own training loop" example runs as written and prints a slim model."""
    stdout = run_readme_example("## In your own training loop", tmp_path)
    assert re.search(r"group sparsity 0\.5\d*", stdout), stdout


@pytest.mark.slow  # two torchrun processes, each method four times (~40 s on a loaded machine)
def test_two_processes_decide_alike(tmp_path: Path) -> None:
    """torchrun, 2 gloo processes (one launch, four phases, see ddp_sparsifier):

    * DDP: identical decisions on both ranks at every step, equal to one process over the same global
      batches; identical weights; rank 0 alone writes the slim check, which passes.
    * separate replicas, own data, no gradient all-reduce: the weights differ between ranks, yet every
      decision agrees at every step; with the cross-rank averaging switched off every method disagrees.
    * resumed from rank 0's checkpoint into fresh objects: the same weights and decisions as without.
    """
    from tests.compress import ddp_sparsifier

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun is not None
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--nproc_per_node=2", "--master_port", str(free_port())]
    cmd += ["-m", "tests.compress.ddp_sparsifier", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"ranks-rank{r}.json").read_text()) for r in (0, 1)]
    methods = sorted(ddp_sparsifier.METHODS)
    for phase in ("ddp", "local", "resumed", "control"):
        assert sorted(ranks[0][phase]) == sorted(ranks[1][phase]) == methods
    prints = [r["fingerprint"] for r in ranks]
    assert all(prints[0][m]["ddp"] == prints[1][m]["ddp"] for m in methods)
    assert all(prints[0][m]["local"] != prints[1][m]["local"] for m in methods)  # replicas really differ
    assert ranks[0]["ddp"] == ranks[1]["ddp"]
    assert ranks[0]["local"] == ranks[1]["local"]
    assert [m for m in methods if ranks[0]["control"][m] == ranks[1]["control"][m]] == []
    assert (
        ranks[0]["resumed"]
        == ranks[1]["resumed"]
        == {m: {"weights": True, "decisions": True} for m in methods}
    )
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*.pt")) == [f"checkpoint-{m}.pt" for m in methods]
    single = {name: ddp_sparsifier.run(name, rank=0, world=1)[0] for name in methods}
    assert ranks[0]["ddp"] == single
    slimmed = json.loads((tmp_path / "slim-rank0.json").read_text())
    assert slimmed == {name: True for name in methods}
    assert not (tmp_path / "slim-rank1.json").exists()


def test_least_each_picks_what_least_picks_per_space() -> None:
    """The one-sort selection for all spaces equals the per-space selection, ties and ineligible included."""
    sp = sparsifier("magnitude", tiny_model(), example(), total_steps=10)
    gen = torch.Generator().manual_seed(0)
    n = len(sp.groups)
    for _ in range(20):
        scores = torch.randint(0, 4, (n,), generator=gen).to(torch.float64)  # many ties
        eligible = torch.rand(n, generator=gen) < 0.7
        need = torch.randint(-1, 8, (len(sp.spaces),), generator=gen)
        expected = torch.zeros_like(eligible)
        for k, space in enumerate(sp.spaces):
            expected[sp.least(scores, space, eligible, max(int(need[k]), 0))] = True
        assert torch.equal(sp.least_each(scores, eligible, need), expected)


# ---- misuse: call order, steps past the run, stages too short, foreign states, wrong argument types ----
def one_step(model, sp, optimizer, calls: str) -> None:
    """One batch; `calls` orders the hook calls: b = after_backward, o = optimizer.step, s = after_step."""
    x, y = batches()[0]
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    act = {"b": sp.after_backward, "o": optimizer.step, "s": sp.after_step}
    for c in calls:
        act[c]()


@pytest.mark.parametrize("calls", ["sob", "bbos", "boss"])
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_hooks_called_out_of_order_are_refused(name: str, calls: str) -> None:
    model, total = tiny_model(), len(batches())
    sp = sparsifier(name, model, example(), total_steps=total, **OPTIONS[name])
    optimizer = OPTIMIZERS["sgd"](model.parameters())
    one_step(model, sp, optimizer, "bos")  # the right order passes
    with pytest.raises(
        CompressionError, match=r"loss.backward\(\); sp.after_backward\(\); optimizer.step\(\)"
    ):
        one_step(model, sp, optimizer, calls)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_steps_past_total_steps_hold_the_decisions(name: str) -> None:
    """Three steps past total_steps: one warning, no new decision, the zeros (or clusters) still held."""
    model, steps = tiny_model(), batches()
    sp = sparsifier(name, model, example(), total_steps=len(steps), **OPTIONS[name])
    optimizer = OPTIMIZERS["sgd"](model.parameters())
    train(model, sp, optimizer, steps)
    at_end = sp.decisions()
    with pytest.warns(
        RuntimeWarning, match=f"step {len(steps) + 1} is past total_steps={len(steps)}"
    ) as seen:
        train(model, sp, optimizer, steps[:3])
    assert len(seen) == 1 and sp.step == len(steps) + 3 and sp.decisions() == at_end
    assert {s: v["removable"] for s, v in sp.summary()["spaces"].items()} == ZERO_TARGET
    check_slims(model)


@pytest.mark.parametrize(
    ("name", "opts", "total", "message"),
    [
        ("hesso", {"periods": 100}, 10, r"pruning_steps \(4 steps\) must hold the 100 periods"),
        ("hesso", {}, 4, r"pruning_steps \(2 steps\) must hold the 5 periods"),
        ("hesso", {"warmup_steps": 2, "pruning_steps": 2, "periods": 3}, 8, "must hold the 3 periods"),
        ("drop", {"rounds": 50}, 10, "pruning_steps=50 must hold the 50 rounds"),
        (
            "magnitude",
            {"prune_steps": 5, "pruning_steps": 4},
            8,
            "prune_steps=5 must be >= 1 and pruning_steps",
        ),
        (
            "simguided",
            {"prune_steps": 5, "pruning_steps": 4},
            8,
            "prune_steps=5 must be >= 1 and pruning_steps",
        ),
    ],
)
def test_a_stage_shorter_than_its_periods_is_refused(name: str, opts: dict, total: int, message: str) -> None:
    with pytest.raises(CompressionError, match=message):
        sparsifier(name, tiny_model(), example(), total_steps=total, **opts)


def test_a_stage_of_one_step_per_period_reaches_the_target() -> None:
    """The shortest stage allowed (as many steps as periods) still reaches the target exactly."""
    model, steps = tiny_model(), batches()[:8]
    sp = sparsifier("hesso", model, example(), total_steps=8, warmup_steps=2, pruning_steps=3, periods=3)
    train(model, sp, OPTIMIZERS["sgd"](model.parameters()), steps)
    assert {s: v["zero"] for s, v in sp.summary()["spaces"].items()} == ZERO_TARGET


def test_compress_refuses_a_pruning_stage_shorter_than_its_periods() -> None:
    from slimship.compress import compress

    with pytest.raises(
        CompressionError, match=r"pruning_epochs=1 x 4 batches \(4 steps\) must hold the 5 periods"
    ):
        compress("hesso", tiny_model(), example(), tiny_data(), epochs=2)


class OtherNet(torch.nn.Module):
    """As many groups per space as TinyNet (8 and 12), other sizes (5x5 kernels)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 8, 5, padding=2, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 12, 5, padding=2)
        self.bn2 = torch.nn.BatchNorm2d(12)
        self.fc = torch.nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def test_load_state_dict_refuses_a_state_that_does_not_fit() -> None:
    total = len(batches())

    def build(model=None, **changes):
        opts = {**OPTIONS["hesso"], **changes}
        steps = opts.pop("total_steps", total)
        return sparsifier("hesso", model or tiny_model(), example(), total_steps=steps, **opts)

    state = build().state_dict()
    with pytest.raises(CompressionError, match="state has 20 groups, this model 8: it was saved for another"):
        build(spaces=["conv1.weight[0]"]).load_state_dict(state)
    with pytest.raises(CompressionError, match=r"saved for another model: group 0 is conv1\.weight\[0\]:"):
        build(OtherNet().eval()).load_state_dict(state)
    with pytest.raises(CompressionError, match="total_steps: saved 24, here 30"):
        build(total_steps=30).load_state_dict(state)
    with pytest.raises(CompressionError, match="periods: saved 3, here 4"):
        build(periods=4).load_state_dict(state)
    with pytest.raises(CompressionError, match=r"fractions: saved .*0\.5.*, here .*0\.25"):
        build(target=0.25).load_state_dict(state)
    with pytest.raises(CompressionError, match="lacks 'zero'; load a state saved by"):
        build().load_state_dict({k: v for k, v in state.items() if k != "zero"})
    with pytest.raises(CompressionError, match="must be the dict of state_dict"):
        build().load_state_dict([state])
    build().load_state_dict(state)  # the same settings and model: accepted


@pytest.mark.parametrize(
    ("change", "argument"),
    [
        ({"model": "net"}, "model must be a torch.nn.Module"),
        ({"target": "half"}, "target must be a number"),
        ({"target": True}, "target must be a number"),
        ({"seed": "x"}, "seed must be an int"),
        ({"total_steps": True}, "total_steps must be a positive int"),
        ({"total_steps": 2.5}, "total_steps must be a positive int"),
        ({"space_targets": {"conv1.weight[0]": "x"}}, "space_targets must be None or a dict"),
        ({"spaces": "conv1.weight[0]"}, "spaces must be None or a list"),
        ({"periods": "5"}, "option 'periods' must be an int >= 1"),
        ({"warmup_steps": 2.5}, "option 'warmup_steps' must be an int >= 0"),
    ],
)
def test_arguments_of_the_wrong_type_are_named(change: dict, argument: str) -> None:
    args = {"model": tiny_model(), "total_steps": 24, **change}
    model, steps = args.pop("model"), args.pop("total_steps")
    with pytest.raises(CompressionError, match=re.escape(argument)):
        sparsifier("hesso", model, example(), total_steps=steps, **args)


@pytest.mark.parametrize(
    ("name", "option", "value", "message"),
    [
        ("hspg", "lam", "big", "option 'lam' must be a number >= 0"),
        ("hspg", "lr", 0, "option 'lr' must be a number > 0"),
        ("drop", "rounds", 2.5, "option 'rounds' must be an int >= 1"),
        ("drop", "pool", "x", "option 'pool' must be a number >= 1"),
        ("drop", "drop_in", "x", "option 'drop_in' must be a number in [0, 1]"),
        ("csgd", "centripetal", None, "option 'centripetal' must be a number > 0"),
        ("magnitude", "prune_steps", True, "option 'prune_steps' must be an int >= 1"),
        ("simguided", "pruning_steps", "4", "option 'pruning_steps' must be an int >= 0"),
    ],
)
def test_method_options_of_the_wrong_type_are_named(name: str, option: str, value, message: str) -> None:
    with pytest.raises(CompressionError, match=re.escape(message)):
        sparsifier(name, tiny_model(), example(), total_steps=24, **{option: value})


def test_numpy_numbers_are_numbers() -> None:
    """np.int64 steps and periods, np.float32 targets (what a user computes with numpy) are accepted and
    decide exactly as the Python numbers do; numpy bools are not numbers."""
    import numpy as np

    def build(**kw):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
        return sparsifier("hesso", model, (torch.randn(2, 1, 8, 8),), **kw)

    py = build(total_steps=16, target=0.5, periods=2, seed=1)
    npy = build(total_steps=np.int64(16), target=np.float32(0.5), periods=np.int64(2), seed=np.int64(1))
    assert npy.total_steps == py.total_steps and npy.quota == py.quota
    with pytest.raises(CompressionError, match="total_steps must be a positive int"):
        build(total_steps=np.bool_(True))
