from __future__ import annotations

import numpy as np
import onnx
import pytest

from slimship.runtimes.alignment import (
    build_layer_onnx,
    derive_multiple,
    measure_alignment,
    round_channels_up,
)
from slimship.runtimes.runners import runner_for
from slimship.runtimes.targets import BUILTIN_TARGETS


@pytest.mark.parametrize(
    ("kept", "multiple", "total", "expected"),
    [(29, 8, 64, 32), (32, 8, 64, 32), (61, 8, 62, 62), (5, 1, 9, 5), (0, 8, 16, 0), (1, 4, 3, 3)],
)
def test_round_channels_up(kept, multiple, total, expected):
    assert round_channels_up(kept, multiple, total) == expected


def test_round_channels_up_rejects_kept_beyond_total():
    with pytest.raises(ValueError, match="kept=9"):
        round_channels_up(9, 4, 8)


def test_derive_multiple_finds_the_staircase():
    channels = list(range(24, 65))
    stairs = [1.0 + 0.2 * ((c + 7) // 8) for c in channels]  # flat inside blocks of 8, jumps after each
    assert derive_multiple(channels, stairs)[0] == 8
    linear = [0.01 * c for c in channels]  # every channel costs the same: no multiple pays
    assert derive_multiple(channels, linear)[0] is None
    flat = [1.0 for _ in channels]  # overhead-bound: nothing to gain either
    multiple, scores = derive_multiple(channels, flat)
    assert multiple is None and scores[8] == {"roundup": 1.0, "step": 1.0}


@pytest.mark.parametrize("op", ["conv", "linear"])
def test_layer_models_have_the_requested_channels(tmp_path, op):
    path = build_layer_onnx(tmp_path / f"{op}.onnx", op, in_channels=6, out_channels=11, spatial=5)
    onnx.checker.check_model(onnx.load(str(path)))
    x = np.ones((1, 6, 5, 5) if op == "conv" else (5, 6), np.float32)
    (y,) = runner_for(path).run([x])
    assert y.shape == ((1, 11, 5, 5) if op == "conv" else (5, 11))


def test_measure_alignment_times_every_count(tmp_path):
    result = measure_alignment(
        BUILTIN_TARGETS["mobile-1t"],
        op="linear",
        channels=range(6, 11),
        in_channels=8,
        spatial=4,
        runs=3,
        warmup=1,
        workdir=tmp_path,
    )
    assert result.channels == [6, 7, 8, 9, 10] and len(result.p50_ms) == 5 and min(result.p50_ms) > 0
    assert set(result.scores) <= {16, 8, 4, 2} and 2 in result.scores
    assert result.multiple in (None, *result.scores)
    assert list(tmp_path.iterdir()) == []
