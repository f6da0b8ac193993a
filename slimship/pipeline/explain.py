"""Sentences and figures the model card and the report share: the accuracy headline, what each parity
tolerance means, what a target is, where int8 calibration data came from.

Everything is read from the manifest (and slimship's own tables of bounds and built-in targets), so the
model card and report say the same thing in the same words.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from slimship.compare import MAGNITUDE_CAPS, REL_BOUNDS
from slimship.pipeline.records import TargetRecord

#: accuracy drop (percentage points, slim vs dense) past which the headline is shown as a warning
HEADLINE_DROP_PT = 1.0
_PRIMARY_METRICS = ("top1", "accuracy", "acc", "top5", "f1", "map")

#: one sentence per precision: why the bound is what it is (the bound and agreement minimum are filled in)
_TOLERANCE_WHY = {
    "fp32": "float rounding only: the file computes what the slim PyTorch model computes",
    "fp16": "float16 weights keep about three significant digits",
    "int8-dynamic": "int8 weights with float activations move outputs visibly, so the decision is also "
    "taken on the task",
    "int8": "8-bit activations on a small output range can move each output by a large share of that "
    "range, so the real check is the task: top-1 agreement with the slim model on evaluation data",
}


def primary_metric(metrics: dict[str, Any]) -> tuple[str, float] | None:
    """The headline metric of an accuracy entry: top1/accuracy/... else the first finite one by name."""
    for name in (*_PRIMARY_METRICS, *sorted(metrics)):
        value = metrics.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return name, float(value)
    return None


@dataclass(frozen=True)
class Headline:
    """Dense vs slim on the same evaluation data (torch models), in the metric's own unit (top-1 in %)."""

    metric: str
    dense: float
    slim: float
    dense_key: str
    slim_key: str
    gate_failed: bool

    @property
    def drop(self) -> float:
        return self.dense - self.slim

    @property
    def bad(self) -> bool:
        """Shown as a warning: a gate failed or the slim model lost more than HEADLINE_DROP_PT points."""
        return self.gate_failed or self.drop > HEADLINE_DROP_PT

    def text(self) -> str:
        return (
            f"{self.metric} {self.dense:.2f} (dense) -> {self.slim:.2f} (slim): "
            f"{'-' if self.drop > 0 else '+'}{abs(self.drop):.2f} pt"
        )


def accuracy_headline(manifest: dict[str, Any]) -> Headline | None:
    """Dense vs slim: `dense-torch` against `slim-torch` (else the first slim entry with the same metric)."""
    accuracy = manifest["accuracy"]
    dense_key = "dense-torch" if "dense-torch" in accuracy else next(
        (k for k in sorted(accuracy) if k.startswith("dense")), None
    )  # fmt: skip
    dense = primary_metric(accuracy[dense_key]) if dense_key else None
    if dense is None:
        return None
    slim_keys = ["slim-torch", *sorted(k for k in accuracy if k.startswith("slim") and k != "slim-torch")]
    for key in slim_keys:
        value = accuracy.get(key, {}).get(dense[0])
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            failed = any(g.get("status") == "failed" for g in manifest.get("gates") or [])
            return Headline(dense[0], dense[1], float(value), dense_key, key, failed)
    return None


def precision_of(role: str) -> str:
    """The precision of a parity role: a registered format's precision, 'fp32' for pt2 and unknown roles."""
    from slimship.exporters.registry import FORMATS

    record = FORMATS.get(role)
    return record.precision if record is not None else "fp32"


