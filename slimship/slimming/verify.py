"""Verification: a slim model's outputs against its source's, computed once before the rewrite.

The reference outputs are taken on the example inputs and a few random inputs of the same shapes
before anything is rewritten, so that no second model is held to compare against. The bound is
relative to the outputs (`slimship.compare`), never below the rounding a changed summation order
can cause in the model's own dtype at its accumulation depth (`compare.rounding_bound`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from slimship.compare import UNIT_ROUNDOFF, broken_reference, compare, rounding_bound
from slimship.errors import VerificationError
from slimship.slimming.graph import ChannelGraph

VERIFY_SCALE_FLOOR = 1e-8  # slimming is exact: its bound is relative to the outputs, not to max(1, ...)


@dataclass
class Verification:
    max_abs_diff: float
    max_rel_diff: float
    tolerance: float
    inputs_checked: int
    passed: bool
    reason: str = ""  # why it failed: batch, output, kind of mismatch, first index
    error: str | None = None  # the slim model failed to run (a failed verification, like a mismatch)


@dataclass
class Reference:
    """Input batches (the example first) and the source model's flat outputs on each."""

    batches: list[tuple[Any, ...]]
    outputs: list[list[torch.Tensor]]
    flops: int  # of one forward on the example inputs
    merged: bool = False  # the random batches ran as one forward (see run_batches)


def random_like_inputs(inputs: tuple[Any, ...], generator: torch.Generator) -> tuple[Any, ...]:
    """Fresh inputs of the same shapes: floats ~ N(mean, std) of the example, ints in its range."""
    out = []
    for x in inputs:
        if not isinstance(x, torch.Tensor):
            out.append(x)
        elif x.is_floating_point():
            std = float(x.std()) if x.numel() > 1 else 1.0
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
            out.append(noise * (std or 1.0) + float(x.mean()))
        elif x.dtype == torch.bool:
            out.append(x.clone())
        else:
            lo, hi = int(x.min()), int(x.max())
            out.append(torch.randint(lo, hi + 1, x.shape, generator=generator, dtype=x.dtype))
    return tuple(out)


def flat_outputs(value: Any) -> list[torch.Tensor]:
    """Every tensor of a model's output (tensors, sequences, dicts, ModelOutput-like `to_tuple`)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for v in value for t in flat_outputs(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in flat_outputs(v)]
    if hasattr(value, "to_tuple"):
        return flat_outputs(value.to_tuple())
    return []


def input_batches(example_inputs: tuple[Any, ...], n_random: int, seed: int) -> list[tuple[Any, ...]]:
    generator = torch.Generator().manual_seed(seed)
    return [example_inputs] + [random_like_inputs(example_inputs, generator) for _ in range(n_random)]


@torch.no_grad()
def run_batches(
    model: nn.Module, batches: list[tuple[Any, ...]], flops: bool = True, merge: bool = False
) -> tuple[list[list[torch.Tensor]], int, bool]:
    """Outputs on every batch, the FLOPs of the first (counted by torch.utils.flop_counter), and whether
    the others ran merged.

    With `merge` (a model traced with a free batch dimension), the batches after the first run as one
    forward, concatenated along dim 0, and their outputs are split back; a model whose outputs do not
    split that way (or that refuses the merged batch) runs them one by one.
    """
    counter = FlopCounterMode(display=False)
    with counter if flops else contextlib.nullcontext():
        first = [t.detach() for t in flat_outputs(model(*batches[0]))]
    rest = batches[1:]
    merged = _merged_outputs(model, rest, first) if merge and len(rest) > 1 else None
    if merged is not None:
        return [first, *merged], int(counter.get_total_flops()), True
    others = [[t.detach() for t in flat_outputs(model(*inputs))] for inputs in rest]
    return [first, *others], int(counter.get_total_flops()), False


def _merged_outputs(
    model: nn.Module, batches: list[tuple[Any, ...]], first: list[torch.Tensor]
) -> list[list[torch.Tensor]] | None:
    """Outputs of `batches` from one forward on their concatenation, or None where that is not sound."""
    k = len(batches)
    columns = list(zip(*batches, strict=True))
    if any(isinstance(c[0], torch.Tensor) and c[0].dim() == 0 for c in columns):
        return None
    if any(not isinstance(c[0], torch.Tensor) and any(v is not c[0] for v in c) for c in columns):
        return None
    inputs = tuple(torch.cat(c) if isinstance(c[0], torch.Tensor) else c[0] for c in columns)
    try:
        outputs = [t.detach() for t in flat_outputs(model(*inputs))]
    except Exception:  # a graph that specialised something to the example's batch: one by one
        return None
    fits = len(outputs) == len(first) and all(
        o.dim() > 0 and f.dim() > 0 and o.shape[0] == k * f.shape[0] and o.shape[1:] == f.shape[1:]
        for o, f in zip(outputs, first, strict=True)
    )
    if not fits:
        return None
    return [list(parts) for parts in zip(*(o.chunk(k) for o in outputs), strict=True)]


def reference_outputs(
    model: nn.Module, example_inputs: tuple[Any, ...], n_random: int, seed: int, merge: bool = False
) -> Reference:
    """The source model's outputs on the check batches; raises VerificationError where they hold no finite
    value (nothing could be verified against them)."""
    batches = input_batches(example_inputs, n_random, seed)
    outputs, flops, merged = run_batches(model, batches, merge=merge)
    for n, outs in enumerate(outputs):
        broken = broken_reference(outs)
        if broken is not None:
            batch = "example inputs" if n == 0 else f"random inputs {n}"
            raise VerificationError(f"source model on {batch}: {broken}")
    return Reference(batches, outputs, flops, merged)


def check_batches(
    reference: list[list[torch.Tensor]],
    candidate: list[list[torch.Tensor]],
    rtol: float,
    what: str,
) -> Verification:
    """Per batch, max|diff| <= rtol * max|finite reference| (floored at 1e-8); NaN/Inf in place."""
    worst_abs = worst_rel = 0.0
    reason = ""
    for n, (ref, got) in enumerate(zip(reference, candidate, strict=True)):
        result = compare(ref, got, rtol, floor=VERIFY_SCALE_FLOOR)
        worst_abs, worst_rel = max(worst_abs, result.max_abs_diff), max(worst_rel, result.max_rel_diff)
        if not result.passed and not reason:
            batch = "example inputs" if n == 0 else f"random inputs {n}"
            reason = f"{what} on {batch}: {result.reason}"
    return Verification(worst_abs, worst_rel, rtol, len(reference), not reason, reason)


def check_against(
    reference: Reference,
    candidate: nn.Module,
    rtol: float,
    n_batches: int | None = None,
    what: str = "slim model",
) -> tuple[Verification, int]:
    """Verify `candidate` on the reference's batches (the first `n_batches`); a candidate that fails to
    run is a failed verification, not an exception. Returns it with the candidate's FLOPs (0 if it failed)."""
    # merged random batches cost one forward however many: check them all, batched as the reference was
    batches = reference.batches[:n_batches] if n_batches and not reference.merged else reference.batches
    try:
        outputs, flops, _ = run_batches(candidate, batches, merge=reference.merged)
    except Exception as exc:  # a rewritten graph that does not run is as wrong as a numeric mismatch
        cause = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        return Verification(float("inf"), float("inf"), rtol, 0, False, reason=cause, error=cause), 0
    return check_batches(reference.outputs[: len(batches)], outputs, rtol, what), flops


