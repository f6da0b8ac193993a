"""HAKD: width family from the slimming engine, latency table from real runners, distillation."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from slimship.compress import (
    DistillationLoss,
    LoopOptions,
    build_student,
    compress,
    distill,
    thinned,
    train_loop,
)
from slimship.compress.distill import choose_student
from slimship.data import evaluate_accuracy
from slimship.errors import CompressionError
from slimship.slimming.api import count_flops
from tests.compress.gloo import single_process_group
from tests.compress.test_base import example, one_thread, same_state, tiny_data, tiny_model
from tests.compress.test_sparsifier import ROOT, run_readme_example
from tests.parallel import free_port

assert one_thread  # autouse fixture


def test_thinned_keeps_fraction_of_channels() -> None:
    teacher = tiny_model()
    student = thinned(teacher, example(), 0.5)
    assert student.conv1.weight.shape[0] == 4 and student.conv2.weight.shape[0] == 6
    assert student.fc.weight.shape == (4, 6)
    with torch.no_grad():
        assert student(example()[0]).shape == teacher(example()[0]).shape


def test_choose_student_budget_and_fallback() -> None:
    rows = [
        {"name": "a", "params": 100, "latency_ms": {"ort": 2.0}, "flops_ratio": 2.0},
        {"name": "b", "params": 50, "latency_ms": {"ort": 1.0}, "flops_ratio": 4.0},
        {"name": "c", "params": 10, "latency_ms": {"ort": 0.5}, "flops_ratio": 9.0},
    ]
    assert choose_student(rows, 1.5, "ort", None) == (rows[1], True)
    assert choose_student(rows, 5.0, "ort", 5.0) == (rows[2], True)
    assert choose_student(rows, 0.1, "ort", None) == (rows[2], False)


def test_min_flops_ratio_binds_the_fallback_too() -> None:
    rows = [
        {"name": "a", "params": 100, "latency_ms": {"ort": 2.0}, "flops_ratio": 5.0},
        {"name": "b", "params": 50, "latency_ms": {"ort": 1.0}, "flops_ratio": 3.9},
    ]
    assert choose_student(rows, 0.5, "ort", 4.0) == (rows[0], False)  # b is faster but under 4x
    with pytest.raises(CompressionError, match=r"min_flops_ratio=6.0 \(best 5.00x\)"):
        choose_student(rows, 5.0, "ort", 6.0)


@pytest.mark.slow
def test_hakd_latency_table_and_distillation() -> None:
    data = tiny_data()
    teacher = tiny_model()
    opts = {"widths": (0.5,), "latency_budget_ms": 1e9, "repeats": 3, "epochs": 4, "lr": 0.05}
    result = compress("hakd", teacher, example(), data, test=data, **opts)
    table = result.info["latency_table"]
    assert [r["name"] for r in table] == ["teacher", "w0.5"]
    assert all(r["latency_ms"]["onnxruntime"] > 0 for r in table)
    assert result.info["chosen"] == "w0.5" and result.info["budget_met"]
    assert result.info["flops_ratio"] > 1.5
    assert sum(p.numel() for p in result.model.parameters()) < sum(p.numel() for p in teacher.parameters())
    assert evaluate_accuracy(result.model, data) >= 60.0
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]


def test_hakd_refuses_both_speedup_and_budget() -> None:
    with pytest.raises(
        CompressionError, match=r"give one of speedup=1\.2 or latency_budget_ms=1000\.0, not both"
    ):
        compress("hakd", tiny_model(), example(), tiny_data(), speedup=1.2, latency_budget_ms=1000.0)


def test_neither_speedup_nor_budget_means_twice_as_fast(monkeypatch) -> None:
    """Without a budget the student must be 2x faster than the teacher (the default speedup)."""

    def fake_table(models, *args, **kwargs):
        return {name: {"onnxruntime": 4.0 if name == "teacher" else 1.0} for name in models}

    monkeypatch.setattr(distill, "latency_table", fake_table)
    _, info = build_student(tiny_model(), example(), widths=(0.5,), repeats=3)
    assert info["budget_ms"] == 2.0 and info["budget_met"]


def test_flops_ratio_means_dense_over_slim_as_in_slim(monkeypatch) -> None:
    """One meaning of flops_ratio across slimship: dense FLOPs / slim FLOPs (> 1 is a saving)."""
    monkeypatch.setattr(
        distill, "latency_table", lambda models, *a, **k: {n: {"onnxruntime": 1.0} for n in models}
    )
    teacher = tiny_model()
    student, info = build_student(teacher, example(), widths=(0.5,), repeats=3)
    ratio = count_flops(teacher, example()) / count_flops(student, example())
    assert ratio > 1 and info["flops_ratio"] == pytest.approx(ratio)


# ---- the user-loop pieces: build_student and DistillationLoss ---------------------------------------
FAST = {"widths": (0.75, 0.5), "latency_budget_ms": 1e9, "repeats": 3}


def trained_teacher(data) -> nn.Module:
    """The tiny model after a few epochs of plain training (a teacher worth distilling)."""
    teacher = tiny_model()
    optimizer = torch.optim.SGD(teacher.parameters(), lr=0.05, momentum=0.9)
    train_loop(teacher, data, LoopOptions(epochs=4), optimizer=optimizer)
    return teacher.eval()


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"temperature": 0.0}, "'temperature'"),
        ({"temperature": float("nan")}, "'temperature'"),
        ({"temperature": float("inf")}, "'temperature'"),
        ({"alpha": 1.5}, "'alpha'"),
        ({"alpha": -0.1}, "'alpha'"),
    ],
)
def test_distillation_loss_names_bad_options(options: dict, named: str) -> None:
    with pytest.raises(CompressionError, match=named):
        DistillationLoss(tiny_model(), **options)
    with pytest.raises(CompressionError, match=named):
        compress("hakd", tiny_model(), example(), tiny_data(), **options)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"widths": ()}, "'widths'"),
        ({"widths": (0.5, 1.5)}, "'widths'"),
        ({"repeats": 0}, "'repeats'"),
        ({"student_init": "zeros"}, "'student_init'"),
        ({"latency_budget_ms": -1.0}, "'latency_budget_ms'"),
        ({"runtimes": ("no-such-runtime",)}, "'runtimes'"),
        ({"speedup": 2.0, "latency_budget_ms": 5.0}, "give one of speedup=2.0 or latency_budget_ms=5.0"),
        (
            {"min_flops_ratio": 0.5},
            r"'min_flops_ratio' must be None or >= 1 \(teacher FLOPs / student FLOPs\)",
        ),
        ({"speedup": float("inf")}, "'speedup' must be None or a finite number > 0"),
        ({"student_factory": "wide"}, "student_factory must be a callable"),
        ({"seed": "x"}, "option 'seed' must be an int >= 0"),
    ],
)
def test_build_student_names_bad_options(options: dict, named: str, monkeypatch) -> None:
    monkeypatch.setattr(distill, "latency_table", _no_measuring)
    with pytest.raises(CompressionError, match=named):
        build_student(tiny_model(), example(), **options)


def test_build_student_refuses_a_teacher_that_is_no_module(monkeypatch) -> None:
    monkeypatch.setattr(distill, "latency_table", _no_measuring)
    with pytest.raises(
        CompressionError, match=r"build_student teacher must be a torch nn\.Module, got str 't'"
    ):
        build_student("t", example(), **FAST)


def test_distillation_loss_refuses_a_teacher_that_is_no_module_and_mismatched_targets() -> None:
    with pytest.raises(
        CompressionError, match=r"DistillationLoss teacher must be a torch nn\.Module or None"
    ):
        DistillationLoss("t")
    kd = DistillationLoss(tiny_model())
    x = example()[0]
    student = tiny_model()
    with pytest.raises(CompressionError, match="targets hold 2 samples, the student's outputs 8"):
        kd(student(x), torch.zeros(2, dtype=torch.long), x)


def _no_measuring(*args, **kwargs):
    raise AssertionError("the latency table must not be measured here")


def test_distillation_loss_is_the_formula_and_leaves_the_teacher_alone() -> None:
    teacher, student = tiny_model(0).train(), tiny_model(1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    kd = DistillationLoss(teacher, temperature=3.0, alpha=0.6)
    assert not teacher.training
    x, y = example()[0], torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    teacher.train()  # e.g. a parent module's .train(): the loss puts it back in eval mode
    out = student(x)
    loss = kd(out, y, x)
    with torch.no_grad():
        t = teacher(x)
    soft = F.kl_div(F.log_softmax(out / 3, 1), F.softmax(t / 3, 1), reduction="batchmean")
    torch.testing.assert_close(loss, 0.6 * 9 * soft + 0.4 * F.cross_entropy(out, y))
    torch.testing.assert_close(kd.from_logits(out, y, t), loss)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # BN stats untouched
    with pytest.raises(CompressionError, match="teacher logits have shape"):
        kd.from_logits(out, y, t[:, :3])
    with pytest.raises(CompressionError, match="no teacher"):
        DistillationLoss(None)(out, y, x)


def _own_loop(student: nn.Module, kd: DistillationLoss, data, epochs: int) -> None:
    """What a user writes: SGD, the KD loss, gradient clipping (seeded as train_loop seeds)."""
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(0)
    student.train()
    for epoch in range(epochs):
        data.set_epoch(epoch)
        for x, y in data:
            optimizer.zero_grad(set_to_none=True)
            kd(student(x), y, x).backward()
            nn.utils.clip_grad_norm_(student.parameters(), 5.0)
            optimizer.step()
    student.eval()


def test_user_loop_reproduces_hakd_exactly() -> None:
    """build_student + DistillationLoss in a hand-written loop give compress("hakd")'s student, bit for bit:
    one implementation. The randomly initialised student learns from the teacher: from chance (4 classes)
    to near the teacher."""
    data = tiny_data(512)
    teacher = trained_teacher(data)
    options = {**FAST, "student_init": "random"}
    student, info = build_student(teacher, example(), **options)
    assert evaluate_accuracy(student, data) < 40.0
    _own_loop(student, DistillationLoss(teacher, temperature=4.0, alpha=0.7), data, epochs=3)
    result = compress("hakd", teacher, example(), data, epochs=3, lr_schedule="constant", **options)
    assert info["chosen"] == result.info["chosen"] == "w0.75"
    for key in ("width_mult", "flops_ratio", "params_ratio", "budget_met"):
        assert info[key] == result.info[key]
    assert same_state(student, result.model)
    assert evaluate_accuracy(teacher, data) >= 90.0 and evaluate_accuracy(student, data) >= 90.0


def test_build_student_in_a_process_group(tmp_path, monkeypatch) -> None:
    """A real gloo group (one process): the choice goes through broadcast_object_list and the weights
    through broadcast; the student is the chosen width on the teacher's device; a DDP-wrapped student
    trains with the loss; an error on rank 0 reaches every rank instead of leaving them waiting."""
    teacher = tiny_model()
    calls = {"objects": 0, "tensors": 0}
    real_objects, real_tensors = dist.broadcast_object_list, dist.broadcast

    def count_objects(*args, **kwargs):
        calls["objects"] += 1
        return real_objects(*args, **kwargs)

    def count_tensors(*args, **kwargs):
        calls["tensors"] += 1
        return real_tensors(*args, **kwargs)

    monkeypatch.setattr(dist, "broadcast_object_list", count_objects)
    monkeypatch.setattr(dist, "broadcast", count_tensors)
    with single_process_group(tmp_path):
        student, info = build_student(teacher, example(), **FAST)
        assert calls["objects"] == 1 and calls["tensors"] == len(student.state_dict())
        assert info["chosen"] == "w0.75" and same_state(student, thinned(teacher, example(), 0.75))
        assert all(p.device == next(teacher.parameters()).device for p in student.parameters())
        before = {k: v.clone() for k, v in student.state_dict().items()}
        ddp = nn.parallel.DistributedDataParallel(student)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
        x, y = next(iter(tiny_data()))
        DistillationLoss(teacher)(ddp(x), y, x).backward()
        optimizer.step()
        assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
        del ddp, optimizer  # a DDP reducer must not outlive its process group (its teardown then hangs)
        monkeypatch.setattr(distill, "latency_table", _no_measuring)  # the floor is checked first
        with pytest.raises(CompressionError, match="min_flops_ratio=1000"):
            build_student(teacher, example(), **FAST, min_flops_ratio=1000.0)
        assert calls["objects"] == 2


def test_other_ranks_build_the_broadcast_choice_without_measuring(monkeypatch) -> None:
    """On a rank other than 0 nothing is measured or built but rank 0's choice."""
    teacher = tiny_model()
    choice = {"chosen": "w0.5", "width_mult": 0.5}
    built = []

    def from_rank0(value):
        assert value is None  # this rank has nothing of its own to send
        return dict(choice)

    monkeypatch.setattr(distill, "rank", lambda: 1)
    monkeypatch.setattr(distill, "latency_table", _no_measuring)
    monkeypatch.setattr(distill, "broadcast_object_from_rank0", from_rank0)
    monkeypatch.setattr(distill, "thinned", lambda *a: built.append(a[2]) or thinned(*a))
    student, info = build_student(teacher, example(), **FAST)
    assert info == choice and built == [0.5]
    assert same_state(student, thinned(teacher, example(), 0.5))


