"""Model inputs from an .npz file: the one loader every command uses, checked against the model's inputs.

An inputs file holds plain numeric arrays named in0, in1, ... (one per model input, in order). It is read
with `allow_pickle=False`, so pickled Python objects are never loaded; object arrays, unknown keys, a count,
rank, shape or dtype that does not fit the model, and empty arrays are refused with a ConfigError that
names the file and the key.
"""

from __future__ import annotations

import re
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from slimship.errors import ConfigError, ModelFileError

if TYPE_CHECKING:
    from slimship.exporters._common import TensorSpec

_KEY = re.compile(r"^in(0|[1-9][0-9]*)$")
_NPZ_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error)


def load_npz_inputs(path: str | Path, specs: Sequence[TensorSpec] | None = None) -> list[np.ndarray]:
    """Arrays in0..inN of an .npz, in order; checked against the model's input `specs` when given."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p}: is a folder; --inputs takes an .npz file with arrays in0, in1, ...")
    if not p.is_file():
        raise ConfigError(f"{p}: no such inputs file")
    arrays = _read_npz(p)
    _check_keys(p, list(arrays))
    inputs = [arrays[f"in{i}"] for i in range(len(arrays))]
    for i, value in enumerate(inputs):
        if value.size == 0:
            raise ConfigError(f"{p}: in{i} has shape {list(value.shape)} with no elements; give real inputs")
    if specs is not None:
        check_inputs(inputs, specs, str(p))
    return inputs


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ConfigError(f"{path}: a single .npy array, not an .npz archive of in0, in1, ...")
        with data:
            return {key: data[key] for key in data.files}
    except _NPZ_READ_ERRORS as exc:
        if "Object arrays" in str(exc):
            raise ConfigError(
                f"{path}: holds object arrays (pickled Python objects), which slimship never loads; "
                "save plain numeric arrays with numpy.savez"
            ) from None
        raise ConfigError(
            f"{path}: not a readable .npz file ({type(exc).__name__}: {str(exc)[:200]}); the file is "
            "corrupt, truncated or of another format: save the inputs again with numpy.savez"
        ) from None


def _check_keys(path: Path, keys: list[str]) -> None:
    if not keys:
        raise ConfigError(f"{path}: holds no arrays; expected in0, in1, ... (one per model input)")
    wrong = sorted(k for k in keys if not _KEY.match(k))
    expected = {f"in{i}" for i in range(len(keys))}
    if wrong or set(keys) != expected:
        raise ConfigError(
            f"{path}: arrays are named {sorted(keys)}; expected in0..in{len(keys) - 1} "
            "(one per model input, in order)"
        )


def check_inputs(inputs: Sequence[np.ndarray], specs: Sequence[TensorSpec], where: str) -> None:
    """Refuse inputs whose count, rank, non-batch dims or dtype differ from the model's inputs."""
    if len(inputs) != len(specs):
        raise ConfigError(
            f"{where}: holds {len(inputs)} input array(s), the model takes {len(specs)} "
            f"({', '.join(s.name for s in specs)})"
        )
    for i, (value, spec) in enumerate(zip(inputs, specs, strict=True)):
        problem = _spec_problem(value, spec)
        if problem:
            raise ConfigError(f"{where}: in{i} {problem} (model input {spec.name!r})")


def fed_as_float(value: np.ndarray, spec: TensorSpec) -> bool:
    """A float array for a quantised integer input (full-int8 .tflite): the runner quantises it with the
    input's scale and zero point."""
    return getattr(spec, "quantization", None) is not None and np.dtype(value.dtype).kind == "f"


def _spec_problem(value: np.ndarray, spec: TensorSpec) -> str | None:
    if np.dtype(value.dtype) != np.dtype(spec.dtype) and not fed_as_float(value, spec):
        return f"is {value.dtype}, the model expects {spec.dtype}: save it as {spec.dtype}"
    if len(value.shape) != len(spec.shape):
        return f"has shape {list(value.shape)}, the model expects rank {len(spec.shape)}: {spec.shape}"
    fixed = [(got, want) for got, want in zip(value.shape[1:], spec.shape[1:]) if isinstance(want, int)]
    if any(want > 0 and got != want for got, want in fixed):
        return f"has shape {list(value.shape)}, the model expects {spec.shape} (first dim: batch)"
    return None


def model_input_specs(path: str | Path) -> list[TensorSpec]:
    """The input specs of an .onnx, .tflite, .pte or .pt2 file, read here; ModelFileError if unreadable."""
    from slimship.exporters._common import check_model_file

    p = Path(path)
    check_model_file(p)
    if p.suffix == ".onnx":
        from slimship.exporters.onnx_export import onnx_tensor_specs

        return onnx_tensor_specs(p)[0]
    if p.suffix == ".tflite":
        from slimship.exporters.tflite_compat import tensor_specs

        return tensor_specs(p)[0]
    if p.suffix == ".pte":
        return pte_input_specs(p)
    if p.suffix == ".pt2":
        from slimship.exporters._common import TensorSpec
        from slimship.loading import load_program

        return [TensorSpec(i.name, list(i.shape), str(i.dtype).removeprefix("torch."))
                for i in load_program(p).inputs]  # fmt: skip
    raise ModelFileError(f"{p}: unknown model format {p.suffix!r}; expected .onnx, .tflite, .pte or .pt2")


# ExecuTorch ScalarType codes (c10) of the dtypes a model input can have.
_PTE_DTYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16", 6: "float32",
               7: "float64", 11: "bool"}  # fmt: skip


def pte_input_specs(path: Path) -> list[TensorSpec]:
    """Inputs of a .pte's forward method. Its sizes are the memory-planned upper bounds, so a first dim
    above 1 is reported as a dynamic batch (`batch<=N`)."""
    from slimship.exporters._common import TensorSpec, open_model_runner

    method = open_model_runner(path, runtime="executorch").method
    meta = method.metadata
    specs = []
    for i in range(meta.num_inputs()):
        info = meta.input_tensor_meta(i)
        shape: list[int | str] = [int(d) for d in info.sizes()]
        if shape and isinstance(shape[0], int) and shape[0] > 1:
            shape[0] = f"batch<={shape[0]}"
        dtype = _PTE_DTYPES.get(int(info.dtype()))
        if dtype is None:
            raise ModelFileError(
                f"{path}: input {i} has an ExecuTorch dtype code {info.dtype()} slimship cannot feed"
            )
        specs.append(TensorSpec(f"input_{i}", shape, dtype))
    return specs


def load_calibration(
    path: str | Path, specs: Sequence[TensorSpec] | None = None, batch: int = 1
) -> list[tuple[np.ndarray, ...]]:
    """Calibration samples from an .npz of in0, in1, ... (samples along the first dim of every array), as
    tuples of `batch` samples (the model's batch; a remainder is left out); ConfigError when the arrays
    disagree on the number of samples or hold fewer than one batch."""
    arrays = load_npz_inputs(path, specs)
    counts = {int(a.shape[0]) if a.ndim else 0 for a in arrays}
    if len(counts) != 1 or 0 in counts:
        shapes = ", ".join(f"in{i} {list(a.shape)}" for i, a in enumerate(arrays))
        raise ConfigError(
            f"{path}: every array must hold the same number of samples along its first dim ({shapes})"
        )
    count = counts.pop()
    if count < batch:
        raise ConfigError(f"{path}: holds {count} sample(s); the model takes batches of {batch}: give more")
    return [tuple(a[i : i + batch] for a in arrays) for i in range(0, count - count % batch, batch)]
