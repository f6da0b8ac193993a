"""Centripetal SGD: make the filters of each channel space collapse into clusters of identical ones.

Each prunable space's groups are clustered (k-means on their producing parameter vectors, or an even
split of the channel order) into ``n - round(target * n)`` clusters. Training then replaces the
gradient of every cluster member by the cluster's mean gradient plus a centripetal term
``centripetal * (x_i - mean(x))``: the members follow the same loss gradient while their differences
decay geometrically. At the end each cluster is set exactly to its mean, batch-norm statistics
included, so ``slim`` merges the members (summing their consumer columns) with the outputs unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from slimship.compress.checks import check_choice, check_number
from slimship.compress.device import broadcast_from_rank0
from slimship.compress.registry import CompressResult, register
from slimship.compress.shards import sum_over_shards
from slimship.compress.sparsifier import (
    Sparsifier,
    TargetOptions,
    register_sparsifier,
    steps_per_epoch,
    train_with,
)
from slimship.compress.training import Batch, Training, maybe_accuracy, working_copy
from slimship.compress.views import Block, Slot

log = logging.getLogger(__name__)

CLUSTERINGS = ("kmeans", "even")


def kmeans_labels(vectors: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Cluster label of each row of `vectors` (k-means, `seed` fixes the initialisation)."""
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(vectors)


def even_labels(n: int, k: int) -> np.ndarray:
    """`n` rows in `k` runs of consecutive rows of (almost) equal length."""
    return np.concatenate([np.full(len(c), j) for j, c in enumerate(np.array_split(np.arange(n), k))])


def check_centripetal(centripetal: float, clustering: str) -> None:
    """CSGD's own options: centripetal > 0 and a known clustering."""
    check_choice("clustering", clustering, CLUSTERINGS)
    check_number("centripetal", centripetal, low_open=True)


@register_sparsifier("csgd")
class CSGD(Sparsifier):
    """Centripetal SGD: each cluster follows its mean gradient while its members' differences decay."""

    state_keys = ("merged", "labels")

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        *,
        total_steps: int,
        target: float = 0.5,
        space_targets: dict[str, float] | None = None,
        spaces: list[str] | None = None,
        seed: int = 0,
        centripetal: float = 0.1,
        clustering: str = "kmeans",
        merge_at_end: bool = True,
    ) -> None:
        check_centripetal(centripetal, clustering)
        super().__init__(
            model,
            example_inputs,
            total_steps=total_steps,
            target=target,
            space_targets=space_targets,
            spaces=spaces,
            seed=seed,
        )
        self.centripetal, self.clustering, self.merge_at_end = centripetal, clustering, merge_at_end
        self.labels = [self.cluster(b) for b in self.views]
        self.merged = False
        self.count_members()
        log.info("csgd: %d groups in %d clusters", len(self.groups), sum(self.k))

    def count_members(self) -> None:
        """Clusters per block and members per cluster, from the labels."""
        self.k = [int(labels.max()) + 1 for labels in self.labels]
        counts = [
            torch.bincount(labels, minlength=k)[:, None]
            for labels, k in zip(self.labels, self.k, strict=True)
        ]
        #: dtype -> members per cluster of each block, [clusters, 1] (made once per dtype, not per step)
        self.counts = {
            d: [c.to(d) for c in counts] for d in {self.views.dtype, *(s.tensor.dtype for s in self.params())}
        }

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "centripetal": self.centripetal,
            "clustering": self.clustering,
            "merge_at_end": self.merge_at_end,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.count_members()

    def cluster(self, block: Block) -> torch.Tensor:
        """Cluster label of each row of `block` (identical on every rank: rank 0's are broadcast)."""
        n = len(block)
        k = max(1, n - round(self.fractions[block.space] * n))
        if k >= n:
            labels = np.arange(n)
        elif self.clustering == "kmeans":
            labels = kmeans_labels(block.matrix().double().cpu().numpy(), k, self.seed)
        else:
            labels = even_labels(n, k)
        _, dense = np.unique(labels, return_inverse=True)
        return broadcast_from_rank0(torch.as_tensor(dense, dtype=torch.long, device=self.device))

    def means(self, i: int, values: torch.Tensor, slot: Slot, exact: bool = False) -> torch.Tensor:
        """Each row of `slot`'s `values` replaced by its cluster's mean row (in the score dtype when `exact`,
        for the merge). Under FSDP a slot split along the groups' dim holds each row on one rank: the
        cluster sums are added over the ranks."""
        dtype = self.views.dtype if exact else values.dtype
        sums = values.new_zeros((self.k[i], values.shape[1]), dtype=dtype)
        sums.index_add_(0, self.labels[i], values.to(dtype))
        if slot.split:
            sum_over_shards(sums, self.views.group)
        sums /= self.counts[dtype][i]
        return sums.index_select(0, self.labels[i])  # (indexing with [] is several times slower on CPU)

    def on_backward(self) -> None:
        for i, block in enumerate(self.views):
            if self.k[i] == len(block):
                continue
            for s in block.params:  # column by column, so one parameter at a time: no concatenation
                if s.tensor.grad is None:
                    s.tensor.grad = torch.zeros_like(s.tensor)
                x, g = s.read(), s.read(s.tensor.grad)
                # mean(g) + c (x - mean(x)), with one cluster mean since the mean is linear
                cx = self.centripetal * x
                if s.viewed:  # g is a view of the gradient: add straight into it
                    torch.add(self.means(i, g - cx, s), cx, out=g)
                else:
                    s.write(self.means(i, g - cx, s) + cx, s.tensor.grad)

    def params(self) -> list[Slot]:
        """Every producing parameter slot of every block."""
        return [s for b in self.views for s in b.params]

    def on_step(self) -> None:
        if self.merge_at_end and self.step >= self.total_steps - 1:
            self.merge()

    def on_hold(self) -> None:
        """Past the run's end the clusters stay merged (if they were)."""
        if self.merged:
            self.merge()

    def merge(self) -> None:
        """Set every cluster's members (statistics included) exactly to the cluster mean."""
        with torch.no_grad():
            for i, block in enumerate(self.views):
                if self.k[i] < len(block):
                    slots = block.params + block.buffers + block.stats  # the order of block.full()
                    block.set_full(
                        [self.means(i, v, s, exact=True) for v, s in zip(block.full(), slots, strict=True)]
                    )
        self.merged = True

    def gap(self) -> float:
        """Largest distance of a member from its cluster mean, relative to the mean's norm."""
        worst = torch.zeros((), dtype=self.views.dtype, device=self.device)
        for i, block in enumerate(self.views):
            sq = torch.zeros(2, len(block), dtype=self.views.dtype, device=self.device)
            for s in block.params:  # squared distances and mean norms, over the values this rank holds
                x = s.read().to(self.views.dtype)
                mean = self.means(i, x, s, exact=True)
                sq += torch.stack([s.held(x - mean).pow(2).sum(1), s.held(mean).pow(2).sum(1)])
            distance, norm = sum_over_shards(sq, self.views.group).sqrt()
            worst = torch.maximum(worst, (distance / norm.clamp_min(1e-12)).max())
        return float(worst)

    def decisions(self) -> dict[str, Any]:
        clusters = []
        for block, labels, k in zip(self.views, self.labels, self.k, strict=True):
            rows = block.rows.cpu()
            clusters += [sorted(rows[labels.cpu() == c].tolist()) for c in range(k)]
        return {**super().decisions(), "clusters": sorted(c for c in clusters if len(c) > 1)}

    def summary(self) -> dict[str, Any]:
        summary = super().summary()
        for space in summary["spaces"].values():
            space["clustered"] = 0
        for block, k in zip(self.views, self.k, strict=True):
            summary["spaces"][block.space]["clustered"] += len(block) - k
        summary["merged"] = self.merged
        return summary

    def removable(self, spaces: dict[str, dict[str, int]]) -> dict[str, int]:
        """Zero groups, plus once merged every cluster's members but one (``slim`` merges them away)."""
        counts = super().removable(spaces)
        if self.merged:
            for block, k in zip(self.views, self.k, strict=True):
                counts[block.space] += len(block) - k
        return counts


