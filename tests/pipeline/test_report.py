"""report.html: self-contained, reproducible, and rendered for real by headless chromium."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from slimship.pipeline.report import render_report

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "test-screenshots"


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _manifest(released) -> dict:
    return json.loads((released.bundle_dir / "manifest.json").read_text())


def test_report_is_self_contained_with_every_plot(released):
    page = (released.bundle_dir / "report.html").read_text()
    collector = _Collector()
    collector.feed(page)
    tags = collector.tags
    assert not [t for t, a in tags if t in ("script", "link", "iframe", "object", "embed")]
    assert "url(" not in page and "@import" not in page
    images = [a for t, a in tags if t == "img"]
    ids = {a.get("id") for t, a in tags if t == "figure"}
    assert {
        "plot-accuracy-latency",
        "plot-channels",
        "plot-latency-distributions",
        "plot-extra-hesso-sparsity-curve",
        "plot-extra-adc-policy",
    } <= ids
    assert len(images) == len(ids)
    for attrs in images:
        src = attrs["src"]
        assert src.startswith("data:image/svg+xml;base64,"), src[:40]
        svg = base64.b64decode(src.split(",", 1)[1]).decode()
        assert "<svg" in svg and "<dc:date>" not in svg
    for needle in ("tiny-cnn 1.0.0", "x86-ort-4t", "pi4-litert-emu", "not device timings", "1.82"):
        assert needle in page, needle


def test_report_bytes_are_reproducible(released, release_inputs):
    manifest = _manifest(released)
    first = render_report(manifest, release_inputs.extra_plots)
    assert render_report(manifest, release_inputs.extra_plots) == first
    # the bundled report lacks only its own and the model card's rows in the files table
    assert (released.bundle_dir / "report.html").read_text().count("data:image/svg+xml") == first.count(
        "data:image/svg+xml"
    )


class _Sections(HTMLParser):
    """Each <section>: its <h2> title, and whether anything besides the title is in it."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[dict] = []
        self.cards: list[tuple[str, str]] = []  # (class, text)
        self._where: list[str] = []
        self._card: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append({"title": "", "content": 0})
        elif self.sections and tag in ("table", "figure", "img", "p", "ul", "details", "pre"):
            self.sections[-1]["content"] += 1
        if tag == "div" and "card" in (attrs.get("class") or ""):
            self._card = [attrs["class"]]
        self._where.append(tag)

    def handle_endtag(self, tag):
        if tag == "div" and self._card is not None:
            self.cards.append((self._card[0], " ".join(self._card[1:])))
            self._card = None
        if self._where:
            self._where.pop()

    def handle_data(self, data):
        if self._where and self._where[-1] == "h2" and self.sections:
            self.sections[-1]["title"] += data
        if self._card is not None and data.strip():
            self._card.append(data.strip())


def _parse(page: str) -> _Sections:
    parser = _Sections()
    parser.feed(page)
    return parser


def test_report_leads_with_accuracy_and_lists_gates(released):
    parsed = _parse((released.bundle_dir / "report.html").read_text())
    kind, text = parsed.cards[0]
    assert kind == "card head good", parsed.cards[0]
    assert "0.50 pt" in text and "dense 91.00" in text and "slim 90.50" in text
    titles = [s["title"] for s in parsed.sections if s["title"]]
    assert titles[:3] == ["Quality gates", "Accuracy", "Accuracy vs latency"]
    page = (released.bundle_dir / "report.html").read_text()
    assert '<td class="passed">passed</td>' in page and '<td class="off">off</td>' in page


@pytest.mark.parametrize(
    ("slim_top1", "gate_status", "kind"),
    [(90.5, "passed", "good"), (60.0, "passed", "bad"), (90.5, "failed", "bad")],
)
def test_accuracy_card_is_red_on_a_big_drop_or_a_failed_gate(released, slim_top1, gate_status, kind):
    manifest = _manifest(released)
    manifest["accuracy"]["slim-torch"]["top1"] = slim_top1
    manifest["gates"][0]["status"] = gate_status
    card_kind, text = _parse(render_report(manifest)).cards[0]
    assert card_kind == f"card head {kind}"
    assert f"{91.0 - slim_top1:.2f} pt" in text


def test_no_section_is_left_empty(released):
    manifest = _manifest(released)
    manifest.update(accuracy={}, latency={"device": {}, "emulated": {}}, gates=[])
    manifest["slimming"] = {}
    parsed = _parse(render_report(manifest))
    titles = [s["title"] for s in parsed.sections if s["title"]]
    assert titles == ["Parity", "Files", "Config", "Versions"]
    assert all(s["content"] for s in parsed.sections), parsed.sections
    assert parsed.cards[0][0] == "card head bad" and "not measured" in parsed.cards[0][1]
    full = _parse((released.bundle_dir / "report.html").read_text())
    assert all(s["content"] for s in full.sections)
    assert "Latency distributions" in [s["title"] for s in full.sections]


