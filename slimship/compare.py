"""One comparison of reference and candidate outputs, used by every parity and verification check.

NaN and Inf are values, not noise: a NaN must sit where the reference has a NaN, an Inf where the reference
has an Inf of the same sign. Finite entries pass when max|reference - candidate| <= tolerance, with
tolerance = rel_bound * max(1, max|finite reference|) over all the outputs compared. Integer and bool
outputs compare exactly. A different number of outputs, a different shape (beyond size-1 dimensions) or a
float output where the reference is integer (or the reverse) fails with its own reason.

A reference that is itself broken proves nothing: a float reference output with no finite value at all
(every entry NaN or ±Inf, e.g. after a NaN BatchNorm running_var) fails every check that compares against
it, naming the output and its NaN count, whatever the candidate holds. A reference with some NaN or ±Inf
among finite values is compared as values (NaN and ±Inf must sit at the same places); top-1 agreement
never counts a row whose reference holds a NaN (see `exporters.common.top1_agreement`).

This module depends on numpy only (torch tensors are accepted without importing torch), so every layer,
slimming included, may import it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Relative parity bound per precision: max|diff| <= bound * max(1, max|finite reference|).
#: The exporters check their files with these, and `slimship verify` re-checks bundles with them.
REL_BOUNDS: dict[str, float] = {
    "fp32": 1e-4,
    "fp16": 1e-2,
    "int8-dynamic": 1e-1,
    "int8": 4e-1,
}

#: Quantised exports: the bound is also capped at this multiple of max|finite reference| itself, so on
#: outputs far below 1 an int8 file whose error is as large as the outputs fails (the max(1, ...) rule
#: alone would make its bound absolute there). Their top-1 agreement on evaluation data is checked too.
MAGNITUDE_CAPS: dict[str, float | None] = {"fp32": None, "fp16": None, "int8-dynamic": 1.0, "int8": 1.0}

#: Unit roundoff (half the spacing of numbers near 1) per float dtype, by torch/numpy dtype name.
UNIT_ROUNDOFF: dict[str, float] = {
    "float64": 2.0**-53,
    "float32": 2.0**-24,
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
}

#: Multiple of unit roundoff * sqrt(depth) a changed summation order may move the largest output by.
#: Measured on Llama-shaped bf16 decoders with exactly-zero FFN channels removed: 0.4 at depth 59 (120M)
#: and 112 (1.1B) (benchmarks/bench_decoder_slim.py); 2.0 leaves a 5x margin and still catches a removed
#: channel that moves the outputs by more than a few units in their last place.
ROUNDING_SLACK = 2.0


def rounding_bound(dtype: Any, depth: int) -> float:
    """Relative bound on the outputs of a model computed in `dtype` through `depth` chained
    accumulations (matmuls, convolutions, reductions) when only the order of its sums changes:
    ROUNDING_SLACK * unit roundoff * sqrt(depth) (independent roundings add like a random walk).

    Removing an exactly-zero channel or merging equal ones changes only that order: a slim model
    within this bound of its source is exact up to rounding, and a channel that mattered moves the
    outputs by far more at a shallow depth. `dtype` is a name ("bfloat16", "torch.float16") or a dtype.
    """
    name = str(dtype).removeprefix("torch.")
    unit = UNIT_ROUNDOFF.get(name)
    if unit is None:
        raise ValueError(f"no unit roundoff for dtype {name!r} (known: {sorted(UNIT_ROUNDOFF)})")
    return ROUNDING_SLACK * unit * math.sqrt(max(depth, 1))


#: Minimum top-1 agreement with PyTorch on calibration or evaluation data, per precision (the second half
#: of a file's verdict, where such data exist: at export; the release gate measures it again).
TOP1_MINIMUMS: dict[str, float] = {"fp32": 0.99, "fp16": 0.97, "int8-dynamic": 0.90, "int8": 0.85}

#: (reason, (output label, first offending index) or None) of a failed output
Problem = tuple[str, tuple[str, tuple[int, ...]] | None]


@dataclass
class Comparison:
    """Outcome of `compare`: figures, the decision and, when it failed, why and where first.

    `max_abs_diff` is inf when a NaN/Inf does not match or the outputs cannot be compared at all;
    `max_rel_diff` is max_abs_diff / max(1, max|finite reference|); `first_mismatch` is
    (output label, index) of the first offending entry.
    """

    max_abs_diff: float
    max_rel_diff: float
    tolerance: float
    rel_bound: float
    passed: bool
    reason: str = ""
    first_mismatch: tuple[str, tuple[int, ...]] | None = None


def as_array(value: Any) -> np.ndarray:
    """A numpy array from a numpy array, a torch tensor (any dtype, any device) or a number."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor, without importing torch
        tensor = value.detach().cpu()
        if str(tensor.dtype) in ("torch.bfloat16", "torch.float8_e4m3fn", "torch.float8_e5m2"):
            tensor = tensor.float()
        return tensor.resolve_conj().resolve_neg().numpy()
    return np.asarray(value)


