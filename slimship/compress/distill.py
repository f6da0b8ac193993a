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
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimship.compress.base import (
    Batch,
    CompressResult,
    GroupTensors,
    Training,
    check_choice,
    maybe_accuracy,
    prunable_groups,
    register,
)
from slimship.errors import CompressionError
from slimship.runtimes.registry import RUNTIME_NAMES
from slimship.slimming.api import count_flops, count_params, slim
from slimship.slimming.trace import as_input_tuple

log = logging.getLogger(__name__)

RUNTIMES = RUNTIME_NAMES  # the registry's runtimes (slimship.runtimes.registry)
INITS = ("teacher", "random")


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
    opens, parity checked by the exporter."""
    from slimship.exporters.registry import ExportRequest, format_for_runtime
    from slimship.runtimes.measure import median_latencies_ms
    from slimship.runtimes.targets import Target

    unknown = sorted(set(runtimes) - set(RUNTIMES))
    if unknown:
        raise CompressionError(
            f"runtimes {unknown} are not supported for latency tables; allowed: {sorted(RUNTIMES)}"
        )
    inputs = as_input_tuple(example_inputs)
    arrays = [t.detach().numpy() for t in inputs]
    table: dict[str, dict[str, float]] = {name: {} for name in models}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for runtime in runtimes:
            record = format_for_runtime(runtime)
            paths = []
            for name, model in models.items():
                paths.append(Path(tmp) / record.file_name(f"{name}-{runtime}"))
                record.export(ExportRequest(model.eval(), inputs, inputs, dynamic_batch=False), paths[-1])
            target = Target(f"distill-{runtime}-1t", threads=1, runtime=runtime)
            medians = median_latencies_ms(paths, arrays, target, warmup=warmup, runs=repeats)
            for name, ms in zip(models, medians, strict=True):
                table[name][runtime] = ms
    return table


def distillation_loss(teacher: nn.Module, temperature: float, alpha: float) -> Callable[..., torch.Tensor]:
    """loss(student_logits, targets, inputs) with soft targets from `teacher` (in eval mode)."""
    teacher.eval()

    def loss(out: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = teacher(x)
            t = t[0] if isinstance(t, tuple | list) else t
        soft = F.kl_div(
            F.log_softmax(out / temperature, dim=1),
            F.log_softmax(t / temperature, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        return alpha * temperature**2 * soft + (1 - alpha) * F.cross_entropy(out, y)

    return loss


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


@register("distill")
@register("hakd", training=Training())
def hakd(
    model: nn.Module,
    example_inputs: Any,
    train: Iterable[Batch] | None,
    test: Iterable[Batch] | None = None,
    *,
    training: Training,
    student_factory: Callable[[float], nn.Module] | None = None,
    widths: tuple[float, ...] = (0.75, 0.5, 0.35, 0.25),
    speedup: float | None = 2.0,
    latency_budget_ms: float | None = None,
    min_flops_ratio: float | None = None,
    runtimes: tuple[str, ...] = ("onnxruntime",),
    repeats: int = 30,
    student_init: str = "teacher",
    temperature: float = 4.0,
    alpha: float = 0.7,
    clip_grad: float | None = 5.0,
) -> CompressResult:
    """Pick a student by measured latency under a budget and train it by distillation from `model`."""
    check_choice("student_init", student_init, INITS)
    if not widths:
        raise CompressionError("widths is empty: give at least one width multiplier")
    if latency_budget_ms is None and (speedup is None or speedup <= 0):
        raise CompressionError("give latency_budget_ms or a positive speedup")
    if not 0 <= alpha <= 1 or temperature <= 0:
        raise CompressionError(f"alpha must be in [0, 1] and temperature > 0, got {alpha}, {temperature}")
    if train is None:
        raise CompressionError("hakd trains the student: pass training batches (train=...)")
    inputs = as_input_tuple(example_inputs)
    teacher = copy.deepcopy(model).eval()
    candidates: dict[str, nn.Module] = {}
    for w in sorted(set(widths), reverse=True):
        if student_factory is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(training.seed)
                candidates[f"w{w:g}"] = student_factory(w).eval()
        else:
            candidates[f"w{w:g}"] = thinned(teacher, inputs, w, student_init, training.seed)
    table = latency_table({"teacher": teacher, **candidates}, inputs, tuple(runtimes), repeats)
    primary = runtimes[0]
    teacher_flops, teacher_params = count_flops(teacher, inputs), count_params(teacher)
    rows = []
    for (name, cand), w in zip(candidates.items(), sorted(set(widths), reverse=True), strict=True):
        flops = count_flops(cand, inputs)
        rows.append(
            {
                "name": name,
                "width_mult": w,
                "params": count_params(cand),
                "flops": flops,
                "flops_ratio": teacher_flops / max(flops, 1),
                "latency_ms": table[name],
                "speedup": {rt: table["teacher"][rt] / table[name][rt] for rt in runtimes},
            }
        )
    budget = latency_budget_ms if latency_budget_ms is not None else table["teacher"][primary] / speedup
    chosen, fits = choose_student(rows, budget, primary, min_flops_ratio)
    if not fits:
        log.warning(
            "hakd: no candidate meets %.4g ms on %s; taking the fastest (%s)", budget, primary, chosen["name"]
        )
    student = candidates[chosen["name"]]
    history = training.run(
        student,
        train,
        desc="hakd",
        loss_fn=distillation_loss(teacher, temperature, alpha),
        grad_hook=None
        if clip_grad is None
        else lambda m, e, s: nn.utils.clip_grad_norm_(m.parameters(), clip_grad),
        epoch_hook=lambda m, e, s: {"test_accuracy": a} if (a := maybe_accuracy(m, test)) is not None else {},
    )
    info = {
        "latency_table": [
            {
                "name": "teacher",
                "params": teacher_params,
                "flops": teacher_flops,
                "latency_ms": table["teacher"],
            },
            *rows,
        ],
        "runtimes": list(runtimes),
        "budget_ms": budget,
        "budget_met": fits,
        "chosen": chosen["name"],
        "width_mult": chosen["width_mult"],
        "flops_ratio": chosen["flops_ratio"],
        "params_ratio": teacher_params / max(chosen["params"], 1),
        "teacher_test_accuracy": maybe_accuracy(teacher, test),
        "test_accuracy": maybe_accuracy(student, test),
        "temperature": temperature,
        "alpha": alpha,
        "completed": training.completed(history),
        "latency_median_of": repeats,
    }
    return CompressResult(model=student, method="hakd", history=history, info=info)
