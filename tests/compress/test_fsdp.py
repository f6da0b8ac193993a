"""Sparsifiers on a model sharded with FSDP2 (fully_shard): 2 gloo processes, one launch (fsdp_sparsifier)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.fsdp import fully_shard

from slimship.cli import main
from slimship.compress import compress, sparsifier
from slimship.compress.device import training_strategy
from slimship.compress.sparsifier import SPARSIFIERS
from slimship.errors import CompressionError, ConfigError
from slimship.pipeline.config import merge, validate
from tests.compress.gloo import single_process_group
from tests.compress.test_base import example, one_thread, tiny_data, tiny_model
from tests.parallel import free_port
from tests.pipeline.test_torchrun import _config, _initializers

assert one_thread  # autouse fixture

ROOT = Path(__file__).resolve().parents[2]
SLOW = pytest.mark.slow  # a torchrun launch of two processes (~20-90 s by load)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("fsdp")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun is not None
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--nproc_per_node=2", "--master_port", str(free_port())]
    cmd += ["-m", "tests.compress.fsdp_sparsifier", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"fsdp-rank{r}.json").read_text()) for r in (0, 1)]


@SLOW
def test_every_sparsifier_under_fsdp_decides_as_one_process_and_ddp(ranks: list[dict]) -> None:
    """Every registered sparsifier, built on the plain model then sharded: its parameters are DTensors; its
    decisions at every step equal on both ranks, equal to DDP's and to one process's on the same global
    batches; decided zeros hold in the shards after every optimizer step; the gathered full state dict has
    exactly the decided groups zero, equals DDP's weights and slims exactly."""
    from tests.compress import ddp_sparsifier

    methods = sorted(ddp_sparsifier.METHODS)
    assert methods == sorted(SPARSIFIERS)  # every user-loop sparsifier is covered
    fsdp = [r["fsdp"] for r in ranks]
    for name in methods:
        single = ddp_sparsifier.run(name, rank=0, world=1)[0]
        assert set(fsdp[0][name]["params"]) == {"DTensor"}
        assert fsdp[0][name]["changes"] == fsdp[1][name]["changes"] == single, name
        assert ranks[0]["ddp"][name]["changes"] == ranks[1]["ddp"][name]["changes"] == single, name
        assert all(fsdp[0][name]["held"]) and all(fsdp[1][name]["held"]), name
        assert len(fsdp[0][name]["held"]) == ddp_sparsifier.STEPS
        decided = fsdp[0][name]["decided_zero"]
        assert fsdp[0][name]["zeros"] == decided, name
        assert (len(decided) == 0) == (name == "csgd"), name  # csgd merges clusters instead
        full = ranks[0]["full"][name]
        assert full["slims_exactly"], name
        assert full["max_diff_from_ddp"] <= 1e-6, name
    assert ranks[1]["full"] == {}  # rank 0 alone holds the gathered state dict


@SLOW
def test_uneven_shards_decide_as_one_process(ranks: list[dict]) -> None:
    """7 and 11 channels over 2 ranks (4 + 3, 6 + 5 rows; C-SGD clusters and magnitude's consumer norms span
    both ranks): every sparsifier's decisions at every step equal one process's; zeros hold; the gathered
    weights equal one process's up to the order of summation."""
    for name in sorted(SPARSIFIERS):
        runs = [r["uneven"][name] for r in ranks]
        assert runs[0]["changes"] == runs[1]["changes"] == runs[0]["single"], name
        final = runs[0]["changes"][-1][1]
        assert final["clusters"] if name == "csgd" else final["zero"], name  # decisions were taken
        assert runs[0]["max_diff"] <= 1e-4, name  # gathered weights: one process's up to float32 rounding
        assert all(runs[0]["held"]) and all(runs[1]["held"]), name


@SLOW
def test_build_order_under_fsdp(ranks: list[dict]) -> None:
    """Built on an already sharded model: refused, saying to build first, then shard. Resumed from each
    rank's own saved state into a fresh sparsifier built before sharding: the same decisions; a state that
    holds another rank's parameter chunks (drop's snapshots, simguided's saved consumers) is refused."""
    for r in ranks:
        for name, message in r["after"].items():
            assert "already sharded" in message and "build the sparsifier on the plain model first" in message
            assert r["resumed"][name]["changes"] == r["fsdp"][name]["changes"], name
        refused = {n: v["refused_foreign"] for n, v in r["resumed"].items()}
        for name in ("drop", "simguided"):
            assert "every rank saves and loads its own sparsifier state" in refused[name], name
        assert {n for n, v in refused.items() if v == "no local state"} == {
            "csgd",
            "hesso",
            "hspg",
            "magnitude",
        }


