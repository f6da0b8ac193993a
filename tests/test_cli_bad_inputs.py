"""Every CLI command fed bad inputs: exit 2, `slimship: error:` naming the file, no traceback, nothing left.

Each row builds its bad input in a fresh folder from tiny valid files made once per module, runs
`slimship.cli.main` in-process, and compares the whole folder before and after (no partial output, no
temp dirs, no file overwritten). A few rows also run as a real `python -m slimship` subprocess.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from slimship.cli import main

ROOT = Path(__file__).resolve().parents[1]
FAST_BENCH = ["--runs", "1", "--warmup", "0"]


# ------------------------------------------------------------------------------------------ valid files


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny valid file per format (model input: 1x1x8x8 float32)."""
    from slimship.exporters import export_onnx, export_tflite
    from slimship.pipeline.release import ReleaseInputs, write_release

    root = tmp_path_factory.mktemp("valid")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3)).eval()
    x = torch.randn(1, 1, 8, 8)
    files = {ext: root / f"model.{ext}" for ext in ("pt2", "onnx", "tflite")}
    torch.export.save(torch.export.export(model, (x,), strict=False), files["pt2"])
    export_onnx(model, (x,), files["onnx"])
    export_tflite(model, (x,), files["tflite"])
    files["npz"] = root / "inputs.npz"
    np.savez(files["npz"], in0=x.numpy())
    inputs = ReleaseInputs(
        name="tiny", version="0.1.0", slim_module=model, example_inputs=(x,), model_files={},
        reference={"source_sha256": "0" * 64}, slimming={}, parity={}, accuracy={}, latency={}, config={},
    )  # fmt: skip
    files["tar.gz"] = write_release(inputs, root / "rel").tarball
    files["yaml"] = root / "config.yaml"  # the example config as one flow mapping: any cut breaks its syntax
    config = yaml.safe_load((ROOT / "configs" / "example.yaml").read_text())
    config["release"]["out"] = str(root / "never-written")
    files["yaml"].write_text(yaml.safe_dump(config, default_flow_style=True, width=10**6))
    files["targets.yaml"] = root / "targets.yaml"
    files["targets.yaml"].write_text("targets:\n  t: {threads: 1}\n")
    return files


# ------------------------------------------------------------------------------------------ bad bytes


def _corrupt(good: bytes) -> bytes:
    """The valid bytes with 64 0xFF bytes inserted after the first 8 (headers kept, structure broken)."""
    return good[:8] + b"\xff" * 64 + good[8:]


