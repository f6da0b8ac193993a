"""report.html: one self-contained, reproducible page with the release's figures and plots.

Everything is inline: CSS in a <style> element, plots as SVG data URIs drawn by matplotlib's Agg/SVG
backend with a fixed `svg.hashsalt` and no date metadata, so the same manifest gives the same bytes.
The page loads nothing from the network (no scripts, no external stylesheets, fonts or images).
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from collections.abc import Callable
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from slimship.pipeline.manifest import LATENCY_HEADERS, latency_rows
from slimship.pipeline.report_profile import draw_layer_profile

log = logging.getLogger(__name__)

_RC = {
    "svg.hashsalt": "slimship-report",
    "svg.fonttype": "none",  # text stays text: smaller, faster, still byte-stable
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
}
_SVG_METADATA = {"Date": None, "Creator": "slimship", "Format": None, "Type": None}
_DENSE_COLOR, _SLIM_COLOR, _EMU_COLOR = "#8c8c8c", "#1f77b4", "#ff7f0e"
_PRIMARY_METRICS = ("top1", "accuracy", "acc", "top5", "f1", "map")

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;
background:#f6f7f9;color:#1d2330}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{margin:0 0 4px;font-size:26px}h2{margin:28px 0 10px;font-size:19px;border-bottom:1px solid #d8dce3;
padding-bottom:4px}.sub{color:#5b6475;margin:0 0 18px}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{background:#fff;border:1px solid #d8dce3;
border-radius:8px;padding:10px 14px;min-width:150px}.card b{display:block;font-size:20px}
.card span{color:#5b6475;font-size:12px}
table{border-collapse:collapse;background:#fff;margin:6px 0 12px;font-size:13px}
th,td{border:1px solid #d8dce3;padding:4px 9px;text-align:left}th{background:#eef1f5}
td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{background:#fff;border:1px solid #d8dce3;border-radius:8px;margin:10px 0;padding:8px}
figure img{max-width:100%;height:auto;display:block}figcaption{color:#5b6475;font-size:12px}
.tag{background:#ffe8cc;color:#8a4b00;border-radius:4px;padding:1px 5px;font-size:11px}
code{background:#eef1f5;padding:1px 4px;border-radius:3px}pre{background:#fff;border:1px solid #d8dce3;
padding:8px;overflow:auto;font-size:12px}
"""


def render_report(manifest: dict[str, Any], extra_plots: dict[str, Any] | None = None) -> str:
    """The report page for a manifest (as written to manifest.json) and optional extra plots."""
    name, version = manifest["name"], manifest["version"]
    sections = [
        _summary(manifest),
        _section("Accuracy", _accuracy_table(manifest["accuracy"])),
        _section("Quality gates", _gates_table(manifest.get("gates"))),
        _section("Accuracy vs latency", _plot_figure("accuracy-latency", _plot_accuracy_latency, manifest)),
        _section("Latency per target", _latency_tables(manifest["latency"])),
        _section(
            "Latency distributions", _plot_figure("latency-distributions", _plot_latency_dists, manifest)
        ),
        _section("Channels kept per layer", _plot_figure("channels", _plot_channels, manifest)),
        _section("Parity", _parity_table(manifest["parity"])),
        _section("Files", _files_table(manifest["files"])),
    ]
    for title in sorted(extra_plots or {}):
        sections.append(_section(title, _extra_plot(title, (extra_plots or {})[title])))
    sections.append(_section("Versions", _kv_table(manifest["versions"])))
    title = html.escape(f"{name} {version}")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{title} - slimship release</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        f'<h1>{title}</h1>\n<p class="sub">slimship release report &middot; source model sha256 '
        f"<code>{html.escape(manifest['model']['source_sha256'][:16])}&hellip;</code></p>\n"
        + "\n".join(s for s in sections if s)
        + "\n</main>\n</body>\n</html>\n"
    )


# ----------------------------------------------------------------------------------------------- tables