def verify_outputs(
    reference: nn.Module,
    candidate: nn.Module,
    example_inputs: tuple[Any, ...],
    rtol: float = 1e-5,
    n_random: int = 2,
    seed: int = 0,
    what: str = "slim model",
) -> Verification:
    """Compare outputs on the example inputs and `n_random` random inputs with `slimship.compare`.

    Per batch, max|diff| must be <= rtol * max|finite reference| (relative to the outputs however small,
    floored at 1e-8), NaN/Inf must match in place and sign, integer outputs exactly. Returns the worst
    figures; `passed` is False (with `reason`) on the first batch that fails.
    """
    batches = input_batches(example_inputs, n_random, seed)
    ref, _, _ = run_batches(reference, batches, flops=False)
    got, _, _ = run_batches(candidate, batches, flops=False)
    return check_batches(ref, got, rtol, what)


def check_outputs(
    reference: nn.Module, candidate: nn.Module, example_inputs: tuple[Any, ...], **options: Any
) -> Verification:
    """`verify_outputs`, where a candidate that fails to run (or changes an output's shape) is a
    failed verification instead of an exception."""
    try:
        return verify_outputs(reference, candidate, example_inputs, **options)
    except Exception as exc:  # a rewritten graph that does not run is as wrong as a numeric mismatch
        cause = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        rtol = options.get("rtol", 1e-5)
        return Verification(float("inf"), float("inf"), rtol, 0, False, reason=cause, error=cause)


# ---- the bound --------------------------------------------------------------------------------
def accumulation_depth(g: ChannelGraph) -> int:
    """The most mixing sites (matmuls, convolutions, dot products, sums) on one path through the graph."""
    site_nodes = {site.node for site in g.sites}
    depth: dict[Any, int] = {}
    deepest = 0
    for node in g.gm.graph.nodes:
        below = max((depth.get(i, 0) for i in node.all_input_nodes), default=0)
        depth[node] = below + (node in site_nodes)
        deepest = max(deepest, depth[node])
    return deepest


def lowest_precision(model: nn.Module, reference: Reference) -> str:
    """The float dtype with the largest unit roundoff among the model's tensors and its outputs."""
    dtypes = {str(t.dtype).removeprefix("torch.") for t in [*model.parameters(), *model.buffers()]}
    dtypes |= {str(t.dtype).removeprefix("torch.") for outs in reference.outputs for t in outs}
    known = [d for d in dtypes if d in UNIT_ROUNDOFF] or ["float32"]
    return max(known, key=UNIT_ROUNDOFF.__getitem__)


def verify_bound(rtol: float, dtype: str, depth: int) -> float:
    """The relative bound a slim model is checked with: `rtol`, or the rounding of its dtype at its
    depth where that is larger (bf16 and fp16 models; fp32 keeps `rtol` up to depth ~170 at 1e-5)."""
    return max(rtol, rounding_bound(dtype, depth))