def test_report_explains_tolerances_targets_calibration_and_config(released):
    manifest = _manifest(released)
    manifest["parity"]["tflite-int8"] = {"max_abs_diff": 0.1, "max_rel_diff": 0.1, "tolerance": 0.4}
    manifest["calibration"] = {"samples": 64, "source": "data.factory my:loaders: first 64 samples of train"}
    manifest["latency"]["device"]["mobile-1t/onnx"] = {
        **manifest["latency"]["device"]["x86-ort-4t"], "target": "mobile-1t", "format": "onnx"
    }  # fmt: skip
    page = render_report(manifest)
    assert (
        "fp32 (onnx, pt2, tflite-fp32): outputs may differ from the slim PyTorch model by at most 0.0001"
        in page
    )
    assert "int8 (tflite-int8): outputs may differ from the slim PyTorch model by at most 0.4" in page
    assert "top-1 agreement on evaluation data must be at least 85%" in page
    assert "mobile-1t (one thread pinned to core 0): 1 thread, pinned to core 0, runtime auto" in page
    assert "measured, not emulated" in page
    assert "The int8 files (tflite-int8) were calibrated on 64 samples: data.factory my:loaders" in page
    assert "<details><summary>The configuration that produced this bundle" in page
    assert "x86-ort-4t" in page.split("<details>", 1)[1]  # the config's targets, as YAML


def test_training_history_is_drawn_one_axis_per_quantity(released):
    page = (released.bundle_dir / "report.html").read_text()
    figure = page.split('id="plot-extra-hesso-training"', 1)[1].split("</figure>", 1)[0]
    svg = base64.b64decode(figure.split("base64,", 1)[1].split('"', 1)[0]).decode()
    assert svg.count('id="axes_') == 4  # loss, lr, train_accuracy, group_sparsity: one axis each
    assert "10^{-4}" in svg and "10^{-3}" in svg  # lr on a log axis (matplotlib keeps the TeX in a comment)
    assert "one plot per quantity" in figure


def test_accuracy_latency_labels_name_the_format(released):
    from slimship.pipeline.report import accuracy_latency_points

    labels = {p["label"] for p in accuracy_latency_points(_manifest(released))}
    assert labels == {
        "slim onnx @ x86-ort-4t",
        "dense onnx @ x86-ort-4t",
        "slim tflite-fp32 @ pi4-litert-emu",
    }


def _pixels(png: Path) -> np.ndarray:
    import matplotlib.image as mpimg

    return np.asarray(mpimg.imread(png))


@pytest.mark.slow
def test_report_renders_in_headless_chromium(released, chromium, tmp_path):
    shot = tmp_path / "report.png"
    argv = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1200,2000",
        "--hide-scrollbars",
        (released.bundle_dir / "report.html").as_uri(),
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert shot.is_file(), f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "release-report.png")
    print(f"screenshot: {shot} (copied to {ARTIFACTS / 'release-report.png'})")
    pixels = _pixels(shot)
    assert pixels.shape[:2] == (2000, 1200)
    rgb = pixels[..., :3]
    assert float(rgb.var()) > 1e-3, "screenshot is blank"
    # the plots are drawn: many distinct colours, not just text on a plain background
    assert len(np.unique((rgb.reshape(-1, 3) * 255).astype(np.uint8), axis=0)) > 50


def _timed_entry(ratios: list[float], flops: tuple[float, float] | None):
    """A BenchEntry of one interleaved run: dense and slim samples whose per-pair ratios are `ratios`."""
    from slimship.pipeline.records import BenchEntry
    from slimship.runtimes.measure import LatencyStats, Measurement, speedup_from_ratios, with_flops

    slim_ms = [2.0 + 0.1 * i for i in range(len(ratios))]
    dense_ms = [r * s for r, s in zip(ratios, slim_ms, strict=True)]

    def measured(name: str, samples: list[float]) -> Measurement:
        return Measurement(name, "mobile-1t", {"backend": "onnxruntime"}, "fp32", 1.0,
                           LatencyStats.from_samples(samples), 100, 50, 10, [0], "onnx")  # fmt: skip

    dense, slim = measured("dense.onnx", dense_ms), measured("slim.onnx", slim_ms)
    sp = with_flops(speedup_from_ratios(ratios, "dense.onnx", "slim.onnx", "mobile-1t"), flops, "counted")
    sp = type(sp)(**{**sp.__dict__, "dense_p50_ms": dense.latency.p50_ms, "slim_p50_ms": slim.latency.p50_ms})
    return BenchEntry("mobile-1t", "onnx", False, slim, slim, dense, sp, "local profile (this machine)")


