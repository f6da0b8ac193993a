"""Hardware-aware knowledge distillation (HAKD): pick a student by measured latency, then distil.

1. Candidates: ``student_factory(width_mult)`` for each width in ``widths``; without a factory, the
   teacher itself thinned by the slimming engine (each prunable space keeps ``round(w * n)`` of its
   highest-norm channels, the rest are zeroed and removed by ``slim``), so any architecture the engine
   understands gets a width family with no hand-written code.
2. Latency table: the teacher and every candidate are exported (ONNX and/or TFLite) and timed with the
   runtime runners, 1 thread, in interleaved rounds (teacher, c1, c2, ..., teacher, c1, ...); each
   model's latency is the median of its rounds.
3. Choice: among candidates whose latency on the first runtime fits the budget (``latency_budget_ms``,
   or the teacher's latency / ``speedup``) and whose FLOPs reduction is at least ``min_flops_ratio``,
   the one with the most parameters (the most accurate-looking); none fits -> the fastest, with a
   warning.
4. Training: soft-target distillation, ``alpha * T^2 * KL(student/T || teacher/T) + (1 - alpha) * CE``,
   gradients clipped to norm ``clip_grad`` (the T^2-scaled soft loss makes thin students spiky).

In your own loop: ``student, info = build_student(teacher, example_inputs, ...)`` for steps 1-3 (before
wrapping the student in DDP) and ``kd = DistillationLoss(teacher, ...)`` for step 4 (``kd(out, y, x)`` in
place of the loss). ``compress("hakd", ...)`` is exactly these two pieces and ``train_loop``.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimship.compress.checks import check_callable, check_int, check_module, named
from slimship.compress.device import (
    broadcast_module_from_rank0,
    broadcast_object_from_rank0,
    device_of,
    rank,
    unwrap,
)
from slimship.compress.groups import GroupTensors, prunable_groups
from slimship.compress.registry import CompressResult, register
from slimship.compress.training import Batch, Training, maybe_accuracy
from slimship.errors import CompressionError
from slimship.runtimes.registry import RUNTIME_NAMES
from slimship.slimming.api import count_flops, count_params, slim
from slimship.slimming.trace import as_input_tuple

log = logging.getLogger(__name__)

RUNTIMES = RUNTIME_NAMES  # the registry's runtimes (slimship.runtimes.registry)
INITS = ("teacher", "random")
DEFAULT_SPEEDUP = 2.0  # the budget when neither speedup nor latency_budget_ms is given


@torch.no_grad()
def thinned(
    teacher: nn.Module, example_inputs: Any, width_mult: float, init: str = "teacher", seed: int = 0
) -> nn.Module:
    """A copy of `teacher` whose prunable spaces keep `width_mult` of their channels (physically)."""
    if not 0 < width_mult <= 1:
        raise CompressionError(f"width multiplier must be in (0, 1], got {width_mult}")
    inputs = as_input_tuple(example_inputs)
    model = copy.deepcopy(teacher).eval()
    if width_mult < 1:
        found, by_space = prunable_groups(model, inputs)
        for members in by_space.values():
            gt = GroupTensors(model, [found.groups[i] for i in members])
            keep = max(1, round(width_mult * len(members)))
            order = sorted(range(len(members)), key=lambda k: (-gt.norm(k), k))
            for k in order[keep:]:
                gt.zero(k)
        model = slim(model, inputs).apply_to(model, inputs)
    if init == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for module in model.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
    return model


def check_runtimes(runtimes: tuple[str, ...]) -> tuple[str, ...]:
    """`runtimes` as a tuple if every name is a registry runtime (CompressionError naming the others)."""
    runtimes = tuple(runtimes)
    unknown = sorted(set(runtimes) - set(RUNTIMES))
    if not runtimes or unknown:
        raise CompressionError(
            f"option 'runtimes' must name at least one runtime for the latency table; unknown {unknown}, "
            f"allowed: {sorted(RUNTIMES)}"
        )
    return runtimes


def latency_table(
    models: dict[str, nn.Module],
    example_inputs: Any,
    runtimes: tuple[str, ...] = ("onnxruntime",),
    repeats: int = 30,
    warmup: int = 5,
    workdir: Path | None = None,
) -> dict[str, dict[str, float]]:
    """Median latency (ms, 1 thread) of each model on each runtime, timed in interleaved rounds in one
    runner process (`slimship.runtimes`); each model is exported to the registry's fp32 format the runtime
    opens, parity checked by the exporter. Models off the CPU are exported from a CPU copy."""
    from slimship.exporters.registry import ExportRequest, format_for_runtime
    from slimship.runtimes.measure import median_latencies_ms
    from slimship.runtimes.targets import Target

    runtimes = check_runtimes(runtimes)
    inputs = tuple(t.detach().cpu() for t in as_input_tuple(example_inputs))
    arrays = [t.numpy() for t in inputs]
    table: dict[str, dict[str, float]] = {name: {} for name in models}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for runtime in runtimes:
            record = format_for_runtime(runtime)
            paths = []
            for name, model in models.items():
                host = model if device_of(model).type == "cpu" else copy.deepcopy(unwrap(model)).cpu()
                paths.append(Path(tmp) / record.file_name(f"{name}-{runtime}"))
                record.export(ExportRequest(host.eval(), inputs, inputs, dynamic_batch=False), paths[-1])
            target = Target(f"distill-{runtime}-1t", threads=1, runtime=runtime)
            medians = median_latencies_ms(paths, arrays, target, warmup=warmup, runs=repeats)
            for name, ms in zip(models, medians, strict=True):
                table[name][runtime] = ms
    return table


def check_distillation(temperature: float, alpha: float) -> None:
    """CompressionError naming `temperature` or `alpha` when out of range."""
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not 0 < temperature < math.inf
    ):
        raise named(
            "temperature",
            f"option 'temperature' must be a finite number > 0 (softmax temperature), got {temperature!r}",
        )
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
        raise named(
            "alpha", f"option 'alpha' must be in [0, 1] (weight of the soft-target term), got {alpha!r}"
        )


class DistillationLoss:
    """Soft-target distillation for any loop: ``alpha * T^2 * KL(student/T || teacher/T) + (1 - alpha) * CE``.

        kd = DistillationLoss(teacher, temperature=4.0, alpha=0.7)
        for x, y in loader:
            optimizer.zero_grad()
            kd(student(x), y, x).backward()         # the teacher runs on x: eval mode, no grad
            optimizer.step()
        loss = kd.from_logits(student(x), y, t)     # teacher logits computed elsewhere (cached, offline)

    The teacher stays in eval mode on its own device (inputs are moved there, its logits back to the
    student's); it never sees gradients. A DDP-wrapped student works unchanged: the loss only sees its
    outputs. Give the plain teacher (a wrapper is unwrapped); pass ``teacher=None`` to use only
    :meth:`from_logits`.
    """

    def __init__(self, teacher: nn.Module | None, *, temperature: float = 4.0, alpha: float = 0.7) -> None:
        check_module("DistillationLoss teacher", teacher, optional=True)
        check_distillation(temperature, alpha)
        self.teacher = None if teacher is None else unwrap(teacher).eval()
        self.temperature = float(temperature)
        self.alpha = float(alpha)

    def teacher_logits(self, inputs: Any) -> torch.Tensor:
        """The teacher's logits for `inputs` (a tensor or a tuple of them), on the teacher's device."""
        if self.teacher is None:
            raise CompressionError(
                "this DistillationLoss has no teacher: give its logits with kd.from_logits(out, y, logits)"
            )
        self.teacher.eval()  # a .train() on a module holding the teacher must not switch it
        device = device_of(self.teacher)
        with torch.no_grad():
            out = self.teacher(*(t.to(device) for t in as_input_tuple(inputs)))
        return out[0] if isinstance(out, tuple | list) else out

    def __call__(self, outputs: Any, targets: torch.Tensor, inputs: Any) -> torch.Tensor:
        """The loss of the student's `outputs` on `targets`, soft targets from the teacher on `inputs`."""
        return self.from_logits(outputs, targets, self.teacher_logits(inputs))

    def from_logits(self, outputs: Any, targets: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """The loss with the teacher's logits given (detached and moved to the student's device)."""
        out = outputs[0] if isinstance(outputs, tuple | list) else outputs
        t = teacher_logits.detach().to(out.device)
        if isinstance(targets, torch.Tensor) and targets.shape[:1] != out.shape[:1]:
            raise CompressionError(
                f"targets hold {len(targets)} samples, the student's outputs {len(out)}: give the labels "
                "of the batch the student ran on"
            )
        if t.shape != out.shape:
            raise CompressionError(
                f"teacher logits have shape {tuple(t.shape)}, the student's {tuple(out.shape)}: "
                "teacher and student must predict the same classes"
            )
        temp = self.temperature
        soft = F.kl_div(
            F.log_softmax(out / temp, dim=1),
            F.log_softmax(t / temp, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        return self.alpha * temp**2 * soft + (1 - self.alpha) * F.cross_entropy(out, targets)


def choose_student(
    rows: list[dict[str, Any]], budget_ms: float, runtime: str, min_flops_ratio: float | None
) -> tuple[dict[str, Any], bool]:
    """The candidate with the most parameters under the budget; else the fastest (second value False).

    `min_flops_ratio` is a hard floor: candidates below it are never chosen, not even as the fallback
    (CompressionError when none reaches it).
    """
    allowed = [r for r in rows if min_flops_ratio is None or r["flops_ratio"] >= min_flops_ratio]
    if not allowed:
        best = max(r["flops_ratio"] for r in rows)
        raise CompressionError(
            f"no student width reaches min_flops_ratio={min_flops_ratio} (best {best:.2f}x); "
            "add narrower widths or lower min_flops_ratio"
        )
    fits = [r for r in allowed if r["latency_ms"][runtime] <= budget_ms]
    if fits:
        return max(fits, key=lambda r: (r["params"], -r["latency_ms"][runtime])), True
    return min(allowed, key=lambda r: (r["latency_ms"][runtime], r["params"])), False


#: student-builder options: name -> (valid, what the option must be)
STUDENT_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "widths": (
        lambda v: len(v) > 0 and all(0 < w <= 1 for w in v),
        "a non-empty list of multipliers in (0, 1]",
    ),
    "speedup": (lambda v: v is None or 0 < v < math.inf, "None or a finite number > 0"),
    "latency_budget_ms": (
        lambda v: v is None or 0 < v < math.inf,
        "None or a finite number > 0 (milliseconds)",
    ),
    "min_flops_ratio": (lambda v: v is None or v >= 1, "None or >= 1 (teacher FLOPs / student FLOPs)"),
    "repeats": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "student_init": (lambda v: v in INITS, f"one of {INITS}"),
}


def check_student_options(**options: Any) -> None:
    """CompressionError naming the first student-builder option outside its rule."""
    for name, value in options.items():
        valid, what = STUDENT_RULES[name]
        try:
            ok = bool(valid(value))
        except TypeError:
            ok = False
        if not ok:
            raise named(name, f"option {name!r} must be {what}, got {value!r}")
    if options.get("latency_budget_ms") is not None and options.get("speedup") is not None:
        raise CompressionError(
            f"give one of speedup={options['speedup']!r} or "
            f"latency_budget_ms={options['latency_budget_ms']!r}, not both "
            f"(neither: speedup {DEFAULT_SPEEDUP:g})"
        )


def width_name(width_mult: float) -> str:
    """The latency-table name of the candidate of `width_mult` (``w0.5``)."""
    return f"w{width_mult:g}"


def candidate(
    teacher: nn.Module,
    inputs: tuple[Any, ...],
    width_mult: float,
    student_factory: Callable[[float], nn.Module] | None,
    init: str,
    seed: int,
) -> nn.Module:
    """The student of `width_mult` (from `student_factory`, seeded, or the thinned teacher), in eval mode."""
    if student_factory is None:
        return thinned(teacher, inputs, width_mult, init, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return student_factory(width_mult).eval()


def measure_and_choose(
    teacher: nn.Module,
    inputs: tuple[Any, ...],
    candidates: dict[float, nn.Module],
    *,
    budget_ms: float | None,
    speedup: float | None,
    min_flops_ratio: float | None,
    runtimes: tuple[str, ...],
    repeats: int,
) -> dict[str, Any]:
    """Latency table of the teacher and `candidates` (width -> model) and the student chosen from it."""
    teacher_flops, teacher_params = count_flops(teacher, inputs), count_params(teacher)
    rows = []
    for w, cand in candidates.items():
        flops = count_flops(cand, inputs)
        rows.append(
            {
                "name": width_name(w),
                "width_mult": w,
                "params": count_params(cand),
                "flops": flops,
                "flops_ratio": teacher_flops / max(flops, 1),  # x fewer FLOPs, as slim's flops_ratio
            }
        )
    if min_flops_ratio is not None:  # fail before the (slow) measurement when no width can be chosen
        choose_student([{**r, "latency_ms": {"-": 0.0}} for r in rows], 0.0, "-", min_flops_ratio)
    named = {width_name(w): m for w, m in candidates.items()}
    table = latency_table({"teacher": teacher, **named}, inputs, runtimes, repeats)
    primary = runtimes[0]
    for row in rows:
        row["latency_ms"] = table[row["name"]]
        row["speedup"] = {rt: table["teacher"][rt] / table[row["name"]][rt] for rt in runtimes}
    budget = budget_ms if budget_ms is not None else table["teacher"][primary] / speedup
    chosen, fits = choose_student(rows, budget, primary, min_flops_ratio)
    if not fits:
        log.warning(
            "hakd: no candidate meets %.4g ms on %s; taking the fastest (%s)", budget, primary, chosen["name"]
        )
    teacher_row = {
        "name": "teacher",
        "params": teacher_params,
        "flops": teacher_flops,
        "latency_ms": table["teacher"],
    }
    return {
        "latency_table": [teacher_row, *rows],
        "runtimes": list(runtimes),
        "budget_ms": budget,
        "budget_met": fits,
        "chosen": chosen["name"],
        "width_mult": chosen["width_mult"],
        "flops_ratio": chosen["flops_ratio"],
        "params_ratio": teacher_params / max(chosen["params"], 1),
        "latency_median_of": repeats,
    }


def build_student(
    teacher: nn.Module,
    example_inputs: Any,
    *,
    widths: tuple[float, ...] = (0.75, 0.5, 0.35, 0.25),
    speedup: float | None = None,
    latency_budget_ms: float | None = None,
    min_flops_ratio: float | None = None,
    runtimes: tuple[str, ...] = ("onnxruntime",),
    repeats: int = 30,
    student_factory: Callable[[float], nn.Module] | None = None,
    student_init: str = "teacher",
    seed: int = 0,
) -> tuple[nn.Module, dict[str, Any]]:
    """The student HAKD trains, chosen by measured latency; call it before your loop (and before DDP).

    Candidates are ``student_factory(w)`` (seeded with `seed`) or the teacher thinned to each width in
    `widths`; each is timed with the teacher on `runtimes` and the widest one whose latency on the first
    runtime fits ``latency_budget_ms`` (or the teacher's latency / `speedup`; give one of the two, neither
    means ``speedup=2``) is chosen (see :func:`choose_student`). Returns ``(student, info)``: the student
    on the teacher's device in eval mode, and the latency table and choice.

    Under torchrun only rank 0 builds the candidates and measures; the choice is broadcast and every rank
    builds that student, with rank 0's weights, so all ranks train the same model.
    """
    check_student_options(
        widths=widths,
        speedup=speedup,
        latency_budget_ms=latency_budget_ms,
        min_flops_ratio=min_flops_ratio,
        repeats=repeats,
        student_init=student_init,
    )
    check_module("build_student teacher", teacher)
    check_callable("student_factory", student_factory, "a callable width_mult -> nn.Module", optional=True)
    check_int("seed", seed, 0)
    runtimes = check_runtimes(runtimes)
    if speedup is None and latency_budget_ms is None:
        speedup = DEFAULT_SPEEDUP
    teacher = unwrap(teacher).eval()
    inputs = as_input_tuple(example_inputs)
    candidates: dict[float, nn.Module] = {}
    choice: dict[str, Any] | None = None
    if rank() == 0:
        try:
            for w in sorted(set(widths), reverse=True):
                candidates[w] = candidate(teacher, inputs, w, student_factory, student_init, seed)
            choice = measure_and_choose(
                teacher,
                inputs,
                candidates,
                budget_ms=latency_budget_ms,
                speedup=speedup,
                min_flops_ratio=min_flops_ratio,
                runtimes=runtimes,
                repeats=repeats,
            )
        except CompressionError as exc:  # every rank raises it, none waits for rank 0
            choice = {"error": str(exc)}
    choice = broadcast_object_from_rank0(choice)
    if "error" in choice:
        raise CompressionError(choice["error"])
    width = choice["width_mult"]
    if width in candidates:
        student = candidates[width]
    else:  # a rank other than 0 builds only the chosen width
        student = candidate(teacher, inputs, width, student_factory, student_init, seed)
    student = broadcast_module_from_rank0(student.to(device_of(teacher)))
    return student.eval(), choice


@dataclass(frozen=True)
class HakdOptions:
    """The options of :func:`hakd` (see its documentation); ``hakd(..., options=HakdOptions(...))``."""

    student_factory: Callable[[float], nn.Module] | None = None
    widths: tuple[float, ...] = (0.75, 0.5, 0.35, 0.25)
    speedup: float | None = None
    latency_budget_ms: float | None = None
    min_flops_ratio: float | None = None
    runtimes: tuple[str, ...] = ("onnxruntime",)
    repeats: int = 30
    student_init: str = "teacher"
    temperature: float = 4.0
    alpha: float = 0.7
    clip_grad: float | None = 5.0

    def check(self) -> None:
        """The rules of the student builder and the distillation loss (at config check and when hakd runs)."""
        check_student_options(
            widths=self.widths,
            speedup=self.speedup,
            latency_budget_ms=self.latency_budget_ms,
            min_flops_ratio=self.min_flops_ratio,
            repeats=self.repeats,
            student_init=self.student_init,
        )
        check_distillation(self.temperature, self.alpha)


@register("distill")
@register("hakd", training=Training(), options=HakdOptions)
def hakd(
    model: nn.Module,
    example_inputs: Any,
    train: Iterable[Batch] | None,
    test: Iterable[Batch] | None = None,
    *,
    training: Training,
    options: HakdOptions,
) -> CompressResult:
    """Pick a student by measured latency under a budget and train it by distillation from `model`.

    Exactly :func:`build_student` then a loop with :class:`DistillationLoss` (what a user loop does).
    """
    if train is None:
        raise CompressionError("hakd trains the student: pass training batches (train=...)")
    kd = DistillationLoss(copy.deepcopy(model), temperature=options.temperature, alpha=options.alpha)
    student, choice = build_student(
        kd.teacher,
        example_inputs,
        widths=options.widths,
        speedup=options.speedup,
        latency_budget_ms=options.latency_budget_ms,
        min_flops_ratio=options.min_flops_ratio,
        runtimes=options.runtimes,
        repeats=options.repeats,
        student_factory=options.student_factory,
        student_init=options.student_init,
        seed=training.seed,
    )
    history = training.run(
        student,
        train,
        desc="hakd",
        loss_fn=kd,
        grad_hook=None
        if options.clip_grad is None
        else lambda m, e, s: nn.utils.clip_grad_norm_(m.parameters(), options.clip_grad),
        epoch_hook=lambda m, e, s: {"test_accuracy": a} if (a := maybe_accuracy(m, test)) is not None else {},
    )
    info = {
        **choice,
        "teacher_test_accuracy": maybe_accuracy(kd.teacher, test),
        "test_accuracy": maybe_accuracy(student, test),
        "temperature": options.temperature,
        "alpha": options.alpha,
        "completed": training.completed(history),
    }
    return CompressResult(model=student, method="hakd", history=history, info=info)
