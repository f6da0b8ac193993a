"""compress/device.py (device names, torchrun variables) and the device random states of checkpoints."""

from __future__ import annotations

import io
import logging
import random

import numpy as np
import pytest
import torch

from slimship.compress import training
from slimship.compress.device import (
    available_devices,
    backend_for,
    device_problem,
    resolve_device,
    torchrun_env,
)
from slimship.compress.training import rng_state, set_rng_state
from slimship.errors import ConfigError

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without cuda")
NO_MPS = pytest.mark.skipif(torch.backends.mps.is_available(), reason="checks the path without mps")


def _draws() -> tuple[list[float], float, float]:
    return torch.rand(4).tolist(), random.random(), float(np.random.rand())


@pytest.mark.parametrize("spec", ["auto", "cpu"])
def test_auto_and_cpu_resolve_here(spec: str) -> None:
    assert device_problem(spec) is None
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device(spec).type == (expected if spec == "auto" else "cpu")


@NO_CUDA
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_on_a_machine_without_it_is_refused_listing_what_exists(spec: str) -> None:
    problem = device_problem(spec)
    assert problem is not None and f"no {spec}" in problem and "available: cpu" in problem
    with pytest.raises(ConfigError, match="available: cpu"):
        resolve_device(spec)


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "CPU", "cuda:", ""])
def test_unknown_device_names_are_refused(spec: str) -> None:
    assert "not a device name" in device_problem(spec)


def test_torchrun_env_needs_all_three_variables() -> None:
    env = torchrun_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (env.rank, env.world_size, env.local_rank) == (1, 2, 1)
    assert torchrun_env({"RANK": "1", "WORLD_SIZE": "2"}) is None
    assert torchrun_env({"RANK": "a", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}) is None
    assert backend_for(torch.device("cpu")) == "gloo" and backend_for(torch.device("cuda", 0)) == "nccl"
    assert available_devices()[0] == "cpu"


def test_rng_state_round_trips_through_a_weights_only_checkpoint() -> None:
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    buffer = io.BytesIO()
    torch.save({"rng": rng_state(torch.device("cpu"))}, buffer)
    expected = _draws()
    _draws()  # move every stream on
    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=True)["rng"])
    assert _draws() == expected


@NO_CUDA
@NO_MPS
@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_a_device_state_for_a_missing_device_is_skipped_with_a_warning(device, caplog) -> None:
    """A checkpoint written on a GPU resumes on CPU: its CPU streams are restored, the device one skipped."""
    state = rng_state()
    assert "cuda" not in state and "mps" not in state  # a CPU run saves CPU streams only
    expected = _draws()
    state[device] = [torch.get_rng_state()] if device == "cuda" else torch.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="slimship.compress.training"):
        set_rng_state(state)
    assert _draws() == expected
    assert f"holds a {device} random state but this machine has no {device}" in caplog.text


def test_a_device_state_is_restored_where_the_device_exists(monkeypatch) -> None:
    restored = []
    monkeypatch.setitem(training.DEVICE_RNG, "cuda", (lambda: True, restored.append))
    saved = [torch.get_rng_state(), torch.get_rng_state()]
    set_rng_state(rng_state() | {"cuda": saved})
    assert len(restored) == 1 and all(torch.equal(a, b) for a, b in zip(restored[0], saved, strict=True))