def test_the_headline_is_the_median_of_the_pair_ratios_the_json_carries(released):
    """Manifest, report and card show one speedup: the median of the pair ratios the record carries, with
    efficiency = speedup / FLOPs ratio, the real run count, and the definition under each table."""
    from slimship.pipeline.model_card import render_model_card
    from slimship.runtimes.measure import SPEEDUP_DEFINITION

    ratios = [1.2, 2.9, 1.9, 1.94, 2.1, 1.3, 2.5]
    record = _timed_entry(ratios, (4.0e6, 2.0e6)).latency_record()
    assert record["speedup"] == round(float(np.median(record["pair_ratios"])), 4) == 1.94
    assert record["pairs"] == len(record["pair_ratios"]) == len(record["samples"]) == 7
    assert record["flops_ratio"] == 2.0 and record["efficiency"] == round(1.94 / 2.0, 4)
    manifest = _manifest(released)
    manifest["latency"]["device"] = {"mobile-1t/onnx": record}
    page = render_report(manifest)
    assert "&amp;" not in page.replace("&amp;amp;", "")  # no entity escaped twice
    assert "speedup on mobile-1t &middot; onnx" in page
    row = page.split("<h3>Device</h3>", 1)[1].split("</tr>", 2)[1]
    assert ">1.94x (1.26-2.66)<" in row and '<td class="num">0.97</td>' in row
    assert row.endswith('<td class="num">7</td>')  # runs: the real count
    assert f"{SPEEDUP_DEFINITION}." in page and ">samples<" not in page
    card = render_model_card(manifest)
    assert "| 1.94x (1.26-2.66) | 0.97 |" in card and SPEEDUP_DEFINITION in card


def test_a_latency_without_samples_shows_no_run_count(released):
    manifest = _manifest(released)
    for kind in manifest["latency"].values():
        for entry in kind.values():
            entry.pop("samples", None)
            entry.pop("dense_samples", None)
    page = render_report(manifest)
    assert ">runs<" not in page
    assert ">samples<" not in page


def test_a_standalone_release_reports_size_flops_latency_and_what_agreement_was_measured_on(tmp_path):
    """`slimship release` from a .pt2 on disk: per file its size, the slim FLOPs, its p50 on the target;
    the agreement gate says it was measured on random inputs and how many."""
    import torch

    from slimship.cli import main
    from slimship.slimming import count_flops

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 10)).eval()  # fmt: skip
    x = torch.randn(1, 3, 8, 8)
    program, out = tmp_path / "slim.pt2", tmp_path / "rel"
    torch.export.save(torch.export.export(model, (x,), strict=False), program)
    argv = ["release", str(program), "--name", "m", "--version", "1.0.0", "--out", str(out),
            "--format", "onnx", "tflite-int8-dynamic", "--min-agreement", "0.5"]  # fmt: skip
    assert main([*argv, "--target", "host"]) == 0
    bundle = out / "m-1.0.0"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["slimming"]["flops_after"] == count_flops(model, (x,)) > 0
    timed = manifest["latency"]["device"]
    assert set(timed) == {"host/onnx", "host/tflite-int8-dynamic"}
    assert all(e["p50_ms"] > 0 and len(e["samples"]) == 30 for e in timed.values())
    (agreement,) = [g for g in manifest["gates"] if g["gate"] == "min_agreement"]
    assert agreement["detail"] == "measured on random inputs (64 seeded samples, not real data)"
    page = (bundle / "report.html").read_text()
    table = page.split("<h2>Model files</h2>", 1)[1].split("</table>", 1)[0]
    sizes = {f["role"]: f["bytes"] for f in manifest["files"]}
    for role in ("onnx", "tflite-int8-dynamic"):
        row = table.split(f"<td>{role}</td>", 1)[1].split("</tr>", 1)[0]
        p50 = timed[f"host/{role}"]["p50_ms"]
        assert row.startswith(
            f'<td class="num">{sizes[role]:,}</td><td class="num">{count_flops(model, (x,)):,}</td>'
        )
        assert f'<td>host</td><td class="num">{p50:.4g}</td>' in row
    assert "measured on random inputs (64 seeded samples, not real data)" in page
    card = (bundle / "MODEL_CARD.md").read_text()
    assert f"| FLOPs | - | {count_flops(model, (x,)):,} | - |" in card
    # without --target the files are checked, not timed: no latency, sizes and FLOPs still reported
    assert main([*argv, "--version", "1.0.1"]) == 0
    untimed = json.loads((out / "m-1.0.1" / "manifest.json").read_text())
    assert untimed["latency"]["device"] == {} and untimed["slimming"]["flops_after"] == count_flops(
        model, (x,)
    )
    (agreement,) = [g for g in untimed["gates"] if g["gate"] == "min_agreement"]
    assert agreement["status"] == "passed" and agreement["figure"] == manifest_agreement(manifest)
    page = (out / "m-1.0.1" / "report.html").read_text()
    assert "not timed" in page.split("<h2>Model files</h2>", 1)[1].split("</table>", 1)[0]


def manifest_agreement(manifest: dict) -> float:
    """The measured value of a manifest's min_agreement gate."""
    (gate,) = [g for g in manifest["gates"] if g["gate"] == "min_agreement"]
    return gate["figure"]
