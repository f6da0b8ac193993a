"""The .npz inputs loader: in0..inN in numeric order, checked against the model's input specs."""

from __future__ import annotations

import numpy as np
import pytest

from slimship.errors import ConfigError
from slimship.exporters.common import TensorSpec
from slimship.inputs import check_inputs, load_npz_inputs


def test_eleven_inputs_come_back_in_numeric_order(tmp_path) -> None:
    path = tmp_path / "in.npz"
    np.savez(path, **{f"in{i}": np.full((1, 2), i, np.float32) for i in range(11)})
    inputs = load_npz_inputs(path)
    assert [int(x[0, 0]) for x in inputs] == list(range(11))


def test_batch_and_dynamic_dims_are_free_the_others_are_checked(tmp_path) -> None:
    path = tmp_path / "in.npz"
    np.savez(path, in0=np.zeros((4, 3, 7), np.float32), in1=np.zeros((4,), np.int64))
    specs = [TensorSpec("x", [1, 3, "seq"], "float32"), TensorSpec("ids", ["batch"], "int64")]
    assert [x.shape for x in load_npz_inputs(path, specs)] == [(4, 3, 7), (4,)]
    wrong = [TensorSpec("x", [1, 5, "seq"], "float32"), specs[1]]
    with pytest.raises(
        ConfigError, match=r"in\.npz: in0 has shape \[4, 3, 7\], the model expects \[1, 5, 'seq'\]"
    ):
        load_npz_inputs(path, wrong)
    with pytest.raises(ConfigError, match=r"in1 is int64, the model expects int32.*model input 'ids'"):
        check_inputs(load_npz_inputs(path), [specs[0], TensorSpec("ids", ["b"], "int32")], str(path))


def test_a_pickle_is_never_loaded(tmp_path) -> None:
    import pickle

    marker = tmp_path / "ran"
    path = tmp_path / "in.npz"
    path.write_bytes(pickle.dumps(_Boom(str(marker))))
    with pytest.raises(ConfigError, match=r"in\.npz: not a readable \.npz file"):
        load_npz_inputs(path)
    assert not marker.exists()


class _Boom:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))
