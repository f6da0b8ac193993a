"""`slimship release` of a two-head .pt2: the manifest and model card name the inputs and outputs as the
bundle's files carry them (input `input` with a dynamic `batch`, outputs `cls` / `box`), the card's size
table holds the slimming figures, and its tolerance sentences say the figures of its parity table."""

from __future__ import annotations

import json
import re
from pathlib import Path

import onnx
import pytest
import torch

from slimship.cli import main


class TwoHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.cls = torch.nn.Linear(4, 3)
        self.box = torch.nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return {"cls": 0.05 * self.cls(f), "box": 0.05 * self.box(f)}  # small outputs: the cap binds


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("heads-release")
    torch.manual_seed(0)
    model = TwoHeads().eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (torch.randn(2, 3, 8, 8),), dynamic_shapes=({0: batch},))
    torch.export.save(program, folder / "heads.pt2")
    argv = ["release", str(folder / "heads.pt2"), "--name", "heads", "--version", "0.1.0",
            "--format", "onnx", "onnx-int8-dynamic", "--out", str(folder / "rel")]  # fmt: skip
    assert main(argv) == 0
    return folder / "rel" / "heads-0.1.0"


def _onnx_io(path: Path) -> tuple[list, list]:
    graph = onnx.load(str(path)).graph

    def specs(values) -> list:
        return [(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]

    return specs(graph.input), specs(graph.output)


def test_manifest_names_inputs_and_outputs_as_the_files_do(bundle: Path):
    manifest = json.loads((bundle / "manifest.json").read_text())
    model = manifest["model"]
    listed = (
        [(t["name"], t["shape"]) for t in model["inputs"]],
        [(t["name"], t["shape"]) for t in model["outputs"]],
    )
    assert listed == ([("input", ["batch", 3, 8, 8])], [("cls", ["batch", 3]), ("box", ["batch", 5])])
    onnx_files = [f["path"] for f in manifest["files"] if f["format"] == "onnx"]
    assert len(onnx_files) == 2
    for name in onnx_files:
        assert _onnx_io(bundle / name) == listed, name


def test_model_card_io_tables_name_the_heads(bundle: Path):
    card = (bundle / "MODEL_CARD.md").read_text()
    assert "| `input` | `['batch', 3, 8, 8]` | float32 |" in card
    assert "| `cls` | `['batch', 3]` | float32 |" in card
    assert "| `box` | `['batch', 5]` | float32 |" in card
    assert "input_0" not in card and "output_0" not in card


def test_model_card_size_and_tolerance_sentences_use_its_own_figures(bundle: Path):
    manifest = json.loads((bundle / "manifest.json").read_text())
    card = (bundle / "MODEL_CARD.md").read_text()
    assert "No size summary given" not in card
    slimming = manifest["slimming"]
    assert f"| parameters | - | {slimming['params_after']:,} | - |" in card
    assert f"| FLOPs | - | {slimming['flops_after']:,} | - |" in card
    rows = dict(re.findall(r"^\| (onnx-int8-dynamic|onnx) \|[^|]*\|[^|]*\| ([^|]+) \|$", card, re.M))
    assert set(rows) == {"onnx", "onnx-int8-dynamic"}
    int8 = rows["onnx-int8-dynamic"].strip()
    assert float(int8) < 0.1  # the magnitude cap binds (outputs far below 1): not the bare 0.1 bound
    assert float(int8) == pytest.approx(manifest["parity"]["onnx-int8-dynamic"]["tolerance"], rel=1e-3)
    sentence = next(line for line in card.splitlines() if line.startswith("- int8-dynamic"))
    assert f"onnx-int8-dynamic {int8}" in sentence
    assert "1 x largest |reference output| itself" in sentence
