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


def test_report_without_figures_still_renders(released):
    manifest = _manifest(released)
    manifest.update(accuracy={}, latency={"device": {}, "emulated": {}})
    manifest["slimming"] = {}
    page = render_report(manifest)
    assert page.count("Nothing to plot") == 3
    assert "No accuracy figures were given" in page and "No latency figures were given" in page


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