@SLOW
def test_slimship_loop_under_strategy_fsdp(ranks: list[dict]) -> None:
    """compress(name) under training_strategy("fsdp") trains a sharded copy (one per run) and returns a plain
    model with DDP's decisions and weights, which slims exactly; a method whose hooks need a plain model
    (lorita) is refused under fsdp, naming the methods that run."""
    for r in ranks:
        loop = r["loop"]
        for name in ("hesso", "csgd"):
            fsdp, ddp = loop[name]["fsdp"], loop[name]["ddp"]
            assert (fsdp["sharded_copies"], ddp["sharded_copies"]) == (1, 0)
            assert fsdp["types"] == ddp["types"] == ["Parameter"]
            assert fsdp["removable"] == ddp["removable"] == 0.5
            assert fsdp["per_space"] == ddp["per_space"]
            assert loop[name]["max_diff"] <= 1e-6
            assert loop[name]["slims_exactly"]
        assert "'lorita' does not train under strategy fsdp" in loop["refused"]
        assert "hesso" in loop["refused"] and "use strategy ddp" in loop["refused"]


@SLOW
def test_slimship_run_with_train_strategy_fsdp(tmp_path: Path) -> None:
    """`torchrun -m slimship run` with ``train.strategy: fsdp`` (dense training and hesso on FSDP2 shards,
    files on disk): one verified bundle, the same kept channels and weights (up to rounding) as one process
    over the same global batches."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    folder = tmp_path / "p"
    train = {"epochs": 1, "lr": 0.01, "device": "cpu"}
    two = _config(folder, "fsdp_run", "out2", batch_size=16, train={**train, "strategy": "fsdp"})
    one = _config(folder, "fsdp_run", "out1", batch_size=32, train=train)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{folder}", "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--nproc_per_node=2", "--master_port", str(free_port())]
    done = subprocess.run(
        [*cmd, "-m", "slimship", "run", str(two), "--json", "-"],
        capture_output=True, text=True, env=env, timeout=600, cwd=folder,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)["summary"]
    assert summary["ranks"] == {"processes": 2, "same_model_on_every_rank": True}
    assert main(["verify", str(folder / "out2" / "tiny-0.1.0")]) == 0
    assert main(["run", str(one), "--json", str(folder / "one.json")]) == 0
    reference = json.loads((folder / "one.json").read_text())["summary"]
    assert summary["compress"]["per_space"] == reference["compress"]["per_space"]
    assert summary["params"] == reference["params"] and summary["params"][1] < summary["params"][0]
    got = _initializers(folder / "out2" / "tiny-0.1.0" / "model.onnx")
    expected = _initializers(folder / "out1" / "tiny-0.1.0" / "model.onnx")
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in expected.items()}
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-5, err_msg=name)


def test_train_strategy_in_the_config() -> None:
    """``train.strategy`` is ddp (default) or fsdp; anything else is refused naming the key and the choices;
    outside torchrun the strategy changes nothing (one process trains the model itself)."""
    base = {"model": {"factory": "slimship.models:lenet5", "input_shape": [1, 8, 8]}}
    assert validate(base).train is None or validate(base).train.strategy == "ddp"
    assert validate(merge(base, {"train": {"strategy": "fsdp"}})).train.strategy == "fsdp"
    with pytest.raises(ConfigError, match=r"'train\.strategy' is 'zero'"):
        validate(merge(base, {"train": {"strategy": "zero"}}))
    with (
        pytest.raises(ConfigError, match="training strategy 'zero' is not one of ddp, fsdp"),
        training_strategy("zero"),
    ):
        pass
    with training_strategy("fsdp"):
        result = compress("hesso", tiny_model(), example(), tiny_data(), epochs=2, periods=1)
    assert {type(p) for p in result.model.parameters()} == {torch.nn.Parameter}


def test_an_already_sharded_model_is_refused_in_process(tmp_path: Path) -> None:
    """One gloo process: fully_shard makes DTensor parameters; building a sparsifier or calling compress on
    that model is refused, saying to build on the plain model first (no raw deepcopy AssertionError)."""
    with single_process_group(tmp_path):
        model = fully_shard(tiny_model())
        assert {type(p).__name__ for p in model.parameters()} == {"DTensor"}
        with pytest.raises(CompressionError, match="build the sparsifier on the plain model first"):
            sparsifier("hesso", model, example(), total_steps=10)
        with pytest.raises(CompressionError, match=r"already sharded.*pass the plain model"):
            compress("hesso", model, example(), tiny_data(), epochs=1)
