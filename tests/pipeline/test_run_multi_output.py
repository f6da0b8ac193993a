"""`slimship run` on a model with a dict output (two heads): the outputs are flattened the way the exported
files order them, `data.output` names the logits accuracy is read from (an ambiguous model is refused at
config-check time, naming its outputs), and the bundle names its inputs and outputs as its files do."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest

from slimship.cli import main

FACTORY = textwrap.dedent(
    """
    from pathlib import Path

    import torch

    MARKER = Path(__file__).with_name("data-factory-called")


    class TwoHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
            self.cls = torch.nn.Linear(4, 3)
            self.box = torch.nn.Linear(4, 5)

        def forward(self, x):
            f = torch.relu(self.conv(x)).mean(dim=(2, 3))
            return {"cls": self.cls(f), "box": self.box(f)}


    def model():
        torch.manual_seed(0)
        return TwoHeads()


    def data():
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(24, 1, 8, 8, generator=g), torch.randint(0, 3, (24,), generator=g)
        return [(x[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8)]


    def loaders():
        MARKER.write_text("called")
        return data(), data()
    """
)


def _project(tmp_path: Path, module: str, data: dict | None) -> Path:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / f"{module}.py").write_text(FACTORY)
    config = {
        "model": {"factory": f"{module}:model", "input_shape": [1, 8, 8]},
        "export": {"formats": ["onnx"]},
        "targets": ["host"],
        "bench": {"runs": 2, "warmup": 0},
        "release": {"name": "heads", "version": "0.1.0", "out": str(tmp_path / "out")},
    }
    if data is not None:
        config["data"] = {"factory": f"{module}:loaders", **data}
    path = folder / "config.yaml"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    ("choice", "said"),
    [
        (None, r"2 named outputs \(0 'cls' \[1, 3\], 1 'box' \[1, 5\]\).*set data.output"),
        ("score", r"'data.output' is 'score', but the model's outputs are 0 'cls' \[1, 3\], 1 'box'"),
        (2, r"'data.output' is 2, but the model's outputs are 0 'cls'"),
    ],
)
def test_an_ambiguous_or_unknown_output_is_refused_before_any_work(choice, said, tmp_path, capsys):
    data = {} if choice is None else {"output": choice}
    config = _project(tmp_path, f"heads_refused_{choice}", data)
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slimship: error:") and "Traceback" not in err
    assert re.search(said, err), err
    assert not (config.parent / "data-factory-called").exists()  # refused before the data was loaded
    assert not (tmp_path / "out").exists()


def test_a_negative_output_index_is_refused_by_the_config_schema(tmp_path, capsys):
    config = _project(tmp_path, "heads_negative", {"output": -1})
    assert main(["run", str(config)]) == 2
    assert "data.output" in capsys.readouterr().err


def _torch_top1(module: str, folder: Path, head: str) -> float:
    import importlib
    import sys

    sys.path.insert(0, str(folder))
    try:
        factory = importlib.import_module(module)
    finally:
        sys.path.remove(str(folder))
    import torch

    net = factory.model().eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in factory.data():
            correct += int((net(x)[head].argmax(1) == y).sum())
            total += len(y)
    return round(100.0 * correct / total, 3)


@pytest.mark.parametrize(("choice", "head"), [("cls", "cls"), (1, "box")])
def test_run_measures_accuracy_on_the_chosen_output(choice, head, tmp_path, capsys):
    module = f"heads_run_{head}"
    config = _project(tmp_path, module, {"output": choice})
    assert main(["run", str(config), "--json", str(tmp_path / "run.json")]) == 0, capsys.readouterr().err
    expected = _torch_top1(module, config.parent, head)
    other = _torch_top1(module, config.parent, "box" if head == "cls" else "cls")
    assert expected != other  # the figures below tell the heads apart
    summary = json.loads((tmp_path / "run.json").read_text())["summary"]
    assert summary["accuracy"] == {"dense": expected, "slim": expected}  # PyTorch top-1 of the chosen head
    manifest = json.loads((tmp_path / "out" / "heads-0.1.0" / "manifest.json").read_text())
    # the ONNX file's top-1 is read from the same head (the device runner's --eval-output), and agrees
    assert manifest["accuracy"]["slim-onnx@host"]["top1"] == expected
    assert manifest["accuracy"]["slim-onnx@host"]["agreement"] == 1.0


def test_run_without_data_on_a_dict_output_model_releases_named_outputs(tmp_path, capsys):
    config = _project(tmp_path, "heads_nodata", None)
    assert main(["run", str(config)]) == 0, capsys.readouterr().err
    bundle = tmp_path / "out" / "heads-0.1.0"
    manifest = json.loads((bundle / "manifest.json").read_text())
    graph = onnx.load(str(bundle / "model.onnx")).graph
    file_inputs = [
        (t.name, [d.dim_param or d.dim_value for d in t.type.tensor_type.shape.dim]) for t in graph.input
    ]
    file_outputs = [t.name for t in graph.output]
    assert file_outputs == ["cls", "box"]
    assert [(t["name"], t["shape"]) for t in manifest["model"]["inputs"]] == file_inputs
    assert [t["name"] for t in manifest["model"]["outputs"]] == file_outputs
    assert [t["shape"] for t in manifest["model"]["outputs"]] == [["batch", 3], ["batch", 5]]
    reference = np.load(bundle / "reference_io.npz")
    assert [reference[k].shape[-1] for k in manifest["reference_io"]["outputs"]] == [3, 5]
    card = (bundle / "MODEL_CARD.md").read_text()
    assert "`cls`" in card and "`box`" in card and "input_0" not in card
