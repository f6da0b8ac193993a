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

from slimship.pipeline.explain import (
    TARGET_FIELDS,
    accuracy_headline,
    calibration_sentence,
    primary_metric,
    target_definitions,
    target_sentence,
    tolerance_sentences,
)
from slimship.pipeline.manifest import LATENCY_HEADERS, entry_speedup_text, latency_rows
from slimship.pipeline.report_profile import draw_layer_profile
from slimship.runtimes.measure import SPEEDUP_DEFINITION

__all__ = ["GATE_HEADERS", "gate_rows", "primary_metric", "render_report"]

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
_FORMAT_COLORS = ("#1f77b4", "#2ca02c", "#9467bd", "#d62728", "#17becf", "#bcbd22", "#e377c2")
_LOG_SERIES = ("lr", "learning_rate")

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
.card.good{border-left:5px solid #2e9e4f}.card.bad{border-left:5px solid #d62728;background:#fff1f1}
.card.bad b{color:#b3161a}.card.head{min-width:260px}
td.passed{color:#1e7b3a;font-weight:600}td.failed{color:#b3161a;font-weight:700}
td.not-evaluated{color:#8a4b00}td.off{color:#8c8c8c}
ul.why{margin:4px 0 12px;padding-left:20px;font-size:13px}ul.why li{margin:3px 0}
details{background:#fff;border:1px solid #d8dce3;border-radius:8px;padding:6px 10px}
summary{cursor:pointer;color:#1d2330}
.tag{background:#ffe8cc;color:#8a4b00;border-radius:4px;padding:1px 5px;font-size:11px}
code{background:#eef1f5;padding:1px 4px;border-radius:3px}pre{background:#fff;border:1px solid #d8dce3;
padding:8px;overflow:auto;font-size:12px}
"""


def render_report(manifest: dict[str, Any], extra_plots: dict[str, Any] | None = None) -> str:
    """The report page for a manifest (as written to manifest.json) and optional extra plots.

    Accuracy comes first (headline card, then gates); a section without data is left out."""
    name, version = manifest["name"], manifest["version"]
    sections = [
        _summary(manifest),
        _section("Quality gates", _gates_table(manifest.get("gates"))),
        _section("Accuracy", _accuracy_table(manifest["accuracy"])),
        _section("Accuracy vs latency", _plot_figure("accuracy-latency", _plot_accuracy_latency, manifest)),
        _section("Model files", _file_figures(manifest)),
        _section("Latency per target", _latency_tables(manifest["latency"])),
        _section("Targets", _targets(manifest)),
        _section(
            "Latency distributions", _plot_figure("latency-distributions", _plot_latency_dists, manifest)
        ),
    ]
    # Per-layer profile plots (pipeline/report_profile.py) go here when the manifest has `bench_profile`:
    if manifest.get("bench_profile"):
        from slimship.pipeline.report_profile import profile_section

        sections.append(profile_section(manifest))
    for title in sorted(extra_plots or {}):
        sections.append(_section(title, _extra_plot(title, (extra_plots or {})[title])))
    sections += [
        _section("Channels kept per layer", _plot_figure("channels", _plot_channels, manifest)),
        _section("Parity", _parity(manifest["parity"])),
        _section("Calibration", _calibration(manifest)),
        _section("Files", _files_table(manifest["files"])),
        _section("Config", _config(manifest["config"])),
        _section("Versions", _kv_table(manifest["versions"])),
    ]
    title = html.escape(f"{name} {version}")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{title} - slimship release</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        f'<h1>{title}</h1>\n<p class="sub">slimship release report &middot; source model sha256 '
        f"<code>{html.escape(manifest['model']['source_sha256'][:16])}&hellip;</code> &middot; check it with "
        f"<code>slimship verify {html.escape(f'{name}-{version}')}</code></p>\n"
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
            else f"<td{_cell_class(c)}>{c if isinstance(c, _Raw) else _fmt(c)}</td>"
            for c in row
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class _Raw(str):
    """Already-escaped HTML for a table cell."""


class _Status(str):
    """A gate result cell: styled by its status."""

    status = ""


def _status(status: str, text: str) -> _Status:
    cell = _Status(text)
    cell.status = status
    return cell


def _cell_class(cell: Any) -> str:
    return f' class="{cell.status.replace(" ", "-")}"' if isinstance(cell, _Status) else ""


def _summary(manifest: dict[str, Any]) -> str:
    cards = [_headline_card(manifest)]
    slim = manifest["slimming"]
    for label, before, after in (
        ("parameters", slim.get("params_before"), slim.get("params_after")),
        ("FLOPs", slim.get("flops_before"), slim.get("flops_after")),
    ):
        if before and after is not None:
            cards.append(
                _card(f"{after / before:.1%}", f"{label} kept ({_short(after)} of {_short(before)})")
            )
    for kind, tail in (("device", ""), ("emulated", " (emulated)")):
        for key, entry in sorted(manifest["latency"][kind].items()):
            if entry.get("speedup") is not None:
                where = " &middot; ".join(html.escape(part) for part in key.split("/"))
                cards.append(_card(f"{entry['speedup']:.2f}&times;", f"speedup on {where}{tail}"))
    inputs = ", ".join(f"{t['name']} {_shape(t['shape'])} {t['dtype']}" for t in manifest["model"]["inputs"])
    body = "".join(cards)
    return f'<section class="cards">{body}</section>\n<p>Inputs: <code>{html.escape(inputs)}</code></p>'


def _card(value: str, label: str, kind: str = "") -> str:
    return f'<div class="card{" " + kind if kind else ""}"><b>{value}</b><span>{label}</span></div>'


def _headline_card(manifest: dict[str, Any]) -> str:
    """Dense vs slim accuracy, the drop in points; red when a gate failed or the drop is over 1 pt."""
    head = accuracy_headline(manifest)
    if head is None:
        return _card("not measured", "accuracy: no evaluation data for the dense and slim models", "head bad")
    sign = "&minus;" if head.drop > 0 else "+"
    why = " &middot; a quality gate failed" if head.gate_failed else ""
    label = (
        f"{html.escape(head.metric)}: dense {head.dense:.2f} &rarr; slim {head.slim:.2f} "
        f"({html.escape(head.slim_key)} vs {html.escape(head.dense_key)}){why}"
    )
    return _card(f"{sign}{abs(head.drop):.2f} pt", label, "head " + ("bad" if head.bad else "good"))


def _short(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:g}"


def _shape(shape: list[Any]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _accuracy_table(accuracy: dict[str, dict[str, Any]]) -> str:
    if not accuracy:
        return ""
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
        rows, headers = latency_rows(entries), list(LATENCY_HEADERS)
        if any(e.get("samples") for e in entries.values()):  # the runs measured; no column without them
            runs = [len(e["samples"]) if e.get("samples") else None for _, e in sorted(entries.items())]
            rows, headers = [[*row, n] for row, n in zip(rows, runs, strict=True)], [*headers, "runs"]
        parts.append(f"<h3>{kind.capitalize()}</h3><p>{note}</p>" + _table(headers, rows))
    if any(e.get("speedup") is not None for kind in latency.values() for e in kind.values()):
        parts.append(f'<p class="sub">{html.escape(SPEEDUP_DEFINITION)}.</p>')
    return "\n".join(parts)


def _file_figures(manifest: dict[str, Any]) -> str:
    """Per model file: its size, the FLOPs of the model it holds (slim, and dense where known), and per
    target its p50 latency, speedup and efficiency where they were measured."""
    slim = manifest["slimming"]
    flops, dense_flops = slim.get("flops_after"), slim.get("flops_before")
    timed: dict[str, list[dict[str, Any]]] = {}
    for kind in ("device", "emulated"):
        for entry in manifest["latency"][kind].values():
            timed.setdefault(str(entry.get("format")), []).append(entry | {"emulated": kind == "emulated"})
    if flops is None and not timed:
        return ""  # sizes alone are in the Files table
    rows = []
    for f in manifest["files"]:
        if f["role"] in ("safetensors", "reference-io", "model-card", "report"):
            continue
        for entry in timed.get(f["role"]) or [{}]:
            where = (entry.get("target") or "") + (" (emulated)" if entry.get("emulated") else "")
            rows.append([_Raw(f"<code>{html.escape(f['path'])}</code>"), f["role"], f["bytes"], flops,
                         dense_flops, where or "not timed", entry.get("p50_ms"), entry_speedup_text(entry),
                         entry.get("efficiency")])  # fmt: skip
    if not rows:
        return ""
    headers = ["file", "role", "bytes", "FLOPs slim", "FLOPs dense", "target", "p50 ms", "speedup",
               "efficiency"]  # fmt: skip
    source = slim.get("flops_source") or "torch.utils.flop_counter on the example inputs"
    note = f"FLOPs are those of the model every file holds ({html.escape(source)})"
    if dense_flops is None:
        note += "; a dense figure needs the dense model, which a release of the slim model alone lacks"
    note += "."
    return _table(headers, rows) + f'<p class="sub">{note}</p>'


def _parity(parity: dict[str, dict[str, Any]]) -> str:
    rows = [
        [role, e.get("max_abs_diff"), e.get("max_rel_diff"), e["tolerance"]]
        for role, e in sorted(parity.items())
    ]
    why = "".join(f"<li>{html.escape(s)}</li>" for s in tolerance_sentences(list(parity)))
    note = (
        "<p>Each file was run on the stored reference inputs and compared with the slim PyTorch model; "
        "<code>slimship verify</code> re-runs this with its own bounds:</p>"
    )
    return (
        _table(["model file", "max abs diff", "max rel diff", "tolerance (abs)"], rows)
        + note
        + (f'<ul class="why">{why}</ul>')
    )


def _calibration(manifest: dict[str, Any]) -> str:
    text = calibration_sentence(manifest.get("calibration"), list(manifest["parity"]))
    return f"<p>{html.escape(text)}</p>" if text else ""


def _targets(manifest: dict[str, Any]) -> str:
    definitions = target_definitions(manifest)
    if not definitions:
        return ""
    rows = [[name, *(d.get(f) for f in TARGET_FIELDS)] for name, d in definitions.items() if d]
    rows = [[*row[:3], ", ".join(map(str, row[3] or [])) or "none", *row[4:]] for row in rows]
    lines = "".join(f"<li>{html.escape(target_sentence(n, d))}</li>" for n, d in definitions.items())
    table = _table(["target", *TARGET_FIELDS], rows) if rows else ""
    return table + f'<ul class="why">{lines}</ul>'


def _config(config: dict[str, Any]) -> str:
    if not config:
        return ""
    import yaml

    text = yaml.safe_dump(config, sort_keys=True, default_flow_style=False, allow_unicode=True)
    return (
        "<details><summary>The configuration that produced this bundle (YAML, also in manifest.json "
        f"<code>config</code>)</summary><pre>{html.escape(text)}</pre></details>"
    )


def gate_rows(gates: list[dict[str, Any]]) -> list[list[Any]]:
    """One row per gate result: gate, subject, figure, limit, result (with why, when not evaluated)."""
    return [
        [g["gate"], g.get("subject") or "", g.get("figure"), g.get("limit"),
         _status(g["status"], g["status"] + (f" ({g['detail']})" if g.get("detail") else ""))]
        for g in gates
    ]  # fmt: skip


GATE_HEADERS = ["gate", "subject", "figure", "limit", "result"]


def _gates_table(gates: list[dict[str, Any]] | None) -> str:
    if not gates:
        return ""
    note = (
        "<p>Decided on the measured figures before the bundle was published; a failing gate publishes "
        "nothing.</p>"
    )
    return note + _table(GATE_HEADERS, gate_rows(gates))


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
                return ""  # no data: the section is left out
            return _figure_html(slug, _svg_bytes(fig), caption)
        finally:
            plt.close(fig)


def _svg_bytes(fig: Any) -> bytes:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="svg", metadata=_SVG_METADATA, bbox_inches="tight", pad_inches=0.1)
    return buffer.getvalue()


def _figure_html(slug: str, svg: bytes, caption: str, mime: str = "image/svg+xml") -> str:
    data = base64.b64encode(svg).decode("ascii")
    alt = html.escape(caption)
    return (
        f'<figure id="plot-{html.escape(slug)}"><img alt="{alt}" src="data:{mime};base64,{data}">'
        f"<figcaption>{alt}</figcaption></figure>"
    )


def accuracy_latency_points(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """(latency, accuracy) points: each timed slim variant, and the dense model where its timing is given.

    Labels name the model and the file format ("slim onnx", "dense tflite-fp32") and the target."""
    accuracy = manifest["accuracy"]
    points = []
    for kind in ("device", "emulated"):
        for key, entry in sorted(manifest["latency"][kind].items()):
            target = entry.get("target") or key.split("/", 1)[0]
            fmt = entry.get("format") or _format_of_variant(entry.get("variant"))
            for variant, p50, dense in (
                (entry.get("variant"), entry["p50_ms"], False),
                (entry.get("dense_variant"), entry.get("dense_p50_ms"), True),
            ):
                metric = primary_metric(accuracy.get(variant, {})) if variant else None
                if metric and p50 is not None:
                    model = "dense" if dense else "slim"
                    points.append({
                        "label": f"{model} {fmt} @ {target}" if fmt else f"{variant} @ {target}",
                        "format": fmt or variant, "target": target, "latency_ms": p50,
                        "metric": metric[0], "value": metric[1], "dense": dense,
                        "emulated": kind == "emulated",
                    })  # fmt: skip
    return points


def _format_of_variant(variant: str | None) -> str | None:
    """'slim-tflite-fp32@mobile-1t' -> 'tflite-fp32' (None when the variant names no format)."""
    if not variant:
        return None
    name = variant.split("@", 1)[0].split("-", 1)
    return name[1] if len(name) == 2 and name[1] != "torch" else None


def _plot_accuracy_latency(ax: Any, manifest: dict[str, Any]) -> str | None:
    """Squares dense, circles slim, hollow emulated; color per format; an arrow from each dense point to its
    slim counterpart; every label in the legend below the axes (nothing is written over the points)."""
    points = accuracy_latency_points(manifest)
    if not points:
        return None
    formats = sorted({p["format"] for p in points})
    colors = {f: _FORMAT_COLORS[i % len(_FORMAT_COLORS)] for i, f in enumerate(formats)}
    for point in points:
        color = colors[point["format"]]
        ax.scatter(
            point["latency_ms"], point["value"], s=70, marker="s" if point["dense"] else "o",
            edgecolors=_DENSE_COLOR if point["dense"] else color, linewidths=1.5,
            facecolors="none" if point["emulated"] or point["dense"] else color,
            label=point["label"], zorder=3, clip_on=True,
        )  # fmt: skip
    for slim in (p for p in points if not p["dense"]):
        dense = next((p for p in points if p["dense"] and p["target"] == slim["target"]
                      and p["format"] == slim["format"]), None)  # fmt: skip
        if dense is not None:
            ax.annotate(
                "", (slim["latency_ms"], slim["value"]), (dense["latency_ms"], dense["value"]),
                arrowprops={"arrowstyle": "->", "color": colors[slim["format"]], "alpha": 0.6},
            )  # fmt: skip
    ax.margins(x=0.15, y=0.25)
    ax.set_xlabel("p50 latency (ms)")
    ax.set_ylabel(", ".join(sorted({p["metric"] for p in points})))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8, frameon=False)
    ax.figure.set_size_inches(8.0, 4.0 + 0.22 * math.ceil(len(points) / 2))
    return (
        "Accuracy vs median latency: squares are the dense model, circles the slim one, hollow circles "
        "emulated targets; arrows go from dense to slim for the same format and target."
    )


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
    if len(series) > 1:
        return _small_multiples(slug, title, spec, series)
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(8.0, 3.4))
        try:
            (label,) = series
            _line(ax, str(label), series[label])
            ax.set_xlabel(str(spec.get("xlabel", "")))
            ax.set_ylabel(str(spec.get("ylabel") or label))
            return _figure_html(slug, _svg_bytes(fig), str(spec.get("caption", title)))
        finally:
            plt.close(fig)


def _small_multiples(slug: str, title: str, spec: dict[str, Any], series: dict[str, Any]) -> str:
    """One small plot per series, each with its own y axis (a learning rate on a log axis)."""
    names = list(series)
    cols = 2
    rows = math.ceil(len(names) / cols)
    with plt.rc_context(_RC):
        fig, axes = plt.subplots(rows, cols, figsize=(8.0, 2.3 * rows + 0.4), squeeze=False)
        try:
            for ax, name in zip(axes.flat, names, strict=False):
                _line(ax, str(name), series[name])
                ax.set_title(str(name), fontsize=9)
                ax.set_xlabel(str(spec.get("xlabel", "")))
            for ax in list(axes.flat)[len(names) :]:
                ax.set_visible(False)
            caption = str(spec.get("caption", f"{title}: one plot per quantity, each on its own axis"))
            return _figure_html(slug, _svg_bytes(fig), caption)
        finally:
            plt.close(fig)


def _line(ax: Any, name: str, data: dict[str, Any]) -> None:
    ys = [float(v) for v in data["y"]]
    ax.plot(data["x"], ys, marker="o", markersize=3, color=_SLIM_COLOR)
    if name.lower() in _LOG_SERIES and ys and all(v > 0 for v in ys) and max(ys) > 2 * min(ys):
        ax.set_yscale("log")


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