@dataclass(frozen=True)
class CsgdOptions(TargetOptions):
    """The options of :func:`csgd` (see its documentation); ``csgd(..., options=CsgdOptions(...))``."""

    target: float = 0.5
    space_targets: dict[str, float] | None = None
    spaces: list[str] | None = None
    centripetal: float = 0.1
    clustering: str = "kmeans"

    def check(self) -> None:
        super().check()
        check_centripetal(self.centripetal, self.clustering)


@register("csgd", training=Training(epochs=20), options=CsgdOptions)
def csgd(
    model: nn.Module,
    example_inputs: Any,
    train: Iterable[Batch] | None,
    test: Iterable[Batch] | None = None,
    *,
    training: Training,
    options: CsgdOptions,
) -> CompressResult:
    """Train with the centripetal update so each space keeps ``1 - target`` of its channels distinct."""
    model = working_copy(model)
    n = steps_per_epoch(train)
    sp = CSGD(
        model,
        example_inputs,
        total_steps=max(training.epochs * n, 1),
        target=options.target,
        space_targets=options.space_targets,
        spaces=options.spaces,
        seed=training.seed,
        centripetal=options.centripetal,
        clustering=options.clustering,
        merge_at_end=False,
    )
    history = train_with(sp, model, train, test, training, epoch_record=lambda: {"cluster_gap": sp.gap()})
    completed = training.completed(history)
    gap = sp.gap()
    accuracy_before_merge = maybe_accuracy(model, test)
    if completed:
        sp.merge()
    merging = sum(len(b) - k for b, k in zip(sp.views, sp.k, strict=True))
    info = {
        "target": options.target,
        "clusters": sum(sp.k),
        "groups": len(sp.groups),
        "merging": merging,
        "removable": sp.summary()["removable"],
        "cluster_gap_before_merge": gap,
        "test_accuracy_before_merge": accuracy_before_merge,
        "test_accuracy": maybe_accuracy(model, test),
        "completed": completed,
        "clustering": options.clustering,
        "centripetal": options.centripetal,
    }
    return CompressResult(model=model, method="csgd", history=history, info=info)
