"""Model inputs from an .npz file: the one loader every command uses, checked against the model's inputs.

An inputs file holds plain numeric arrays named in0, in1, ... (one per model input, in order). It is read
with `allow_pickle=False`, so pickled Python objects are never loaded; object arrays, unknown keys, a count,
rank, shape or dtype that does not fit the model, and empty arrays are refused with a ConfigError that
names the file and the key.
"""

from __future__ import annotations

import math
import re
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from slimship.budget import INPUT_COPIES, check_bytes, check_tensor
from slimship.errors import ConfigError, ModelFileError
from slimship.runtimes.runners import probe_load

if TYPE_CHECKING:
    from slimship.exporters.common import TensorSpec

_KEY = re.compile(r"^in(0|[1-9][0-9]*)$")
_NPZ_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error)


def load_npz_inputs(path: str | Path, specs: Sequence[TensorSpec] | None = None) -> list[np.ndarray]:
    """Arrays in0..inN of an .npz, in order; checked against the model's input `specs` when given.

    Keys, shapes and dtypes are checked from the arrays' headers, and their sizes against the memory
    budget (a run holds INPUT_COPIES of its inputs), before any data is read."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p}: is a folder; --inputs takes an .npz file with arrays in0, in1, ...")
    if not p.is_file():
        raise ConfigError(f"{p}: no such inputs file")
    with _NpzReader(p) as reader:
        _check_keys(p, list(reader.headers))
        declared = [reader.headers[f"in{i}"] for i in range(len(reader.headers))]
        for i, value in enumerate(declared):
            if value.size == 0:
                shape = list(value.shape)
                raise ConfigError(f"{p}: in{i} has shape {shape} with no elements; give real inputs")
        if specs is not None:
            check_inputs(declared, specs, str(p))
        check_bytes(str(p), "its arrays together", sum(h.nbytes for h in declared), INPUT_COPIES)
        return [reader.read(f"in{i}") for i in range(len(declared))]


_NPY_MAGIC = b"\x93NUMPY"
_MAX_MEMBERS = 4096
_MAX_HEADER = 1 << 16
_CHUNK = 1 << 20


def read_npz_arrays(path: str | Path, keys: Sequence[str]) -> list[np.ndarray]:
    """The arrays `keys` of an .npz, each header checked against the budget before its data is read;
    ConfigError naming the file (and a missing key) otherwise."""
    p = Path(path)
    with _NpzReader(p) as reader:
        missing = [k for k in keys if k not in reader.headers]
        if missing:
            raise ConfigError(f"{p}: has no array {missing[0]!r}")
        return [reader.read(k) for k in keys]


@dataclass(frozen=True)
class _Declared:
    """An .npz member's .npy header: what it declares (shape, dtype, size) and where its data starts."""

    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    fortran: bool
    dtype: np.dtype
    offset: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize


