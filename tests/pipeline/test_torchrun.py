"""`slimship run` under torchrun: shards, rank 0 publishing alone, the others waiting for its word.

The fast tests fake a rank of a 2-process job (the collectives replaced, no process spawned); the slow
one runs `torchrun --nproc_per_node=2 -m slimship run` and compares with one process over the same
global batches."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from slimship.cli import main
from slimship.pipeline import run as run_module
from tests.parallel import free_port

ROOT = Path(__file__).resolve().parents[2]

FACTORY = textwrap.dedent(
    """
    import numpy as np
    import torch
    from torch import nn

    from slimship.data import Batches


    def model():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4),
        )


    def data(batch_size: int = 16, n: int = 128):
        rng = np.random.default_rng(0)
        y = rng.integers(0, 4, n)
        x = (rng.normal(0, 0.5, (n, 1, 8, 8)) + (y - 1.5)[:, None, None, None]).astype(np.float32)
        return Batches(x, y, batch_size, shuffle=True, seed=0), Batches(x[:64], y[:64], 32)


    def stream(batch_size: int = 16):
        train, test = data(batch_size)
        return (b for b in train), test


    def broken_on_rank_0(batch_size: int = 16):
        import dataclasses
        import os

        from slimship.errors import VerificationError
        from slimship.exporters import registry

        def fails(request, path):
            raise VerificationError(f"{path}: ONNX outputs differ from PyTorch (injected on rank 0)")

        if os.environ["RANK"] == "0":
            registry.FORMATS["onnx"] = dataclasses.replace(registry.FORMATS["onnx"], exporter=fails)
        return data(batch_size)


    def flaky(batch_size: int = 16):
        import os

        if os.environ["RANK"] == "1":
            raise OSError("rank 1 cannot read its shard")
        return data(batch_size)
    """
)


def _config(folder: Path, module: str, out: str, batch_size: int = 16, **changes) -> Path:
    """config.yaml beside `module`.py: dense training, hesso over 4 epochs, onnx only, the local host."""
    folder.mkdir(exist_ok=True)
    (folder / f"{module}.py").write_text(FACTORY)
    config = {
        "model": {"factory": f"{module}:model", "input_shape": [1, 8, 8]},
        "data": {"factory": f"{module}:data", "kwargs": {"batch_size": batch_size}},
        "train": {"epochs": 1, "lr": 0.01, "device": "cpu"},
        "compress": {
            "method": "hesso",
            "options": {"target": 0.5, "epochs": 4, "warmup_epochs": 1, "pruning_epochs": 2, "lr": 0.05},
        },
        "export": {"formats": ["onnx"]},
        "targets": ["host"],
        "bench": {"runs": 3, "warmup": 0},
        "gates": {"max_accuracy_drop": None, "min_agreement": None},
        "release": {"name": "tiny", "version": "0.1.0", "out": str(folder / out)},
        **changes,
    }
    path = folder / f"{out}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


@pytest.fixture
def fake_rank(monkeypatch):
    """Make this process rank `r` of 2 for `slimship run`; returns what it broadcast (rank 0's word)."""
    said: list[object] = []

    def become(r: int, word: bool = True) -> list[object]:
        for name, value in (("RANK", r), ("WORLD_SIZE", 2), ("LOCAL_RANK", r)):
            monkeypatch.setenv(name, str(value))
        monkeypatch.setattr(run_module, "process_group", lambda device: contextlib.nullcontext())
        monkeypatch.setattr(run_module, "rank", lambda: r)
        monkeypatch.setattr(run_module, "world_size", lambda: 2)
        monkeypatch.setattr(run_module, "gather_object", lambda value: [value, value])

        def broadcast(value: object) -> object:
            said.append(value)
            return value if r == 0 else word

        monkeypatch.setattr(run_module, "broadcast_object_from_rank0", broadcast)
        return said

    return become


def test_unshardable_train_data_is_refused_before_training(tmp_path, fake_rank, capsys) -> None:
    config = _config(tmp_path / "p", "torchrun_stream", "out")
    text = json.loads(config.read_text())
    text["data"]["factory"] = "torchrun_stream:stream"
    config.write_text(json.dumps(text))
    fake_rank(0)
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert "slimship: error: rank 0: 'data.factory' returned train data of type generator" in err
    assert "return slimship.data.Batches" in err and "train dense model" not in err
    assert not (tmp_path / "p" / "out").exists()


#: (data factory, rank) -> what that rank prints. A refusal of the train data is printed by every rank that
#: makes it (a factory may return other data on another rank: rank 0 alone cannot speak for it); an error
#: of a rank's own is printed by that rank (rank 0 of the flaky job trains on)
RANK_ERRORS = {
    ("stream", 0): "'data.factory' returned train data of type generator",
    ("stream", 1): "'data.factory' returned train data of type generator",
    ("flaky", 1): "'data.factory' torchrun_flaky_1:flaky raised OSError with data.kwargs",
}


@pytest.mark.parametrize("case", RANK_ERRORS, ids=str)
def test_a_data_error_is_printed_by_the_rank_that_has_it(tmp_path, fake_rank, capsys, case) -> None:
    factory, r = case
    module = f"torchrun_{factory}_{r}"
    config = _config(tmp_path / "p", module, "out")
    text = json.loads(config.read_text())
    text["data"]["factory"] = f"{module}:{factory}"
    config.write_text(json.dumps(text))
    fake_rank(r)
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    expected = RANK_ERRORS[case]
    assert err.count("slimship: error:") == (1 if expected else 0), err
    assert not expected or f"slimship: error: rank {r}: {expected}" in err  # the rank names itself
    assert not (tmp_path / "p" / "out").exists()


@pytest.mark.parametrize("word", [True, False])
def test_other_ranks_train_publish_nothing_and_follow_rank_0s_word(tmp_path, fake_rank, capsys, word) -> None:
    config = _config(tmp_path / "p", f"torchrun_rank1_{word}", "out")
    said = fake_rank(1, word)
    code = main(["run", str(config), "--json", "-"])
    out, err = capsys.readouterr()
    assert said == [None]  # it waited for rank 0's word once, after training
    assert not (tmp_path / "p" / "out").exists()
    assert out == ""  # no JSON, no table: rank 0 speaks for the job
    if word:
        assert code == 0 and err == ""
    else:  # it stops cleanly with its own word: torchrun names rank 0, the one that failed, alone
        assert code == 0 and "slimship: stopped: rank 1: rank 0 failed after training" in err
        assert "slimship: error:" not in err


def test_rank_0_tells_the_others_when_its_gate_fails(tmp_path, fake_rank, capsys) -> None:
    config = _config(tmp_path / "p", "torchrun_rank0", "out", gates={"min_speedup": 1000.0})
    said = fake_rank(0)
    assert main(["run", str(config)]) == 3
    assert said == [False]
    assert not (tmp_path / "p" / "out" / "tiny-0.1.0").exists()


def _initializers(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}


@pytest.mark.slow  # two torchrun processes, then one run in this process: ~50 s on a loaded machine
def test_torchrun_two_processes_write_one_bundle_equal_to_one_process(tmp_path) -> None:
    """2 gloo ranks with batches of 16 each: one verified bundle, rank 0's JSON only, every rank ending
    with the same model, and that model equal to one process's over the same global batches of 32."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun is not None
    folder = tmp_path / "p"
    two = _config(folder, "torchrun_slow", "out2", batch_size=16)
    one = _config(folder, "torchrun_slow", "out1", batch_size=32)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{folder}", "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--nproc_per_node=2", "--master_port", str(free_port())]
    done = subprocess.run(
        [*cmd, "-m", "slimship", "run", str(two), "--json", "-"],
        capture_output=True, text=True, env=env, timeout=300, cwd=folder,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)["summary"]  # one JSON document: rank 1 printed nothing
    assert summary["ranks"] == {"processes": 2, "same_model_on_every_rank": True}
    assert sorted(p.name for p in (folder / "out2").iterdir()) == ["tiny-0.1.0", "tiny-0.1.0.tar.gz"]
    assert main(["verify", str(folder / "out2" / "tiny-0.1.0")]) == 0

    assert main(["run", str(one), "--json", str(folder / "one.json")]) == 0  # in this process: faster
    reference = json.loads((folder / "one.json").read_text())["summary"]
    assert reference["ranks"] == {"processes": 1, "same_model_on_every_rank": True}
    assert summary["compress"]["per_space"] == reference["compress"]["per_space"]
    assert summary["params"] == reference["params"] and summary["params"][1] < summary["params"][0]
    got = _initializers(folder / "out2" / "tiny-0.1.0" / "model.onnx")
    expected = _initializers(folder / "out1" / "tiny-0.1.0" / "model.onnx")
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in expected.items()}
    for name, value in expected.items():  # the same channels kept, the same weights up to rounding
        np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.slow  # two torchrun processes: ~30 s on a loaded machine
def test_torchrun_names_the_rank_whose_export_failed(tmp_path) -> None:
    """Rank 0's export fails (after training on both ranks): rank 0 says `rank 0: ...` and exits 2, rank 1
    says it stopped because rank 0 failed and exits 0, so torchrun's summary names rank 0 alone."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun is not None
    folder = tmp_path / "p"
    config = _config(folder, "torchrun_broken", "out")
    text = json.loads(config.read_text())
    text["data"]["factory"] = "torchrun_broken:broken_on_rank_0"
    config.write_text(json.dumps(text))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{folder}", "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--nproc_per_node=2", "--master_port", str(free_port())]
    done = subprocess.run(
        [*cmd, "--tee", "2", "-m", "slimship", "run", str(config)],
        capture_output=True, text=True, env=env, timeout=300, cwd=folder,
    )  # fmt: skip
    err = done.stderr
    assert done.returncode != 0
    said = "slimship: error: rank 0: 1 of 1 formats failed"
    assert said in err and "injected on rank 0" in err, err[-3000:]
    assert "slimship: stopped: rank 1: rank 0 failed after training" in err
    assert "slimship: error: rank 1" not in err
    failures = err[err.find("Failures:") :] if "Failures:" in err else err[err.find("Root Cause") :]
    assert "rank      : 0" in failures and "rank      : 1" not in failures, err[-3000:]
    assert not (folder / "out").exists()


def test_rank_alone_does_not_make_a_torchrun_rank(tmp_path, monkeypatch, capsys) -> None:
    """RANK without WORLD_SIZE and LOCAL_RANK is one process: its config error is printed."""
    for name in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "1")
    config = tmp_path / "bad.yaml"
    config.write_text("model: {factory: 'x:y', input_shape: [4]}\nunknown_key: 1\n")
    assert main(["run", str(config)]) == 2
    assert "slimship: error:" in capsys.readouterr().err