BAD_BYTES: dict[str, Callable[[bytes], bytes]] = {
    "empty": lambda good: b"",
    "truncated": lambda good: good[: len(good) // 2],
    "random": lambda good: np.random.default_rng(0).bytes(max(len(good), 64)),
    "corrupt": _corrupt,
}


def _npz_bytes(tmp: Path, **arrays) -> bytes:
    path = tmp / "scratch.npz"
    np.savez(path, **arrays)
    data = path.read_bytes()
    path.unlink()
    return data


def _object_npz(tmp: Path) -> bytes:
    return _npz_bytes(tmp, in0=np.array([{"x": 1}, None], dtype=object))


def _npy_not_npz(tmp: Path) -> bytes:
    path = tmp / "scratch.npy"
    np.save(path, np.zeros((1, 1, 8, 8), np.float32))
    data = path.read_bytes()
    path.unlink()
    return data


X = np.zeros((1, 1, 8, 8), np.float32)
NPZ_CONTENTS: dict[str, Callable[[Path], bytes]] = {
    "object-array": _object_npz,
    "wrong-key": lambda tmp: _npz_bytes(tmp, x=X),
    "gap-in-keys": lambda tmp: _npz_bytes(tmp, in0=X, in2=X),
    "too-many-inputs": lambda tmp: _npz_bytes(tmp, in0=X, in1=X),
    "no-arrays": lambda tmp: _npz_bytes(tmp),
    "wrong-shape": lambda tmp: _npz_bytes(tmp, in0=np.zeros((1, 3, 8, 8), np.float32)),
    "wrong-rank": lambda tmp: _npz_bytes(tmp, in0=np.zeros((1, 64), np.float32)),
    "wrong-dtype": lambda tmp: _npz_bytes(tmp, in0=X.astype(np.float64)),
    "zero-size": lambda tmp: _npz_bytes(tmp, in0=np.zeros((0, 1, 8, 8), np.float32)),
    "npy-not-npz": _npy_not_npz,
}


# ------------------------------------------------------------------------------------------ rows


@dataclass
class Row:
    """argv with {tokens}: {bad} (the bad input, written as `bad_name`), {out}, or a valid file {onnx} ..."""

    argv: list[str]
    bad_name: str | None = None
    make_bad: Callable[[dict[str, Path], Path], bytes] | None = None  # None: {bad} is a folder
    named: str = "{bad}"  # the path stderr must show
    setup: Callable[[Path, dict[str, str]], None] | None = None
    marks: list = field(default_factory=list)


def _bytes_of(ext: str, kind: str) -> Callable[[dict[str, Path], Path], bytes]:
    return lambda valid, tmp: BAD_BYTES[kind](valid[ext].read_bytes())


def _existing_file(token: str) -> Callable[[Path, dict[str, str]], None]:
    def setup(tmp: Path, paths: dict[str, str]) -> None:
        Path(paths[token]).write_text("keep me\n")

    return setup


def _config_with_out(out: str) -> Callable[[dict[str, Path], Path], bytes]:
    def make(valid: dict[str, Path], tmp: Path) -> bytes:
        config = yaml.safe_load(valid["yaml"].read_text())
        config["release"]["out"] = out.format(tmp=tmp)
        return yaml.safe_dump(config).encode()

    return make


def _config_marks(kind: str) -> list:
    """Marks for a config-file row (none: every kind is a clean error)."""
    return []


def _format_rows() -> dict[str, Row]:
    rows: dict[str, Row] = {}
    for kind in BAD_BYTES:
        for cmd in ("slim", "export", "release"):
            extra = {"slim": ["--out", "{in}/slim.pt2"], "export": ["--out", "{out}"],
                     "release": ["--name", "n", "--version", "1.0.0", "--out", "{out}"]}[cmd]  # fmt: skip
            rows[f"{cmd}-pt2-{kind}"] = Row([cmd, "{bad}", *extra], "model.pt2", _bytes_of("pt2", kind))
        for ext in ("onnx", "tflite"):
            rows[f"bench-{ext}-{kind}"] = Row(
                ["bench", "{bad}", *FAST_BENCH], f"m.{ext}", _bytes_of(ext, kind)
            )
        rows[f"bench-npz-{kind}"] = Row(
            ["bench", "{onnx}", "--inputs", "{bad}", *FAST_BENCH], "in.npz", _bytes_of("npz", kind)
        )
        rows[f"verify-targz-{kind}"] = Row(["verify", "{bad}"], "b.tar.gz", _bytes_of("tar.gz", kind))
        rows[f"run-yaml-{kind}"] = Row(
            ["run", "{bad}", "--out", "{out}"], "c.yaml", _bytes_of("yaml", kind), marks=_config_marks(kind)
        )
        rows[f"bench-targets-yaml-{kind}"] = Row(
            ["bench", "{onnx}", "--targets-file", "{bad}", "--target", "t", *FAST_BENCH],
            "t.yaml",
            _bytes_of("targets.yaml", kind),
            marks=_config_marks(kind),
        )
    return rows


def _npz_rows() -> dict[str, Row]:
    rows = {
        f"bench-npz-{name}": Row(
            ["bench", "{onnx}", "--inputs", "{bad}", *FAST_BENCH], "in.npz", lambda v, t, m=make: m(t)
        )
        for name, make in NPZ_CONTENTS.items()
    }
    rows["bench-tflite-npz-wrong-shape"] = Row(
        ["bench", "{tflite}", "--inputs", "{bad}", *FAST_BENCH],
        "in.npz",
        lambda v, t: NPZ_CONTENTS["wrong-shape"](t),
    )
    return rows


OTHER_ROWS: dict[str, Row] = {
    # folders where files are expected
    "slim-model-is-a-folder": Row(["slim", "{bad}", "--out", "{in}/s.pt2"], "m.pt2"),
    "export-model-is-a-folder": Row(["export", "{bad}", "--out", "{out}"], "m.pt2"),
    "bench-model-is-a-folder": Row(["bench", "{bad}", *FAST_BENCH], "m.onnx"),
    "bench-inputs-is-a-folder": Row(["bench", "{onnx}", "--inputs", "{bad}", *FAST_BENCH], "in.npz"),
    "run-config-is-a-folder": Row(["run", "{bad}"], "c.yaml"),
    "verify-folder-without-manifest": Row(["verify", "{bad}"], "bundle"),
    "slim-out-is-a-folder": Row(
        ["slim", "{pt2}", "--out", "{out}"], named="{out}", setup=lambda tmp, p: Path(p["out"]).mkdir()
    ),
    "bench-json-is-a-folder": Row(
        ["bench", "{onnx}", "--json", "{out}", *FAST_BENCH],
        named="{out}",
        setup=lambda tmp, p: Path(p["out"]).mkdir(),
    ),
    # files where folders are expected (existing files must stay as they are)
    "export-out-is-a-file": Row(
        ["export", "{pt2}", "--out", "{out}"], named="{out}", setup=_existing_file("out")
    ),
    "release-out-is-a-file": Row(
        ["release", "{pt2}", "--name", "n", "--version", "1.0.0", "--out", "{out}"],
        named="{out}",
        setup=_existing_file("out"),
    ),
    "run-release-out-is-a-file": Row(
        ["run", "{bad}"],
        "c.yaml",
        _config_with_out("{tmp}/out"),
        named="{out}",
        setup=_existing_file("out"),
    ),
    "slim-out-folder-is-a-file": Row(
        ["slim", "{pt2}", "--out", "{out}/s.pt2"], named="{out}", setup=_existing_file("out")
    ),
    "bench-json-folder-is-a-file": Row(
        ["bench", "{onnx}", "--json", "{out}/r.json", *FAST_BENCH], named="{out}", setup=_existing_file("out")
    ),
    # missing files
    **{
        f"{cmd}-missing-file": Row(argv, named="{missing}")
        for cmd, argv in (
            ("slim", ["slim", "{missing}.pt2", "--out", "{in}/s.pt2"]),
            ("export", ["export", "{missing}.pt2", "--out", "{out}"]),
            ("release", ["release", "{missing}.pt2", "--name", "n", "--version", "1.0.0", "--out", "{out}"]),
            ("bench", ["bench", "{missing}.onnx", *FAST_BENCH]),
            ("bench-inputs", ["bench", "{onnx}", "--inputs", "{missing}.npz", *FAST_BENCH]),
            ("bench-dense", ["bench", "{onnx}", "--dense", "{missing}.onnx", *FAST_BENCH]),
            ("verify", ["verify", "{missing}.tar.gz"]),
            ("run", ["run", "{missing}.yaml"]),
        )
    },
}


def tiny_model() -> nn.Module:
    """The valid files' architecture, for --model tests.test_cli_bad_inputs:tiny_model."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3))


def not_a_module() -> str:
    return "a string"


def _torch_save_bytes(tmp: Path, value: object) -> bytes:
    path = tmp / "scratch.pt"
    torch.save(value, path)
    data = path.read_bytes()
    path.unlink()
    return data


class Opaque:  # a pickled custom object: torch.load(weights_only=True) refuses it
    pass


FACTORY = ["--model", "tests.test_cli_bad_inputs:tiny_model", "--input-shape", "1", "8", "8"]
INT8_EXPORT = ["export", "{pt2}", "--format", "tflite-int8", "--out", "{out}"]
WEIGHTS: dict[str, tuple[str, Callable[[Path], bytes]]] = {
    "safetensors-corrupt": ("w.safetensors", lambda tmp: b"\x08\x00\x00\x00\x00\x00\x00\x00{not json"),
    "pt-truncated": ("w.pt", lambda tmp: _torch_save_bytes(tmp, tiny_model().state_dict())[:100]),
    "pt-pickled-object": ("w.pt", lambda tmp: _torch_save_bytes(tmp, {"w": Opaque()})),
    "pt-wrong-keys": ("w.pt", lambda tmp: _torch_save_bytes(tmp, {"conv.weight": torch.zeros(1)})),
    "pt-not-a-dict": ("w.pt", lambda tmp: _torch_save_bytes(tmp, [torch.zeros(1)])),
    "wrong-suffix": ("w.txt", lambda tmp: b"weights"),
}
NEW_USER_ROWS: dict[str, Row] = {
    # calibration files are checked like --inputs
    **{
        f"export-calibration-{name}": Row(
            [*INT8_EXPORT, "--calibration", "{bad}"], "c.npz", lambda v, t, m=NPZ_CONTENTS[name]: m(t)
        )
        for name in ("object-array", "wrong-key", "wrong-shape", "wrong-dtype", "zero-size", "npy-not-npz")
    },
    "export-calibration-corrupt": Row(
        [*INT8_EXPORT, "--calibration", "{bad}"], "c.npz", _bytes_of("npz", "corrupt")
    ),
    "export-calibration-is-a-folder": Row([*INT8_EXPORT, "--calibration", "{bad}"], "c.npz"),
    "export-calibration-missing": Row([*INT8_EXPORT, "--calibration", "{missing}.npz"], named="{missing}"),
    # a model as Python code
    "export-factory-not-importable": Row(
        ["export", "--model", "no_such_pkg.mod:f", "--input-shape", "1", "--out", "{out}"],
        named="no_such_pkg.mod",
    ),
    "export-factory-no-colon": Row(
        ["export", "--model", "slimship.models", "--input-shape", "1", "--out", "{out}"],
        named="slimship.models",
    ),
    "export-factory-not-a-module": Row(
        [
            "export",
            "--model",
            "tests.test_cli_bad_inputs:not_a_module",
            "--input-shape",
            "1",
            "--out",
            "{out}",
        ],
        named="not_a_module",
    ),
    "slim-factory-and-pt2": Row(["slim", "{pt2}", *FACTORY, "--out", "{in}/s.pt2"], named="{pt2}"),
    "slim-weights-with-a-pt2": Row(
        ["slim", "{pt2}", "--weights", "{onnx}", "--out", "{in}/s.pt2"], named="{pt2}"
    ),
    "export-weights-missing": Row(
        ["export", *FACTORY, "--weights", "{missing}.pt", "--out", "{out}"], named="{missing}"
    ),
    **{
        f"export-weights-{name}": Row(
            ["export", *FACTORY, "--weights", "{bad}", "--out", "{out}"], file, lambda v, t, m=make: m(t)
        )
        for name, (file, make) in WEIGHTS.items()
    },
    # --json on every command, and targets files for `targets`
    "slim-json-is-a-folder": Row(
        ["slim", "{pt2}", "--out", "{in}/s.pt2", "--json", "{out}"],
        named="{out}",
        setup=lambda tmp, p: Path(p["out"]).mkdir(),
    ),
    "targets-json-folder-missing": Row(["targets", "--json", "{missing}/t.json"], named="{missing}"),
    "targets-file-missing": Row(["targets", "--targets-file", "{missing}.yaml"], named="{missing}"),
    "targets-file-corrupt": Row(
        ["targets", "--targets-file", "{bad}"], "t.yaml", _bytes_of("targets.yaml", "truncated")
    ),
}

ROWS: dict[str, Row] = {**_format_rows(), **_npz_rows(), **OTHER_ROWS, **NEW_USER_ROWS}


# ------------------------------------------------------------------------------------------ harness


def _snapshot(root: Path) -> dict[str, str]:
    """Every entry below root: a folder marker or the sha256 of a file's bytes."""
    state = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        state[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def _prepare(row: Row, valid: dict[str, Path], tmp: Path) -> tuple[list[str], str]:
    """Write the row's inputs into tmp; return its argv and the path stderr must name."""
    inputs = tmp / "in"
    inputs.mkdir()
    paths = {ext.split(".")[0]: str(shutil.copy(valid[ext], inputs)) for ext in ("pt2", "onnx", "tflite")}
    paths.update({"out": str(tmp / "out"), "missing": str(inputs / "missing"), "in": str(inputs)})
    if row.bad_name:
        bad = inputs / row.bad_name
        data = row.make_bad(valid, tmp) if row.make_bad else None
        bad.mkdir() if data is None else bad.write_bytes(data)
        paths["bad"] = str(bad)
    if row.setup:
        row.setup(tmp, paths)
    return [arg.format(**paths) for arg in row.argv], row.named.format(**paths)


PROGRESS = ("… ", "✓ ", "note: ")  # what may precede the error on stderr: steps that ran, notes


def _check_error(code: int, err: str, named: str) -> None:
    assert code == 2, err
    before, marker, message = err.partition("slimship: error:")
    assert marker, err
    assert all(line.startswith(PROGRESS) for line in before.splitlines()), err
    assert named in message, f"the error does not name {named}: {err}"
    assert "Traceback" not in err and "internal error" not in err, err


def _row_params() -> list:
    return [pytest.param(row, id=name, marks=row.marks) for name, row in ROWS.items()]


@pytest.mark.parametrize("row", _row_params())
def test_bad_input_is_a_clean_error(row: Row, valid, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # a default output folder (e.g. artifacts/) would show in the snapshot
    argv, named = _prepare(row, valid, tmp_path)
    before = _snapshot(tmp_path)
    code = main(argv)
    _check_error(code, capsys.readouterr().err, named)
    assert _snapshot(tmp_path) == before  # nothing written, nothing overwritten, no temp folders


SUBPROCESS_ROWS = [
    "bench-onnx-random",
    "verify-targz-truncated",
    "bench-npz-object-array",
    "export-out-is-a-file",
]


@pytest.mark.parametrize("name", SUBPROCESS_ROWS)
def test_bad_input_through_the_real_command(name: str, valid, tmp_path) -> None:
    argv, named = _prepare(ROWS[name], valid, tmp_path)
    before = _snapshot(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "slimship", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    _check_error(proc.returncode, proc.stderr, named)
    assert proc.stderr.count("\n") <= 3, proc.stderr  # a message, not a dump
    assert _snapshot(tmp_path) == before


def test_an_unexpected_exception_is_an_internal_error(monkeypatch, capsys, tmp_path) -> None:
    import slimship.cli as cli

    def broken(args):
        raise RuntimeError("boom in the verifier")

    monkeypatch.setattr(cli, "_cmd_verify", broken)
    assert cli.main(["verify", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("slimship: internal error: RuntimeError: boom in the verifier")
    assert "run with -v for the traceback; please report" in err and "Traceback" not in err
    assert cli.main(["-v", "verify", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "boom in the verifier" in err