def _is_float(a: np.ndarray) -> bool:
    return a.dtype.kind in "fc"


def finite_scale(reference: Sequence[Any], floor: float = 1.0) -> float:
    """max(floor, max|finite entry|) over the float arrays of `reference`."""
    scale = floor
    for ref in map(as_array, reference):
        if _is_float(ref) and ref.size:
            finite = np.abs(ref[np.isfinite(ref)])
            if finite.size:
                scale = max(scale, float(finite.max()))
    return scale


def compare(
    reference: Sequence[Any] | Any,
    candidate: Sequence[Any] | Any,
    rel_bound: float,
    *,
    labels: Sequence[str] | None = None,
    floor: float = 1.0,
    cap: float | None = None,
) -> Comparison:
    """Compare outputs (one array or a sequence of arrays) position by position; see the module doc.

    `floor` is the smallest scale the bound is relative to: 1.0 for exported files (absolute error for
    small outputs), a tiny value for a check that must be relative to the outputs however small. `cap`
    (see MAGNITUDE_CAPS) bounds the tolerance by `cap * max|finite reference|` as well.
    """
    refs, cands = _as_list(reference), _as_list(candidate)
    names = list(labels) if labels is not None else [f"output {i}" for i in range(len(refs))]
    scale = finite_scale(refs, floor)
    tolerance = rel_bound * scale
    if cap is not None:
        tolerance = min(tolerance, cap * finite_scale(refs, 0.0))
    if len(refs) != len(cands):
        reason = f"{len(cands)} outputs where the reference has {len(refs)}"
        return Comparison(math.inf, math.inf, tolerance, rel_bound, False, reason)
    worst = 0.0
    failure: Problem | None = None
    for name, ref, cand in zip(names, refs, cands, strict=True):
        diff, problem = _compare_one(name, as_array(ref), as_array(cand), tolerance)
        worst = max(worst, diff)
        failure = failure or problem
    broken = broken_reference(refs, names)
    if broken is not None:  # named first: the candidate's own mismatch, if any, follows
        worst = math.inf
        failure = (f"{broken}; also {failure[0]}" if failure else broken, failure[1] if failure else None)
    passed = failure is None
    return Comparison(
        max_abs_diff=worst,
        max_rel_diff=worst / scale,
        tolerance=tolerance,
        rel_bound=rel_bound,
        passed=passed,
        reason="" if passed else failure[0],
        first_mismatch=None if passed else failure[1],
    )


#: Why a reference with no finite value cannot be checked against (filled with name, NaN count, size).
BROKEN_REFERENCE = (
    "{name}: the model's own outputs hold {nan:,} NaN values ({size:,} values, none finite) on the check "
    "inputs: nothing can be verified; fix the model (e.g. a NaN in a BatchNorm running_var, a NaN weight "
    "or config value)"
)


