"""Value facts of layers that mix their input channels through a weight (linear, conv, addmm)."""

from __future__ import annotations

import numpy as np
import torch
from torch.fx import Node

from slimship.slimming.facts import DimFacts, FactStore, as_numpy, relabel, row_inverse
from slimship.slimming.graph import unique_ints


def bias_keys(bias: np.ndarray) -> list[np.ndarray]:
    """Key columns for a bias: equal known values are equal; each unknown value is its own."""
    unknown = np.isnan(bias)
    return [np.where(unknown, 0.0, bias), np.where(unknown, np.arange(1, len(bias) + 1), 0.0)]


def computed_weight_out(
    va: FactStore, w: Node, bias: np.ndarray | None, out_ch: int, weight_dim: int = 0
) -> DimFacts:
    """Output-channel facts when the weight is computed in forward (weight standardisation, ...):
    a provably zero row gives its bias, provably equal rows with equal biases give equal channels.
    `weight_dim` is the weight's output dim."""
    facts = va.dim_or_unknown(w, weight_dim, out_ch)
    b = bias if bias is not None else np.zeros(out_ch)
    const = np.where(facts.const == 0, b, np.nan)
    keys = np.stack([facts.cls.astype(np.float64), *bias_keys(b)], axis=1)
    return DimFacts(const, relabel(keys, const))


def mixing_out(
    va: FactStore,
    weight: torch.Tensor,
    bias: np.ndarray | None,
    facts: DimFacts | None,
    exact_const: bool,
) -> DimFacts:
    """Output-channel facts of y_o = sum_i W[o, i] * x_i + b_o (weights may carry kernel dims).

    Zero and equality tests on the weight are exact in its own dtype and run in numpy (much
    faster than torch for these reductions); constant sums are taken in float64 over the rows
    that can be constant.
    """
    out_ch, in_ch = weight.shape[0], weight.shape[1]
    facts = facts if facts is not None else DimFacts.unknown(in_ch)
    w_np = as_numpy(weight).reshape(out_ch, in_ch, -1)
    kernel = w_np.shape[2]
    w2 = w_np.reshape(out_ch, in_ch * kernel)
    zero_np = facts.const == 0
    live = ~zero_np  # zero inputs count as zero weights: their columns never matter
    empty = EmptyRows(w2, kernel)
    b_np = bias if bias is not None else np.zeros(out_ch)
    b = torch.from_numpy(b_np)
    # a row is constant when it has no non-zero weight on an input it cannot treat as a constant
    const_ok = empty(np.isnan(facts.const) if exact_const else live)
    const = np.full(out_ch, np.nan)
    if exact_const:
        # an all-zero row is its bias (+ a zero sum); other constant rows sum their constant inputs
        blank = empty(np.ones(in_ch, dtype=bool))
        const[blank] = b_np[blank] + 0.0
        rows = torch.from_numpy(np.flatnonzero(const_ok & ~blank))
        if len(rows):
            c_in = torch.from_numpy(np.nan_to_num(facts.const))
            zero_in = torch.from_numpy(zero_np)
            w_rows = weight.reshape(out_ch, in_ch, -1).index_select(0, rows).double()
            w_rows = w_rows.masked_fill(zero_in[None, :, None], 0.0)
            const[rows.numpy()] = (b[rows] + (w_rows.sum(dim=2) * c_in[None, :]).sum(dim=1)).numpy()
    else:
        const[const_ok] = b_np[const_ok]
    # equal output channels: same effective weights over the live inputs after summing equal
    # input slices, and the same bias
    labels = np.unique(facts.cls[live], return_inverse=True)[1].reshape(-1)
    if len(unique_ints(labels)) == len(labels):  # no equal inputs: the sum would only permute columns
        blank = empty(live)  # rows with no weight on a live input: all equal
        cols = (
            None if live.all() else (np.flatnonzero(live)[:, None] * kernel + np.arange(kernel)).reshape(-1)
        )
        row_label = np.zeros(out_ch, dtype=np.int64)
        others = np.flatnonzero(~blank)
        row_label[others] = 1 + row_inverse(w2, cols, others)
    else:
        merged = torch.zeros(out_ch, int(labels.max()) + 1, kernel, dtype=torch.float64)
        merged.index_add_(1, torch.from_numpy(labels), torch.from_numpy(w_np[:, live]).double())
        row_label = row_inverse(merged.reshape(out_ch, merged.shape[1] * kernel).numpy())
    keys = np.stack([row_label.astype(np.float64), *bias_keys(b_np)], axis=1)
    return DimFacts(const, relabel(keys, const))


class EmptyRows:
    """Which rows of a weight (O, I*K) have no non-zero entry on a given set of inputs (exact:
    NaN counts as non-zero, as in a direct test)."""

    def __init__(self, w2: np.ndarray, kernel: int) -> None:
        self.kernel = kernel
        self.nonzero = w2 != 0
        self.nonzero_rows: np.ndarray | None = None

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        if inputs.all():
            if self.nonzero_rows is None:
                self.nonzero_rows = self.nonzero.any(axis=1)
            return ~self.nonzero_rows
        if not inputs.any():
            return np.ones(self.nonzero.shape[0], dtype=bool)
        return ~(self.nonzero & np.repeat(inputs, self.kernel)).any(axis=1)
