"""The report's per-layer chart: dense vs slim kernel time per layer, poor-efficiency layers marked.

The pipeline turns each dense/slim per-layer profile (`slimship.runtimes.measure.layer_profile`) into a
plot spec with `profile_plot` and passes it to the report as an extra plot of kind "layer-profile";
`report.py` draws it with `draw_layer_profile`. Layers are mapped to the slimmed channel spaces their
module produces (`spaces_by_layer`): a space is named after its producer's parameter and dim
("conv1.weight[0]"), so a layer `conv1` owns the spaces "conv1.weight[0]" / "conv1.weight[1]"... only
its output space (dim 0) is listed; layers without weights ("other: Relu") have none.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

MAX_LAYERS = 20  # the chart shows the layers taking the most dense time
_DENSE_COLOR, _SLIM_COLOR, _POOR_COLOR = "#8c8c8c", "#1f77b4", "#d62728"
_SPACE_RE = re.compile(r"^(?P<layer>.+)\.weight\[0\]$")


def spaces_by_layer(spaces: Iterable[Any]) -> dict[str, str]:
    """Layer module path -> "channels before->after" of the output space it produces (slim report)."""
    out = {}
    for space in spaces:
        match = _SPACE_RE.match(space.name)
        if match and space.channels_before > 1:
            out[match["layer"]] = f"{space.channels_before}->{space.channels_after}"
    return out


def profile_plot(profile: dict[str, Any], spaces: dict[str, str] | None = None) -> dict[str, Any]:
    """The extra-plot spec of one profile (rows as in the bench JSON), each row with its space if known."""
    spaces = spaces or {}
    rows = [row | {"channels": spaces.get(row["layer"])} for row in profile["rows"]]
    return {
        "kind": "layer-profile", "runtime": profile.get("runtime"), "dense": profile["dense"],
        "slim": profile["slim"], "where": profile.get("where", ""), "note": profile.get("note", ""),
        "rows": rows,
    }  # fmt: skip


def draw_layer_profile(ax: Any, spec: dict[str, Any]) -> str | None:
    """Grouped horizontal bars (dense grey, slim blue; a poor-efficiency layer's slim bar red), with the
    layer's kept channels in its label. Returns the caption, or None when there is nothing to draw."""
    rows = sorted(spec["rows"], key=lambda r: -r["dense_ms"])[:MAX_LAYERS]
    if not rows:
        return None
    ys = list(range(len(rows)))
    dense = [r["dense_ms"] for r in rows]
    slim = [r["slim_ms"] for r in rows]
    colors = [_POOR_COLOR if r["poor"] else _SLIM_COLOR for r in rows]
    ax.barh([y - 0.2 for y in ys], dense, height=0.4, color=_DENSE_COLOR, label="dense")
    ax.barh([y + 0.2 for y in ys], slim, height=0.4, color=colors, label="slim (red: poor efficiency)")
    ax.set_yticks(ys, [_label(r) for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("kernel time per run (ms)")
    ax.legend(loc="lower right")
    ax.figure.set_size_inches(8.0, max(2.5, 0.32 * len(rows) + 1.2))
    poor = sum(1 for r in spec["rows"] if r["poor"])
    pair = f"{spec['slim']} vs {spec['dense']}"
    return (
        f"Per-layer kernel time, {spec.get('runtime')}, {spec.get('where')}: {pair}; {poor} layer(s) "
        f"whose speedup is under 70% of their FLOPs cut are red. {spec.get('note') or ''}"
    ).strip()


def _label(row: dict[str, Any]) -> str:
    channels = f" [{row['channels']}]" if row.get("channels") else ""
    return f"{row['layer']}{channels}"