def test_readme_hakd_example_runs(tmp_path) -> None:
    """README "HAKD in your own loop" runs as written: a narrower student, far above chance (25%). Which
    width meets the latency budget is measured, so a loaded machine may choose 0.25 (8 channels from a
    random init learn less in the example's 3 epochs: 0.53 where 0.5 reaches 0.83)."""
    stdout = run_readme_example("### HAKD in your own loop", tmp_path)
    found = re.search(r"w([\d.]+) flops ratio ([\d.]+) accuracy ([\d.]+)", stdout)
    assert found, stdout
    width, flops_ratio, accuracy = map(float, found.groups())
    assert width in (0.5, 0.25) and flops_ratio > 1.5
    assert accuracy > {0.5: 0.6, 0.25: 0.45}[width], stdout


@pytest.mark.slow  # two torchrun processes importing torch, rank 0 exporting and timing three models: ~30 s
def test_two_processes_build_the_same_student(tmp_path) -> None:
    """torchrun, 2 gloo processes with different teachers: rank 0 alone measures; both ranks build rank 0's
    choice with rank 0's weights (its thinned teacher) and stay equal after a DDP distillation step."""
    from tests.compress import ddp_distill

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun is not None
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--nproc_per_node=2", "--master_port", str(free_port())]
    cmd += ["-m", "tests.compress.ddp_distill", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"distill-rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["measured"] for r in ranks] == [1, 0]
    assert ranks[0]["chosen"] == ranks[1]["chosen"] == "w0.75"
    assert (
        ranks[0]["built"] == ranks[1]["built"] == ddp_distill.digest(thinned(tiny_model(0), example(), 0.75))
    )
    assert ranks[0]["stepped"] == ranks[1]["stepped"] != ranks[0]["built"]