class _NpzReader:
    """An .npz opened member by member: every .npy header read (bounded) and its declared size checked
    against the budget and the member's size before any data is inflated; `read(key)` then reads one
    array in chunks into an array of exactly the declared size."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            if not zipfile.is_zipfile(path):
                with open(path, "rb") as f:
                    if f.read(len(_NPY_MAGIC)) == _NPY_MAGIC:
                        raise ConfigError(f"{path}: a single .npy array, not an .npz archive of in0, in1 ...")
                raise zipfile.BadZipFile("File is not a zip file")
            self.archive = zipfile.ZipFile(path)
            infos = [info for info in self.archive.infolist() if not info.is_dir()]
            if len(infos) > _MAX_MEMBERS:
                raise ConfigError(f"{path}: holds {len(infos)} members, over {_MAX_MEMBERS}")
            self.headers = {info.filename.removesuffix(".npy"): self._header(info) for info in infos}
            check_bytes(str(path), "its arrays together", sum(h.nbytes for h in self.headers.values()))
        except _NPZ_READ_ERRORS as exc:
            raise self._unreadable(exc) from None

    def __enter__(self) -> _NpzReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.archive.close()

    def _unreadable(self, exc: BaseException) -> ConfigError:
        return ConfigError(
            f"{self.path}: not a readable .npz file ({type(exc).__name__}: {str(exc)[:200]}); the file is "
            "corrupt, truncated or of another format: save the inputs again with numpy.savez"
        )

    def _header(self, info: zipfile.ZipInfo) -> _Declared:
        path, key = self.path, info.filename.removesuffix(".npy")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ConfigError(f"{path}: array {key!r} uses an unsupported zip compression")
        with self.archive.open(info) as stream:
            version = np.lib.format.read_magic(stream)
            if version not in _HEADER_READERS:
                raise ValueError(f"array {key!r}: .npy format version {version} is not supported")
            shape, fortran, dtype = _HEADER_READERS[version](stream, max_header_size=_MAX_HEADER)
            offset = stream.tell()
        if dtype.hasobject:
            raise ConfigError(
                f"{path}: holds object arrays (pickled Python objects), which slimship never loads; "
                "save plain numeric arrays with numpy.savez"
            )
        nbytes = check_tensor(str(path), f"array {key!r} ({dtype})", shape, dtype.itemsize)
        if info.file_size != offset + nbytes:
            raise ConfigError(
                f"{path}: array {key!r} declares shape {list(shape)} ({nbytes} bytes of {dtype}) but its "
                f"member holds {max(info.file_size - offset, 0)} bytes of data: corrupt or truncated"
            )
        return _Declared(info, tuple(shape), bool(fortran), dtype, offset)

    def read(self, key: str) -> np.ndarray:
        head = self.headers[key]
        out = np.empty(head.nbytes, np.uint8)
        try:
            with self.archive.open(head.info) as stream:
                stream.read(head.offset)
                done = 0
                while done < head.nbytes:
                    block = stream.read(min(_CHUNK, head.nbytes - done))
                    if not block:
                        raise EOFError(f"array {key!r} is truncated ({done} of {head.nbytes} bytes)")
                    out[done : done + len(block)] = np.frombuffer(block, np.uint8)
                    done += len(block)
        except _NPZ_READ_ERRORS as exc:
            raise self._unreadable(exc) from None
        array = out.view(head.dtype)
        return array.reshape(head.shape[::-1]).T if head.fortran else array.reshape(head.shape)


_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _check_keys(path: Path, keys: list[str]) -> None:
    if not keys:
        raise ConfigError(f"{path}: holds no arrays; expected in0, in1, ... (one per model input)")
    wrong = sorted(k for k in keys if not _KEY.match(k))
    expected = {f"in{i}" for i in range(len(keys))}
    if wrong or set(keys) != expected:
        names = "key in0" if len(keys) == 1 else "keys " + ", ".join(f"in{i}" for i in range(len(keys)))
        raise ConfigError(
            f"{path}: arrays are named {', '.join(sorted(keys))}; expected {names} "
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
    from slimship.exporters.common import check_model_file

    p = Path(path)
    check_model_file(p)
    if p.suffix in _NATIVE_RUNTIMES:
        probe_load(p, _NATIVE_RUNTIMES[p.suffix])
    specs = _file_input_specs(p)
    check_feedable(p, specs)
    check_declared_inputs(str(p), specs)
    return specs


# formats whose specs a native runtime reads in this process (probed in a child first)
_NATIVE_RUNTIMES = {".tflite": "litert", ".pte": "executorch"}
_FEEDABLE = frozenset(
    "float16 float32 float64 int8 int16 int32 int64 uint8 uint16 uint32 uint64 bool".split()
)


def check_feedable(path: str | Path, specs: Sequence[TensorSpec]) -> None:
    """Refuse a model input slimship cannot build or feed from numpy (bfloat16, strings, undefined), or
    one that declares a negative size."""
    for spec in specs:
        negative = [(axis, d) for axis, d in enumerate(spec.shape) if isinstance(d, int) and d < 0]
        if negative:
            axis, size = negative[0]
            raise ModelFileError(
                f"{path}: input {spec.name!r} declares size {size} for dim {axis} "
                f"(shape {list(spec.shape)}); a size is 0 or more, a dynamic dim has a name"
            )
        if str(spec.dtype) not in _FEEDABLE:
            raise ModelFileError(
                f"{path}: input {spec.name!r} has element type {spec.dtype}, which slimship cannot feed "
                f"(supported: {', '.join(sorted(_FEEDABLE))})"
            )


def check_declared_inputs(where: str, specs: Sequence[TensorSpec], copies: int = INPUT_COPIES) -> None:
    """The inputs a model file declares (a dynamic dim counted as 1) against the memory budget, each and
    together, before any is generated."""
    total = 0
    for spec in specs:
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
        itemsize = np.dtype(spec.dtype).itemsize if str(spec.dtype) in _FEEDABLE else 1
        total += check_tensor(where, f"input {spec.name!r} ({spec.dtype})", shape, itemsize, copies)
    check_bytes(where, "its inputs together", total, copies)


def _file_input_specs(p: Path) -> list[TensorSpec]:
    if p.suffix == ".onnx":
        from slimship.exporters.onnx_export import onnx_tensor_specs

        return onnx_tensor_specs(p)[0]
    if p.suffix == ".tflite":
        from slimship.exporters.tflite_compat import tensor_specs

        return tensor_specs(p)[0]
    if p.suffix == ".pte":
        return pte_input_specs(p)
    if p.suffix == ".pt2":
        from slimship.exporters.common import TensorSpec
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
    from slimship.exporters.common import TensorSpec, open_model_runner

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
    for i, array in enumerate(arrays):
        if np.issubdtype(array.dtype, np.inexact) and not np.isfinite(array).all():
            bad = int(array.size - np.isfinite(array).sum())
            first = [int(n) for n in np.argwhere(~np.isfinite(array))[0]]
            raise ConfigError(
                f"{path}: in{i} holds {bad} NaN or Inf value(s) (the first at index {first}); int8 "
                "calibration measures value ranges, which a NaN or Inf makes meaningless: give finite samples"
            )
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
