"""Why an ONNX export keeps a static batch, told apart: a .pt2 saved without dynamic_shapes vs a model that
fixes its batch in a reshape (`slimship export` on files on disk)."""

from __future__ import annotations

import json

import torch
from torch import nn

from slimship.cli import main
from slimship.exporters.onnx_export import export_onnx

SAVED_STATIC = "the program was saved without dynamic_shapes (its batch is fixed at 1)"
RESHAPE = "in a reshape/view or shape check"


def _conv() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)
    ).eval()


def _export(tmp_path, capsys, name: str, program: torch.export.ExportedProgram) -> tuple[str, dict]:
    path = tmp_path / f"{name}.pt2"
    torch.export.save(program, str(path))
    out = tmp_path / f"out-{name}"
    assert main(["export", str(path), "--format", "onnx", "--out", str(out)]) == 0
    (entry,) = json.loads((out / "slimship-exports.json").read_text())["entries"]
    captured = capsys.readouterr()
    return captured.out + captured.err, entry


def test_pt2_saved_without_dynamic_shapes_says_so(tmp_path, capsys) -> None:
    """No reshape anywhere: the static batch comes from how the program was saved, and the advice says so."""
    printed, entry = _export(
        tmp_path, capsys, "static", torch.export.export(_conv(), (torch.randn(1, 3, 16, 16),))
    )
    assert entry["dynamic_batch"] is False
    assert f"batch fixed at 1: {SAVED_STATIC}: export it with batch = Dim('batch')" in printed
    assert "dynamic_shapes=({0: batch},)" in printed and RESHAPE not in printed


def test_pt2_saved_with_a_dynamic_batch_keeps_it(tmp_path, capsys) -> None:
    x = torch.randn(2, 3, 16, 16)
    program = torch.export.export(_conv(), (x,), dynamic_shapes=({0: torch.export.Dim("b")},))
    printed, entry = _export(tmp_path, capsys, "dynamic", program)
    assert entry["dynamic_batch"] is True and "batch fixed" not in printed and SAVED_STATIC not in printed


class Reshape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(2, 12))  # the batch size written as a literal


def test_a_literal_batch_in_a_reshape_keeps_the_reshape_advice(tmp_path) -> None:
    result = export_onnx(Reshape().eval(), (torch.randn(2, 3, 4),), tmp_path / "r.onnx")
    assert not result.dynamic_batch and RESHAPE in result.dynamic_batch_reason
    assert SAVED_STATIC.split(" (")[0] not in result.dynamic_batch_reason
