"""MODEL_CARD.md: what a person deploying the model needs, rendered from the manifest."""

from __future__ import annotations

import html
import re
from typing import Any

from slimship.pipeline.explain import (
    accuracy_headline,
    calibration_sentence,
    primary_metric,
    target_definitions,
    target_sentence,
    tolerance_sentences,
)
from slimship.pipeline.manifest import LATENCY_HEADERS, latency_rows
from slimship.pipeline.report import GATE_HEADERS, gate_rows
from slimship.runtimes.measure import SPEEDUP_DEFINITION


def render_model_card(manifest: dict[str, Any], notes: str = "") -> str:
    """Markdown model card: accuracy, quality gates, inputs, outputs, files and sizes, latency, limits."""
    stem = f"{manifest['name']}-{manifest['version']}"
    parts = [
        f"# {manifest['name']} {manifest['version']}\n",
        "Slim model made by slimship from the source model with sha256 "
        f"`{manifest['model']['source_sha256']}`.\n",
        "Verify this bundle before use (checksums, manifest schema, and each model file's outputs against "
        "the stored reference):\n\n"
        f"```\nslimship verify {stem}\nslimship verify {stem}.tar.gz\n```\n",
        _accuracy(manifest),
        _gates(manifest.get("gates")),
        _inputs(manifest["model"]),
        _files(manifest["files"]),
        _size(manifest["slimming"]),
        _latency(manifest),
        _parity(manifest["parity"]),
        _calibration(manifest),
        _limits(manifest, notes),
    ]
    return "\n".join(p for p in parts if p).rstrip() + "\n"