def broken_reference(reference: Sequence[Any] | Any, labels: Sequence[str] | None = None) -> str | None:
    """The reason a reference proves nothing (a float output with no finite value), or None if it is sound."""
    refs = _as_list(reference)
    names = list(labels) if labels is not None else [f"output {i}" for i in range(len(refs))]
    for name, value in zip(names, refs, strict=False):
        ref = as_array(value)
        if _is_float(ref) and ref.size and not np.isfinite(ref).any():
            return BROKEN_REFERENCE.format(name=name, nan=int(np.isnan(ref).sum()), size=ref.size)
    return None


def compare_cases(
    reference: Sequence[Sequence[Any]],
    candidate: Sequence[Sequence[Any]],
    case_names: Sequence[str],
    rel_bound: float,
    floor: float = 1.0,
    cap: float | None = None,
) -> Comparison:
    """`compare` over several input cases at once (one scale for all); labels read 'case NAME output I'."""
    refs, cands, labels = [], [], []
    for case, ref_outs, cand_outs in zip(case_names, reference, candidate, strict=True):
        if len(ref_outs) != len(cand_outs):
            reason = f"case {case!r}: {len(cand_outs)} outputs where the reference has {len(ref_outs)}"
            tolerance = rel_bound * finite_scale([a for outs in reference for a in outs], floor)
            return Comparison(math.inf, math.inf, tolerance, rel_bound, False, reason)
        for i, (r, c) in enumerate(zip(ref_outs, cand_outs, strict=True)):
            refs.append(r)
            cands.append(c)
            labels.append(f"case {case!r} output {i}")
    return compare(refs, cands, rel_bound, labels=labels, floor=floor, cap=cap)


def bounds(precision: str) -> tuple[float, float | None]:
    """(relative bound, magnitude cap) of a file of `precision` (a key of REL_BOUNDS)."""
    return REL_BOUNDS[precision], MAGNITUDE_CAPS[precision]


@dataclass
class CaseVerdict:
    """One input case of `judge_cases`: its own figures against its own tolerance."""

    max_abs_diff: float
    max_rel_diff: float
    tolerance: float
    passed: bool
    reason: str = ""


def judge_cases(
    reference: Sequence[Sequence[Any]],
    candidate: Sequence[Sequence[Any]],
    case_names: Sequence[str],
    rel_bound: float,
    cap: float | None = None,
) -> tuple[Comparison, dict[str, CaseVerdict]]:
    """The one verdict on a model file, wherever it is checked (export, release, verify): for a file of
    precision P, `rel_bound`, `cap` = `bounds(P)`.

    Each input case is judged on its own: max|diff| <= rel_bound * max(1, max|finite reference of that
    case|), capped at cap * that maximum. A case's verdict thus
    does not depend on the other cases checked with it, so a file that passed on the release's reference
    inputs at export passes them again in the bundle check. Returns the overall comparison (max|diff| over
    all cases, the tolerance and reason of the case nearest to or past its bound) and each case's figures.
    """
    cases: dict[str, CaseVerdict] = {}
    worst: Comparison | None = None
    worst_ratio = -1.0
    for case, ref_outs, cand_outs in zip(case_names, reference, candidate, strict=True):
        labels = [f"case {case!r} output {i}" for i in range(len(ref_outs))]
        result = compare(list(ref_outs), list(cand_outs), rel_bound, labels=labels, cap=cap)
        if len(ref_outs) != len(cand_outs):
            result.reason = f"case {case!r}: {result.reason}"
        cases[case] = CaseVerdict(result.max_abs_diff, result.max_rel_diff, result.tolerance, result.passed,
                                  result.reason)  # fmt: skip
        ratio = math.inf if not result.passed else result.max_abs_diff / max(result.tolerance, 1e-300)
        if worst is None or ratio > worst_ratio:
            worst, worst_ratio = result, ratio
    if worst is None:
        return Comparison(0.0, 0.0, 0.0, rel_bound, True), cases
    failed = [c for c in cases.values() if not c.passed]
    overall = Comparison(
        max_abs_diff=max(c.max_abs_diff for c in cases.values()),
        max_rel_diff=max(c.max_rel_diff for c in cases.values()),
        tolerance=worst.tolerance,
        rel_bound=rel_bound,
        passed=not failed,
        reason=failed[0].reason if failed else "",
        first_mismatch=worst.first_mismatch,
    )
    return overall, cases


