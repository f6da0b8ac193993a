"""stdout carries only what slimship writes: a library's print() during a command goes to stderr with -v,
and nowhere without it (a converter's size summary is noise beside slimship's own lines)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slimship import cli


def test_a_library_print_during_a_command_leaves_json_stdout_parseable(tmp_path: Path, capsys, monkeypatch):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 8, 8),), strict=False), path)
    real = cli._cmd_export

    def noisy(args):  # what a quantiser's size summary does: a bare print() on stdout
        print("Original model size: 73.93 KiB")
        return real(args)

    monkeypatch.setattr(cli, "_cmd_export", noisy)
    assert (
        cli.main(["export", str(path), "--format", "onnx", "--out", str(tmp_path / "x"), "--json", "-"]) == 0
    )
    out, err = capsys.readouterr()
    assert json.loads(out)["formats"][0]["format"] == "onnx"  # nothing but the JSON
    assert "Original model size" not in err  # without -v: dropped
    argv = ["-v", "export", str(path), "--format", "onnx", "--out", str(tmp_path / "y")]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert "Original model size" not in out and "Original model size" in err  # with -v: on stderr
    assert str(tmp_path / "y") in out  # the command's own lines still on stdout