def _md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table whose cells are shown literally (the model card's tables; public for other cards)."""
    return _md_table(headers, rows)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    text = str(value).replace("\n", " ")
    if len(text) > 1 and text[0] == text[-1] == "`":  # a code span: shown literally, kept closed
        return "`" + text[1:-1].replace("`", "'").replace("|", "\\|") + "`"
    return md_text(text).replace("|", "\\|")


def md_text(text: str) -> str:
    """User-provided text (a file name, a description) as literal Markdown: HTML and markup escaped. An
    underscore inside a word (`max_accuracy_drop`) is no markup in Markdown and stays as it is."""
    return re.sub(r"[\\`*\[\]#!]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", lambda m: "\\" + m[0],
                  html.escape(text, quote=False))  # fmt: skip


def _inputs(model: dict[str, Any]) -> str:
    rows = [[f"`{t['name']}`", f"`{list(t['shape'])}`", t["dtype"]] for t in model["inputs"]]
    out_rows = [[f"`{t['name']}`", f"`{list(t['shape'])}`", t["dtype"]] for t in model["outputs"]]
    text = "## Intended inputs\n\n" + _md_table(["input", "shape", "dtype"], rows)
    text += f"\nLayout: {model.get('layout') or 'not stated (shapes above are as traced)'}.\n"
    pre = model.get("preprocessing")
    text += (
        f"\nPreprocessing: {pre if pre else 'not stated; feed tensors like the stored reference inputs'}.\n"
    )
    text += (
        "\nThe bundle's `reference_io.npz` holds example inputs (`in0`, ...) "
        "and expected outputs (`out0`, ...).\n"
    )
    return text + "\n## Outputs\n\n" + _md_table(["output", "shape", "dtype"], out_rows)


def _files(files: list[dict[str, Any]]) -> str:
    rows = [[f"`{f['path']}`", f["role"], f["format"], f["bytes"]] for f in files]
    return "## Files\n\n" + _md_table(["path", "role", "format", "bytes"], rows)


def _size(slimming: dict[str, Any]) -> str:
    rows = []
    for label, before, after in (
        ("parameters", slimming.get("params_before"), slimming.get("params_after")),
        ("FLOPs", slimming.get("flops_before"), slimming.get("flops_after")),
    ):
        if after is not None:  # a release made from the slim model alone knows no dense figure
            rows.append([label, before, after, f"{after / before:.1%}" if before else "-"])
    layers = slimming.get("per_layer") or {}
    text = "## Size\n\n" + (
        _md_table(["", "dense", "slim", "kept"], rows) if rows else "No size summary given.\n"
    )
    if layers:
        kept = sum(v["channels_kept"] for v in layers.values())
        total = sum(v["channels_before"] for v in layers.values())
        text += f"\n{len(layers)} layers slimmed: {kept:,} of {total:,} channels kept.\n"
    multiple, alignment = slimming.get("channel_multiple"), slimming.get("alignment")
    where = f"target `{alignment['target']}` ({alignment['runtime']})" if alignment else ""
    whole = (alignment or {}).get("whole_model")
    if multiple:
        text += f"Kept channels were rounded up to multiples of {multiple}"
        if whole:
            ratio = whole["aligned"][str(multiple)]["speedup"]
            text += f", measured on {where}: {ratio:.2f}x against exact slimming"
        text += ".\n"
    elif whole:
        tried = ", ".join(f"{m} ({v['speedup']:.2f}x)" for m, v in whole["aligned"].items())
        text += (
            f"Rounding kept channels up to multiples of {tried} was measured on {where} and made the whole "
            "model slower, so the kept counts are exact.\n"
        )
    elif alignment and "spaces" in alignment:  # slim.channel_multiple: latency
        spaces = alignment["spaces"].values()
        extra = sum(1 for s in spaces if s["kept"] != s["needed"])
        text += (
            f"Kept channel counts were chosen per space from latency measured on {where}: {extra} of "
            f"{len(spaces)} spaces keep extra channels (the outputs are unchanged).\n"
        )
    elif alignment:
        text += f"Channel alignment was measured on {where} and did not pay, so the kept counts are exact.\n"
    return text


def _accuracy(manifest: dict[str, Any]) -> str:
    accuracy = manifest["accuracy"]
    if not accuracy:
        return "## Accuracy\n\nNo accuracy figures were measured for this release.\n"
    head = accuracy_headline(manifest)
    text = "## Accuracy\n\n"
    if head is not None:
        mark = "**Warning:** " if head.bad else ""
        text += f"{mark}{head.text()} (`{head.slim_key}` vs `{head.dense_key}`, same evaluation data).\n\n"
    metrics = sorted({m for entry in accuracy.values() for m in entry})
    rows = [[key, *(accuracy[key].get(m) for m in metrics)] for key in sorted(accuracy)]
    return text + _md_table(["format / target", *metrics], rows)


def _gates(gates: list[dict[str, Any]] | None) -> str:
    if gates is None:
        return ""
    if not gates:
        return "## Quality gates\n\nNo quality gates were set.\n"
    text = (
        "## Quality gates\n\nDecided before the release was published; a failing gate publishes nothing.\n\n"
    )
    return text + _md_table(GATE_HEADERS, gate_rows(gates))


def _latency(manifest: dict[str, Any]) -> str:
    latency = manifest["latency"]
    text = "## Latency per target\n\n"
    definitions = target_definitions(manifest)
    if definitions:
        text += "".join(f"- {target_sentence(n, d)}\n" for n, d in definitions.items()) + "\n"
    for kind, title in (("device", "Measured on the target"), ("emulated", "Emulated on the build host")):
        entries = latency[kind]
        if entries:
            text += f"### {title}\n\n" + _md_table(LATENCY_HEADERS, latency_rows(entries)) + "\n"
    if not latency["device"] and not latency["emulated"]:
        text += "No latency was measured for this release.\n"
    if any(e.get("speedup") is not None for kind in latency.values() for e in kind.values()):
        text += f"The {SPEEDUP_DEFINITION}.\n"
    return text


def _parity(parity: dict[str, dict[str, Any]]) -> str:
    rows = [
        [r, e.get("max_abs_diff"), e.get("max_rel_diff"), e["tolerance"]] for r, e in sorted(parity.items())
    ]
    figures = {r: _cell(e["tolerance"]) for r, e in parity.items()}  # the sentences say the table's figures
    why = "".join(f"- {sentence}\n" for sentence in tolerance_sentences(list(parity), figures))
    return (
        "## Parity with the slim PyTorch model\n\n"
        + _md_table(["model file", "max abs diff", "max rel diff", "tolerance (abs)"], rows)
        + "\nTolerances:\n\n"
        + why
    )


def _calibration(manifest: dict[str, Any]) -> str:
    calibration = manifest.get("calibration")
    if calibration is not None:
        calibration = {**calibration, "source": md_text(str(calibration.get("source", "")))}
    text = calibration_sentence(calibration, list(manifest["parity"]))
    return f"## Calibration\n\n{text}\n" if text else ""


def _limits(manifest: dict[str, Any], notes: str) -> str:
    limits = []
    if notes.strip():
        limits.append(notes.strip())
    if manifest["latency"]["emulated"]:
        limits.append(
            "Timings listed as emulated were taken on the build host with a device profile; they are not "
            "measurements on the device and can differ from it."
        )
    if any(isinstance(d, int) for t in manifest["model"]["inputs"] for d in t["shape"]):
        limits.append(
            "Input shapes are fixed as listed unless a dimension is named; other shapes are untested."
        )
    dense = [k for k in manifest["accuracy"] if k.startswith("dense")]
    if dense:
        reference = primary_metric(manifest["accuracy"][dense[0]])
        for key, metrics in sorted(manifest["accuracy"].items()):
            value = primary_metric(metrics)
            if reference and value and value[0] == reference[0] and value[1] < reference[1]:
                limits.append(f"`{key}` loses {reference[1] - value[1]:.4g} {value[0]} against `{dense[0]}`.")
    lossy = [r for r in manifest["parity"] if "int8" in r or "fp16" in r]
    if lossy:
        limits.append(
            "Quantized or reduced-precision files ("
            + ", ".join(f"`{r}`" for r in sorted(lossy))
            + ") differ from the slim PyTorch model within the tolerances above, not bit for bit."
        )
    return "## Known limits\n\n" + "".join(f"- {item}\n" for item in limits or ["None recorded."])