def _section(title: str, body: str) -> str:
    return f"<section>\n<h2>{html.escape(title)}</h2>\n{body}\n</section>" if body else ""


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return html.escape(str(value))


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{_fmt(c)}</td>'
            if isinstance(c, int | float) and not isinstance(c, bool)
            else f"<td>{c if isinstance(c, _Raw) else _fmt(c)}</td>"
            for c in row
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class _Raw(str):
    """Already-escaped HTML for a table cell."""


def _summary(manifest: dict[str, Any]) -> str:
    slim = manifest["slimming"]
    cards = []
    for label, before, after in (
        ("parameters", slim.get("params_before"), slim.get("params_after")),
        ("FLOPs", slim.get("flops_before"), slim.get("flops_after")),
    ):
        if before and after is not None:
            cards.append((f"{after / before:.1%}", f"{label} kept ({_short(after)} of {_short(before)})"))
    for target, entry in sorted(manifest["latency"]["device"].items()):
        if entry.get("speedup") is not None:
            cards.append((f"{entry['speedup']:.2f}&times;", f"speedup on {html.escape(target)}"))
    for target, entry in sorted(manifest["latency"]["emulated"].items()):
        if entry.get("speedup") is not None:
            cards.append((f"{entry['speedup']:.2f}&times;", f"speedup on {html.escape(target)} (emulated)"))
    inputs = ", ".join(f"{t['name']} {_shape(t['shape'])} {t['dtype']}" for t in manifest["model"]["inputs"])
    body = "".join(f'<div class="card"><b>{v}</b><span>{k}</span></div>' for v, k in cards)
    return f'<section class="cards">{body}</section>\n<p>Inputs: <code>{html.escape(inputs)}</code></p>'


def _short(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:g}"


def _shape(shape: list[Any]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _accuracy_table(accuracy: dict[str, dict[str, Any]]) -> str:
    if not accuracy:
        return "<p>No accuracy figures were given.</p>"
    metrics = sorted({m for entry in accuracy.values() for m in entry})
    rows = [[key, *(accuracy[key].get(m) for m in metrics)] for key in sorted(accuracy)]
    return _table(["format / target", *metrics], rows)


def _latency_tables(latency: dict[str, dict[str, dict[str, Any]]]) -> str:
    parts = []
    for kind, note in (
        ("device", "Measured on the target."),
        ("emulated", 'Emulated on the build host: <span class="tag">not device timings</span>.'),
    ):
        entries = latency[kind]
        if not entries:
            continue
        samples = [len(e.get("samples", [])) for _, e in sorted(entries.items())]
        rows = [[*row, n] for row, n in zip(latency_rows(entries), samples, strict=True)]
        headers = [*LATENCY_HEADERS, "samples"]
        parts.append(f"<h3>{kind.capitalize()}</h3><p>{note}</p>" + _table(headers, rows))
    return "\n".join(parts) or "<p>No latency figures were given.</p>"


def _parity_table(parity: dict[str, dict[str, Any]]) -> str:
    rows = [
        [role, e.get("max_abs_diff"), e.get("max_rel_diff"), e["tolerance"]]
        for role, e in sorted(parity.items())
    ]
    return _table(["model file", "max abs diff", "max rel diff", "tolerance (abs)"], rows)


def gate_rows(gates: list[dict[str, Any]]) -> list[list[Any]]:
    """One row per gate result: gate, subject, figure, limit, result (with why, when not evaluated)."""
    return [
        [g["gate"], g.get("subject") or "", g.get("figure"), g.get("limit"),
         g["status"] + (f" ({g['detail']})" if g.get("detail") else "")]
        for g in gates
    ]  # fmt: skip


GATE_HEADERS = ["gate", "subject", "figure", "limit", "result"]


def _gates_table(gates: list[dict[str, Any]] | None) -> str:
    if gates is None:
        return ""
    return _table(GATE_HEADERS, gate_rows(gates)) if gates else "<p>No quality gates were set.</p>"


def _files_table(files: list[dict[str, Any]]) -> str:
    rows = [
        [_Raw(f"<code>{html.escape(f['path'])}</code>"), f["role"], f["bytes"], f["sha256"][:16]]
        for f in files
    ]
    note = "<p>This page and MODEL_CARD.md are listed with their checksums in manifest.json.</p>"
    return _table(["path", "role", "bytes", "sha256 (first 16)"], rows) + note


def _kv_table(values: dict[str, Any]) -> str:
    return _table(["package", "version"], [[k, values[k]] for k in sorted(values)])


# ----------------------------------------------------------------------------------------------- plots


def _plot_figure(
    slug: str, draw: Callable[[Any, dict[str, Any]], str | None], manifest: dict[str, Any]
) -> str:
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(8.0, 4.2))
        try:
            caption = draw(ax, manifest)
            if caption is None:
                return "<p>Nothing to plot: the release has no figures for this.</p>"
            return _figure_html(slug, _svg_bytes(fig), caption)
        finally:
            plt.close(fig)


