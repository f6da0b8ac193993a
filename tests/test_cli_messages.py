"""Small messages: each names the user's file, input or key and says what was expected."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from slimship.cli import main
from slimship.errors import ConfigError, ModelFileError, TargetError
from slimship.exporters import load_onnx

Capture = pytest.CaptureFixture[str]


def _refused(capsys: Capture, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "slimship: error:" in err and "internal error" not in err and "Traceback" not in err
    return err


def _onnx(path: Path, input_shape: list[int], initializer: TensorProto | None = None) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes, inits = [helper.make_node("Identity", ["x"], ["y"])], []
    if initializer is not None:
        inits.append(initializer)
        nodes = [helper.make_node("Add", ["x", initializer.name], ["y"])]
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_generate_on_a_folder_says_what_it_takes(tmp_path: Path, capsys: Capture) -> None:
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    err = _refused(capsys, ["generate", str(folder), "--prompt-ids", "1,2"])
    assert f"{folder}: a folder, not a release bundle" in err
    assert "no such file" not in err and "--task text-generation" in err


def test_huge_declared_initializer_names_the_users_file(tmp_path: Path, capsys: Capture) -> None:
    huge = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1 << 20, 1 << 20], raw_data=b"\0" * 16)
    path = _onnx(tmp_path / "huge_init.onnx", [1, 4], huge)
    with pytest.raises(
        ModelFileError, match=r"huge_init.onnx: initializer 'w' declares shape \[1048576, 1048576\]"
    ):
        load_onnx(path)
    err = _refused(capsys, ["bench", str(path), "--runs", "1", "--warmup", "0"])
    assert f"{path}: initializer 'w'" in err and "slimship-run-" not in err


def test_initializer_with_matching_data_loads(tmp_path: Path) -> None:
    good = helper.make_tensor(
        "w", TensorProto.FLOAT, [1, 4], np.arange(4, dtype=np.float32).tobytes(), raw=True
    )
    typed = helper.make_tensor("w", TensorProto.FLOAT, [1, 4], [0.0, 1.0, 2.0, 3.0])
    for k, tensor in enumerate((good, typed)):
        model = load_onnx(_onnx(tmp_path / f"ok{k}.onnx", [1, 4], tensor))
        assert list(model.graph.initializer[0].dims) == [1, 4]
    short = helper.make_tensor("w", TensorProto.FLOAT, [1, 4], [0.0, 1.0, 2.0, 3.0])
    short.dims[:] = [2, 4]  # a claim the values do not fill
    with pytest.raises(ModelFileError, match=r"declares shape \[2, 4\] \(8 values\) but holds 4"):
        load_onnx(_onnx(tmp_path / "short.onnx", [1, 4], short))


def test_negative_input_dim_is_refused_on_opening(tmp_path: Path, capsys: Capture) -> None:
    path = _onnx(tmp_path / "neg_dim.onnx", [1, -5, 4])
    err = _refused(capsys, ["bench", str(path), "--runs", "1", "--warmup", "0"])
    assert f"{path}: input 'x' declares size -5 for dim 1" in err


def test_wrong_npz_key_names_keys_found_and_expected(tmp_path: Path) -> None:
    from slimship.exporters.common import TensorSpec
    from slimship.inputs import load_npz_inputs

    one = tmp_path / "one.npz"
    np.savez(one, x=np.zeros((1, 4), np.float32))
    with pytest.raises(ConfigError, match=r"one.npz: arrays are named x; expected key in0 \(one per"):
        load_npz_inputs(one, [TensorSpec("x", [1, 4], "float32")])
    two = tmp_path / "two.npz"
    np.savez(two, in0=np.zeros((1, 4), np.float32), in2=np.zeros((1, 4), np.float32))
    with pytest.raises(ConfigError, match=r"arrays are named in0, in2; expected keys in0, in1 \("):
        load_npz_inputs(two, None)


def test_runtime_error_names_the_users_file_not_its_copy(tmp_path: Path) -> None:
    """A runner's load error about the copy in the run folder is reported under the user's path."""
    from slimship.runtimes.execute import _fetch_result

    copy = "/tmp/slimship-run-abc/model.onnx"
    error = f"RunnerLoadError: {copy}: onnxruntime cannot load this model: bad"

    class Transport:
        def get(self, remote: str, local: Path) -> Path:
            local.write_text(json.dumps({"ok": False, "error": error}))
            return local

    target = SimpleNamespace(name="host", transport="local", scheme="local", run_timeout=1.0, python=None)
    proc = SimpleNamespace(returncode=1, stderr="")
    user = tmp_path / "mine" / "model.onnx"
    with pytest.raises(TargetError) as info:
        _fetch_result(Transport(), target, proc, "result.json", tmp_path / "r.json", {copy: user})
    assert f"{user}: onnxruntime cannot load" in str(info.value) and "slimship-run-" not in str(info.value)