# ------------------------------------------------------------------------------------------ one array


def _as_list(value: Sequence[Any] | Any) -> list[Any]:
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


def _compare_one(
    name: str, ref: np.ndarray, cand: np.ndarray, tolerance: float
) -> tuple[float, Problem | None]:
    """(max abs diff of this output, the first problem or None)."""
    if ref.shape != cand.shape:
        if ref.size != cand.size or _squeezed(ref.shape) != _squeezed(cand.shape):
            return math.inf, (f"{name}: shape {list(cand.shape)}, the reference has {list(ref.shape)}", None)
        cand = cand.reshape(ref.shape)
    if _is_float(ref) != _is_float(cand):
        kinds = f"{cand.dtype.name} where the reference is {ref.dtype.name}"
        return math.inf, (f"{name}: dtype {kinds} (float against integer/bool)", None)
    if ref.size == 0:
        return 0.0, None
    if not _is_float(ref):
        return _compare_exact(name, ref, cand)
    return _compare_float(name, _wide(ref), _wide(cand), tolerance)


def _wide(a: np.ndarray) -> np.ndarray:
    return a.astype(np.complex128 if a.dtype.kind == "c" else np.float64)


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def _compare_exact(name: str, ref: np.ndarray, cand: np.ndarray) -> tuple[float, Problem | None]:
    differ = ref != cand
    if not differ.any():
        return 0.0, None
    diff = float(np.abs(ref.astype(np.float64) - cand.astype(np.float64)).max())
    index = _first(differ)
    return diff, (f"{name}: integer/bool output differs at {int(differ.sum())} positions; first at {index}",
                  (name, index))  # fmt: skip


#: (mask of offending positions, message) per kind of non-finite mismatch; r/c are the two arrays.
_NONFINITE_RULES = (
    (lambda r, c: np.isnan(c) & ~np.isnan(r), "NaN at {n} positions where the reference is a number"),
    (lambda r, c: np.isnan(r) & ~np.isnan(c), "a number at {n} positions where the reference is NaN"),
    (
        lambda r, c: np.isinf(r) & ~np.isnan(c) & (r != c),
        "another value at {n} positions where the reference is ±Inf",
    ),
    (lambda r, c: np.isinf(c) & np.isfinite(r), "Inf at {n} positions where the reference is finite"),
)


def _compare_float(
    name: str, ref: np.ndarray, cand: np.ndarray, tolerance: float
) -> tuple[float, Problem | None]:
    for rule, message in _NONFINITE_RULES:
        mask = rule(ref, cand)
        if mask.any():
            index = _first(mask)
            detail = message.format(n=int(mask.sum()))
            where = f"first at {index} (reference {ref[index]}, got {cand[index]})"
            return math.inf, (f"{name}: {detail}; {where}", (name, index))
    both = np.isfinite(ref) & np.isfinite(cand)
    if not both.any():
        return 0.0, None
    with np.errstate(over="ignore", invalid="ignore"):
        delta = np.where(both, np.abs(ref - cand), 0.0)
    diff = float(delta.max())
    if diff <= tolerance:
        return diff, None
    index = _first(delta > tolerance) if not math.isinf(diff) else _first(delta == diff)
    where = f"first at {index} (reference {ref[index]}, got {cand[index]})"
    return diff, (f"{name}: max|diff| {diff:.3g} > tolerance {tolerance:.3g}; {where}", (name, index))


def _first(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(mask)), mask.shape))
