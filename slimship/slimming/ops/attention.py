"""Attention: query, key and value share heads; the head dim is a site; the softmax scale is held."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from torch.fx import Node

from slimship.slimming.facts import DimFacts, Facts, FactStore, relabel
from slimship.slimming.graph import (
    DOT,
    ChannelGraph,
    Site,
    shape_of,
)
from slimship.slimming.ops.common import (
    new_size,
    no_facts,
    pin_unknown,
    rank_of,
)
from slimship.slimming.ops.record import register_op


def sdpa(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    q, k, v = a["query"], a["key"], a["value"]
    ql, kl, vl = g.layout(q), g.layout(k), g.layout(v)
    if a.get("enable_gqa") or shape_of(q)[:-2] != shape_of(k)[:-2]:
        return pin_unknown(g, node, f"attention {node.name} with grouped/broadcast heads")
    for d in range(len(ql) - 2):
        g.unify(ql[d], kl[d], "attention heads")
        g.unify(ql[d], vl[d], "attention heads")
    g.unify(kl[-2], vl[-2], "attention keys")
    g.pin(kl[-2], "attention key positions")
    g.unify(ql[-1], kl[-1], "attention head dim")
    g.sites.append(Site(node, DOT, [(q, len(ql) - 1), (k, len(kl) - 1)]))
    mask = a.get("attn_mask")
    if mask is not None:
        _attention_mask(g, node, mask, [*ql[:-1], kl[-2]])
    g.layouts[node] = list(ql[:-1]) + [vl[-1]]


def _attention_mask(g: ChannelGraph, node: Node, mask: Node, scores: list[np.ndarray | None]) -> None:
    """The mask broadcasts against the scores (batch..., heads, queries, keys): a dim it does not
    broadcast shares the scores' positions (CoAtNet's per-head relative-position bias removes a head
    with the head); its query and key dims stay."""
    ml, m_shape = g.layout(mask), shape_of(mask)
    for md in range(len(ml)):
        d = len(scores) - len(ml) + md
        if d >= len(scores) - 2 or d < 0:
            g.pin(ml[md], f"attention mask of {node.name}")
        elif m_shape[md] == 1 and (scores[d] is None or len(scores[d]) != 1):
            g.pin(ml[md], f"attention mask of {node.name} broadcasts this dim")
        else:
            g.unify(scores[d], ml[md], f"attention mask of {node.name}")


def sdpa_values(va: FactStore, node: Node, a: dict[str, Any]) -> Facts:
    q, k, v = a["query"], a["key"], a["value"]
    rank = rank_of(node)
    out = no_facts(node)
    vf = va.dim(v, rank - 1)
    if vf is not None:
        out[rank - 1] = DimFacts(np.where(vf.const == 0, 0.0, np.nan), vf.cls)
    for d in range(rank - 2):
        if va.live(node, d):
            n = shape_of(node)[d]
            parts = [va.dim_or_unknown(t, d, n) for t in (q, k, v)]
            const = np.where(parts[2].const == 0, 0.0, np.nan)
            out[d] = DimFacts(const, relabel(np.stack([p.cls for p in parts], axis=1), const))
    return out


def attention_scale(g: ChannelGraph, keep: np.ndarray, node: Node, a: dict[str, Any]) -> None:
    """A narrower head dim must not change the softmax scale: pin it to the original value."""
    q = a["query"]
    head_dim = shape_of(q)[-1]
    if a.get("scale") is None and new_size(g, keep, q, len(shape_of(q)) - 1) not in (None, head_dim):
        kwargs = dict(node.kwargs)
        kwargs["scale"] = 1.0 / math.sqrt(head_dim)
        node.kwargs = kwargs


register_op("aten.scaled_dot_product_attention", coupling=sdpa, values=sdpa_values, sizes=attention_scale)