def tolerance_sentences(roles: list[str], figures: dict[str, str] | None = None) -> list[str]:
    """One sentence per precision among `roles`: the bound, what it is relative to (and its magnitude cap),
    why, and (from `figures`: role -> the tolerance as the caller's table prints it) what it came to."""
    from slimship.exporters.tflite_export import PARITY_BOUNDS

    by_precision: dict[str, list[str]] = {}
    for role in sorted(roles):
        by_precision.setdefault(precision_of(role), []).append(role)
    sentences = []
    for precision in REL_BOUNDS:
        if precision not in by_precision:
            continue
        files = ", ".join(by_precision[precision])
        text = (
            f"{precision} ({files}): outputs may differ from the slim PyTorch model by at most "
            f"{REL_BOUNDS[precision]:g} x max(1, largest |reference output|)"
        )
        if MAGNITUDE_CAPS[precision] is not None:
            text += (
                f", and by no more than {MAGNITUDE_CAPS[precision]:g} x largest |reference output| itself "
                "(so on small outputs an error as large as the outputs fails)"
            )
        text += f" ({_TOLERANCE_WHY[precision]})"
        came = [f"{role} {figures[role]}" for role in by_precision[precision] if figures and role in figures]
        if came:
            text += f"; on the stored reference outputs that is {', '.join(came)}"
        if precision.startswith("int8") or precision == "fp16":
            text += (
                f"; and top-1 agreement on evaluation data must be at least {PARITY_BOUNDS[precision][1]:.0%}"
            )
        sentences.append(text + ".")
    return sentences


#: the fields of a target definition, as the report and model card show them
TARGET_FIELDS = ("runtime", "threads", "affinity", "xnnpack", "precision", "transport", "emulated")


def target_definitions(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Target name -> its definition, for every target the latency figures name.

    From the manifest's `targets` when recorded, else slimship's built-in targets; a user target that was
    not recorded maps to {} (unknown here)."""
    from slimship.runtimes.targets import BUILTIN_TARGETS

    recorded = manifest.get("targets") or {}
    names = sorted(
        {e.get("target") or key.split("/", 1)[0] for kind in ("device", "emulated")
         for key, e in manifest["latency"][kind].items()}
    )  # fmt: skip
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        if name in recorded:
            out[name] = recorded[name]
        elif name in BUILTIN_TARGETS:
            out[name] = target_record(BUILTIN_TARGETS[name])
        else:
            out[name] = {}
    return out


def target_record(target: Any) -> TargetRecord:
    """A Target as plain data for the manifest's `targets` (see TARGET_FIELDS)."""
    return {
        "runtime": target.runtime,
        "threads": target.threads,
        "affinity": list(target.affinity),
        "xnnpack": target.xnnpack,
        "precision": target.precision,
        "transport": target.transport,
        "emulated": target.emulated,
        "description": target.description,
    }


def target_sentence(name: str, definition: dict[str, Any]) -> str:
    """`mobile-1t`: 1 thread pinned to core 0, runtime auto (by file), XNNPACK on, this machine, measured."""
    if not definition:
        return f"{name}: a user target whose definition was not recorded in the bundle."
    threads = definition.get("threads")
    affinity = definition.get("affinity") or []
    parts = [
        f"{threads} thread{'s' if threads != 1 else ''}" if threads else "the runtime's default threads",
        f"pinned to core{'s' if len(affinity) > 1 else ''} {', '.join(map(str, affinity))}"
        if affinity else "not pinned",
        f"runtime {definition.get('runtime', 'auto')}"
        + (" (chosen by the file's format)" if definition.get("runtime") == "auto" else ""),
        "XNNPACK delegate on" if definition.get("xnnpack", True) else "XNNPACK delegate off",
        f"{definition.get('precision', 'fp32')} variants",
        "on this machine" if definition.get("transport", "local") == "local"
        else f"via {definition.get('transport')}",
        "emulated: not device timings" if definition.get("emulated") else "measured, not emulated",
    ]  # fmt: skip
    what = f" ({definition['description']})" if definition.get("description") else ""
    return f"{name}{what}: " + ", ".join(parts) + "."


def calibration_sentence(calibration: dict[str, Any] | None, roles: list[str]) -> str | None:
    """Where the int8 calibration data came from; None when the bundle has no calibrated file."""
    calibrated = sorted(r for r in roles if precision_of(r) == "int8")
    if calibration is None:
        return None
    files = f"The int8 files ({', '.join(calibrated)}) were" if calibrated else "int8 variants were"
    count = calibration["samples"]
    text = f"{files} calibrated on {count:,} sample{'s' if count != 1 else ''}: {calibration['source']}."
    if count < 16:
        text += " That is too few to be representative; quantisation ranges may not fit real inputs."
    return text
