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
from typing import Any

import numpy as np
import torch
from torch import nn

from slimship.compress.base import (
    Batch,
    CompressResult,
    GroupTensors,
    Training,
    check_choice,
    check_fraction,
    maybe_accuracy,
    prunable_groups,
    register,
    working_copy,
)
from slimship.compress.hspg import space_fractions
from slimship.errors import CompressionError
from slimship.slimming.graph import get_tensor, slice_index

log = logging.getLogger(__name__)

CLUSTERINGS = ("kmeans", "even")


def _kmeans(vectors: np.ndarray, k: int, seed: int) -> list[list[int]]:
    from sklearn.cluster import KMeans

    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(vectors)
    clusters = [sorted(np.flatnonzero(labels == c).tolist()) for c in range(k)]
    return sorted((c for c in clusters if c), key=lambda c: c[0])


def _even(n: int, k: int) -> list[list[int]]:
    return [list(chunk) for chunk in np.array_split(np.arange(n), k) if len(chunk)]


def cluster_space(
    gt: GroupTensors, members: list[int], target: float, method: str, seed: int
) -> list[list[int]]:
    """Clusters (lists of local group indices) of one space; groups of different shapes never mix."""
    by_shape: dict[Any, list[int]] = {}
    for i in members:
        by_shape.setdefault(gt.shape_key(i), []).append(i)
    clusters: list[list[int]] = []
    for same in by_shape.values():
        k = max(1, len(same) - round(target * len(same)))
        if k >= len(same):
            clusters += [[i] for i in same]
            continue
        if method == "kmeans":
            vectors = torch.stack([gt.vector(i) for i in same]).double().numpy()
            local = _kmeans(vectors, k, seed)
        else:
            local = _even(len(same), k)
        clusters += [[same[j] for j in c] for c in local]
    return clusters


@torch.no_grad()
def set_cluster_to_mean(model: nn.Module, gt: GroupTensors, cluster: list[int]) -> None:
    """Every member's producing slices and statistics become the cluster mean (exactly equal)."""
    groups = [gt.groups[i] for i in cluster]
    slots = [g.produce + g.stats for g in groups]
    for parts in zip(*slots, strict=True):
        name, dim = parts[0][0], parts[0][1]
        t = get_tensor(model, name)
        views = [t[slice_index(dim, p[2], t.dim())] for p in parts]
        mean = torch.stack([v.double() for v in views]).mean(0).to(t.dtype)
        for p in parts:
            t[slice_index(dim, p[2], t.dim())] = mean


def cluster_gap(gt: GroupTensors, clusters: list[list[int]]) -> float:
    """Largest distance of a member from its cluster mean, relative to the mean's norm."""
    worst = 0.0
    for c in clusters:
        if len(c) < 2:
            continue
        vectors = torch.stack([gt.vector(i).double() for i in c])
        mean = vectors.mean(0)
        worst = max(worst, float((vectors - mean).norm(dim=1).max()) / max(float(mean.norm()), 1e-12))
    return worst


@register("csgd", training=Training(epochs=20))
def csgd(
    model: nn.Module,
    example_inputs: Any,
    train: Iterable[Batch] | None,
    test: Iterable[Batch] | None = None,
    *,
    training: Training,
    target: float = 0.5,
    space_targets: dict[str, float] | None = None,
    spaces: list[str] | None = None,
    centripetal: float = 0.1,
    clustering: str = "kmeans",
) -> CompressResult:
    """Train with the centripetal update so each space keeps ``1 - target`` of its channels distinct."""
    check_fraction("target", target)
    check_choice("clustering", clustering, CLUSTERINGS)
    if centripetal <= 0:
        raise CompressionError(f"centripetal must be > 0, got {centripetal}")
    if train is None:
        raise CompressionError("csgd trains: pass training batches (train=...)")
    model = working_copy(model)
    found, by_space = prunable_groups(model, example_inputs, spaces)
    order = [i for idx in by_space.values() for i in idx]
    gt = GroupTensors(model, [found.groups[i] for i in order])
    local_spaces: dict[str, list[int]] = {}
    for local, i in enumerate(order):
        local_spaces.setdefault(found.groups[i].space, []).append(local)
    fractions = space_fractions(local_spaces, target, space_targets)
    clusters = [
        c
        for space, members in local_spaces.items()
        for c in cluster_space(gt, members, fractions[space], clustering, training.seed)
    ]
    multi = [c for c in clusters if len(c) > 1]
    log.info("csgd: %d groups in %d clusters (%d with several members)", len(gt), len(clusters), len(multi))

    @torch.no_grad()
    def grad_hook(m: nn.Module, epoch: int, step: int) -> None:
        for c in multi:
            grads = torch.stack([gt.vector(i, grad=True) for i in c])
            values = torch.stack([gt.vector(i) for i in c])
            mean_grad, mean_value = grads.mean(0), values.mean(0)
            for row, i in enumerate(c):
                gt.set_grad(i, mean_grad + centripetal * (values[row] - mean_value))

    def epoch_hook(m: nn.Module, epoch: int, step: int) -> dict[str, Any]:
        record: dict[str, Any] = {"cluster_gap": cluster_gap(gt, multi)}
        acc = maybe_accuracy(m, test)
        if acc is not None:
            record["test_accuracy"] = acc
        return record

    history = training.run(model, train, desc="csgd", grad_hook=grad_hook, epoch_hook=epoch_hook)
    completed = training.completed(history)
    gap = cluster_gap(gt, multi)
    accuracy_before_merge = maybe_accuracy(model, test)
    if completed:
        for c in multi:
            set_cluster_to_mean(model, gt, c)
    info = {
        "target": target,
        "clusters": len(clusters),
        "groups": len(gt),
        "merging": sum(len(c) - 1 for c in multi),
        "cluster_gap_before_merge": gap,
        "test_accuracy_before_merge": accuracy_before_merge,
        "test_accuracy": maybe_accuracy(model, test),
        "completed": completed,
        "clustering": clustering,
        "centripetal": centripetal,
    }
    return CompressResult(model=model, method="csgd", history=history, info=info)