def _svg_bytes(fig: Any) -> bytes:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="svg", metadata=_SVG_METADATA)
    return buffer.getvalue()


def _figure_html(slug: str, svg: bytes, caption: str, mime: str = "image/svg+xml") -> str:
    data = base64.b64encode(svg).decode("ascii")
    alt = html.escape(caption)
    return (
        f'<figure id="plot-{html.escape(slug)}"><img alt="{alt}" src="data:{mime};base64,{data}">'
        f"<figcaption>{alt}</figcaption></figure>"
    )


def primary_metric(metrics: dict[str, Any]) -> tuple[str, float] | None:
    """The headline metric of an accuracy entry: top1/accuracy/... else the first finite one by name."""
    for name in (*_PRIMARY_METRICS, *sorted(metrics)):
        value = metrics.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return name, float(value)
    return None


def accuracy_latency_points(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """(latency, accuracy) points: each timed variant, and the dense model where its timing is given."""
    accuracy = manifest["accuracy"]
    points = []
    for kind in ("device", "emulated"):
        for target, entry in sorted(manifest["latency"][kind].items()):
            for key, p50, dense in (
                (entry.get("variant"), entry["p50_ms"], False),
                (entry.get("dense_variant"), entry.get("dense_p50_ms"), True),
            ):
                metric = primary_metric(accuracy.get(key, {})) if key else None
                if metric and p50 is not None:
                    points.append(
                        {
                            "label": f"{key} @ {target}",
                            "latency_ms": p50,
                            "metric": metric[0],
                            "value": metric[1],
                            "dense": dense,
                            "emulated": kind == "emulated",
                        }
                    )
    return points


def _plot_accuracy_latency(ax: Any, manifest: dict[str, Any]) -> str | None:
    points = accuracy_latency_points(manifest)
    if not points:
        return None
    for point in points:
        color = _DENSE_COLOR if point["dense"] else _SLIM_COLOR
        marker = "s" if point["dense"] else ("D" if point["emulated"] else "o")
        face = "none" if point["emulated"] else color
        ax.scatter(
            point["latency_ms"], point["value"], s=60, marker=marker, edgecolors=color, facecolors=face
        )
        ax.annotate(
            point["label"],
            (point["latency_ms"], point["value"]),
            textcoords="offset points",
            xytext=(6, 4),
            fontsize=7,
        )
    ax.margins(x=0.2, y=0.2)
    ax.set_xlabel("p50 latency (ms)")
    ax.set_ylabel(", ".join(sorted({p["metric"] for p in points})))
    ax.set_title("Accuracy vs latency (squares: dense, circles: slim, hollow: emulated)")
    return "Accuracy vs median latency for the dense model and each slim variant per target."


def _plot_channels(ax: Any, manifest: dict[str, Any]) -> str | None:
    layers = manifest["slimming"].get("per_layer") or {}
    if not layers:
        return None
    names = list(layers)
    before = [layers[n]["channels_before"] for n in names]
    kept = [layers[n]["channels_kept"] for n in names]
    ys = range(len(names))
    ax.barh(ys, before, color="#d5dbe5", label="before")
    ax.barh(ys, kept, color=_SLIM_COLOR, label="kept")
    for y, (b, k) in enumerate(zip(before, kept)):
        ax.text(max(b, k), y, f" {k}/{b}", va="center", fontsize=7)
    ax.set_yticks(list(ys), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("channels")
    ax.legend(loc="lower right")
    ax.figure.set_size_inches(8.0, max(2.5, 0.28 * len(names) + 1.2))
    return "Output channels per layer before slimming and kept after it."


def _plot_latency_dists(ax: Any, manifest: dict[str, Any]) -> str | None:
    series, labels, colors = [], [], []
    for kind in ("device", "emulated"):
        for target, entry in sorted(manifest["latency"][kind].items()):
            suffix = " (emulated)" if kind == "emulated" else ""
            for key, color, tag in (
                ("dense_samples", _DENSE_COLOR, "dense"),
                ("samples", _SLIM_COLOR, "slim"),
            ):
                values = entry.get(key)
                if values:
                    series.append(values)
                    labels.append(f"{target}\n{tag}{suffix}")
                    colors.append(_EMU_COLOR if kind == "emulated" and tag == "slim" else color)
    if not series:
        return None
    box = ax.boxplot(series, vert=False, patch_artist=True, showfliers=True, whis=(1, 99))
    for patch, color in zip(box["boxes"], colors):
        patch.set_facecolor(color)
        patch.set_alpha(0.6)
    ax.set_yticks(range(1, len(labels) + 1), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("latency per run (ms); whiskers at p1/p99")
    ax.figure.set_size_inches(8.0, max(2.5, 0.45 * len(series) + 1.2))
    return "Per-run latency distributions per target (dense and slim); emulated targets in orange."


def _extra_plot(title: str, spec: Any) -> str:
    """An extra plot: PNG bytes, SVG text, or {"series": {label: {"x": [...], "y": [...]}}, "xlabel", ...}."""
    slug = "extra-" + "".join(c if c.isalnum() else "-" for c in title.lower())
    if isinstance(spec, bytes | bytearray):
        return _figure_html(slug, bytes(spec), title, mime="image/png")
    if isinstance(spec, str):
        return _figure_html(slug, spec.encode("utf-8"), title)
    if not isinstance(spec, dict):
        raise TypeError(f"extra_plots[{title!r}]: expected PNG bytes, SVG text or a dict with 'series'")
    if spec.get("kind") == "barh":
        return _extra_barh(slug, title, spec)
    if spec.get("kind") == "layer-profile":  # dense vs slim per layer (slimship.pipeline.report_profile)
        return _plot_figure(slug, draw_layer_profile, spec)
    series = spec.get("series") or {spec.get("label", title): {"x": spec["x"], "y": spec["y"]}}
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(8.0, 3.8))
        try:
            for label in series:
                ax.plot(series[label]["x"], series[label]["y"], marker="o", markersize=3, label=str(label))
            ax.set_xlabel(str(spec.get("xlabel", "")))
            ax.set_ylabel(str(spec.get("ylabel", "")))
            if len(series) > 1:
                ax.legend()
            return _figure_html(slug, _svg_bytes(fig), str(spec.get("caption", title)))
        finally:
            plt.close(fig)


def _extra_barh(slug: str, title: str, spec: dict[str, Any]) -> str:
    """A horizontal bar chart: {"kind": "barh", "labels": [...], "values": [...], "xlabel": ...}."""
    labels, values = [str(v) for v in spec["labels"]], [float(v) for v in spec["values"]]
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(8.0, max(2.0, 0.28 * len(labels) + 1.0)))
        try:
            ys = list(range(len(labels)))
            ax.barh(ys, values, color=_SLIM_COLOR)
            ax.set_yticks(ys, labels)
            ax.invert_yaxis()
            ax.set_xlabel(str(spec.get("xlabel", "")))
            return _figure_html(slug, _svg_bytes(fig), str(spec.get("caption", title)))
        finally:
            plt.close(fig)
