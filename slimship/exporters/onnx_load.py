"""Opening a user's .onnx file: corrupt, truncated, lying sizes and unsafe external data are refused with a
ModelFileError naming the file, before onnxruntime allocates anything."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx

from slimship.errors import ModelFileError, first_line


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Load an .onnx file; a missing, corrupt or truncated file gives a ModelFileError."""
    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"{p}: no such ONNX file")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:
        raise ModelFileError(
            f"{p}: not a readable ONNX model ({type(exc).__name__}); the file is corrupt or truncated"
        ) from None
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    for tensor in model.graph.initializer:
        problem = (
            None if tensor.data_location == onnx.TensorProto.EXTERNAL else _embedded_size_problem(tensor)
        )
        if problem:
            raise ModelFileError(f"{p}: initializer {tensor.name[:80]!r} {problem}; the file is corrupt")
    for tensor in external:
        problem = _external_data_problem(tensor, p.parent)
        if problem:
            raise ModelFileError(f"{p}: initializer {tensor.name[:80]!r} keeps its data in {problem}")
    if external:
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(p.parent))
        except Exception as exc:
            raise ModelFileError(f"{p}: its external data could not be read ({first_line(exc)})") from None
    return model


#: TensorProto fields that hold an embedded initializer's values one (or, for complex, two) per entry
_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")


def _embedded_size_problem(tensor: onnx.TensorProto) -> str | None:
    """Why an embedded initializer's declared shape disagrees with the data it holds (None: it agrees).
    A declared size is a claim: checked here, before onnxruntime allocates it."""
    dims = list(tensor.dims)
    if any(d < 0 for d in dims):
        return f"declares the negative shape {dims}"
    count = math.prod(dims)
    if tensor.HasField("raw_data"):
        try:
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        except (KeyError, TypeError, ValueError):
            return None  # a type without a fixed item size: onnxruntime's check
        if count * itemsize != len(tensor.raw_data):
            return (
                f"declares shape {dims} ({count * itemsize:,} bytes) but holds {len(tensor.raw_data):,} bytes"
            )
        return None
    held = sum(len(getattr(tensor, name)) for name in _TYPED_FIELDS)
    if held < count:
        return f"declares shape {dims} ({count:,} values) but holds {held:,}"
    return None


def _external_data_problem(tensor: onnx.TensorProto, folder: Path) -> str | None:
    """Why an initializer's external data cannot be read safely (None: a file inside `folder`)."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    if not location or Path(location).is_absolute() or ".." in Path(location).parts:
        return f"{location[:200]!r}, which is not a relative path inside the model's folder {folder}"
    target = folder / location
    if not target.is_file():
        return f"{location[:200]!r}, which is missing (expected at {target}; copy it next to the model)"
    if not target.resolve().is_relative_to(folder.resolve()):
        return f"{location[:200]!r}, which resolves outside the model's folder {folder}"
    try:
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
    except ValueError:
        return f"{location[:200]!r} at an invalid offset or length"
    if end > target.stat().st_size:
        return f"{location[:200]!r}, which is truncated ({target.stat().st_size} bytes, {end} needed)"
    return None
