"""FLOPs of an exported model file, counted from its graph, for a speedup's efficiency when `bench` has
files only.

Counted as `torch.utils.flop_counter` counts a PyTorch model (what slimship's own figures use): 2 per
multiply-add of convolutions and matrix products, nothing for other ops. ONNX: Conv, ConvTranspose,
Gemm, MatMul and their quantised forms, with shapes from ONNX shape inference (a symbolic dim counts as
1, e.g. a dynamic batch). TFLite: CONV_2D, DEPTHWISE_CONV_2D, TRANSPOSE_CONV, FULLY_CONNECTED,
BATCH_MATMUL, with the shapes the interpreter allocates. An ExecuTorch .pte is not counted (its delegated
kernels carry no shapes): `file_flops` returns None and says why.

A FLOPs ratio is only taken between two files counted the same way (see `pair_flops`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

_COUNTED = "conv and matmul multiply-adds x2, as torch.utils.flop_counter counts"
ONNX_SOURCE = f"counted from the ONNX graphs of both files ({_COUNTED})"
TFLITE_SOURCE = f"counted from the TFLite graphs of both files ({_COUNTED})"
PT2_SOURCE = "torch.utils.flop_counter on the .pt2 programs"

# ONNX op -> (index of the data input, index of the weight / second operand)
_ONNX_CONV = {"Conv": (0, 1), "ConvInteger": (0, 1), "QLinearConv": (0, 3)}
_ONNX_MATMUL = {"MatMul": (0, 1), "Gemm": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3)}


def _prod(shape: Sequence[int]) -> int:
    return math.prod(int(d) for d in shape)


def onnx_flops(path: Path) -> float:
    """FLOPs of an ONNX file's convolutions and matrix products (see the module doc)."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    shapes: dict[str, list[int]] = {}
    for info in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else 1 for d in dims]
    for tensor in model.graph.initializer:
        shapes[tensor.name] = list(tensor.dims)
    total = 0.0
    for node in model.graph.node:
        ins = list(node.input)
        out = shapes.get(node.output[0]) if node.output else None
        if node.op_type in _ONNX_CONV and out is not None:
            weight = shapes.get(ins[_ONNX_CONV[node.op_type][1]])
            total += 2.0 * _prod(out) * _prod(weight[1:]) if weight else 0.0
        elif node.op_type == "ConvTranspose":
            data, weight = shapes.get(ins[0]), shapes.get(ins[1])
            total += 2.0 * _prod(data) * _prod(weight[1:]) if data and weight else 0.0
        elif node.op_type in _ONNX_MATMUL and out is not None:
            a = shapes.get(ins[_ONNX_MATMUL[node.op_type][0]])
            trans_a = any(attr.name == "transA" and attr.i for attr in node.attribute)
            k = (a[-2] if trans_a else a[-1]) if a else 0
            total += 2.0 * _prod(out) * k
    return total


def tflite_flops(path: Path) -> float:
    """FLOPs of a TFLite file's convolutions and matrix products (see the module doc)."""
    from slimship.runtimes.device_runner import _tflite_interpreter_class

    interpreter_class, _, _ = _tflite_interpreter_class("auto")
    interpreter = interpreter_class(model_path=str(path))
    tensors = {t["index"]: [int(d) for d in t["shape"]] for t in interpreter.get_tensor_details()}
    total = 0.0
    for op in interpreter._get_ops_details():
        name = op["op_name"]
        ins = [tensors.get(int(i), []) for i in op["inputs"] if int(i) >= 0]
        outs = [tensors.get(int(i), []) for i in op["outputs"] if int(i) >= 0]
        if not outs or len(ins) < 2:
            continue
        out, weight = outs[0], ins[1]
        if name == "CONV_2D":  # weight [Cout, kh, kw, Cin/groups]
            total += 2.0 * _prod(out) * _prod(weight[1:])
        elif name == "DEPTHWISE_CONV_2D":  # weight [1, kh, kw, Cout]
            total += 2.0 * _prod(out) * _prod(weight[1:3])
        elif name == "TRANSPOSE_CONV" and len(ins) >= 3:  # inputs: output shape, weight, data
            total += 2.0 * _prod(ins[2]) * _prod(ins[1][:3])
        elif name in ("FULLY_CONNECTED", "BATCH_MATMUL"):
            total += 2.0 * _prod(out) * (ins[0][-1] if ins[0] else 0)
    return total


_COUNTERS = {".onnx": (onnx_flops, ONNX_SOURCE), ".tflite": (tflite_flops, TFLITE_SOURCE)}


def file_flops(path: str | Path) -> tuple[float | None, str]:
    """(FLOPs, where they come from) of a model file; (None, why not) where it cannot be counted."""
    path = Path(path)
    if path.suffix.lower() == ".pt2":
        from slimship.loading import load_program
        from slimship.slimming import count_flops

        program = load_program(path)
        return float(count_flops(program.module, program.example)), PT2_SOURCE
    counter = _COUNTERS.get(path.suffix.lower())
    if counter is None:
        return None, f"FLOPs of {path.suffix} files are not counted (only .pt2, .onnx and .tflite)"
    try:
        return counter[0](path), counter[1]
    except Exception as exc:  # an unreadable graph: no efficiency, said why
        return None, f"FLOPs of {path.name} could not be counted ({type(exc).__name__}: {str(exc)[:120]})"


def pair_flops(dense: Path, slim: Path) -> tuple[tuple[float, float] | None, str]:
    """((dense FLOPs, slim FLOPs), where they come from) of two files of one format, counted the same way;
    (None, why not) when either cannot be counted."""
    dense_flops, dense_source = file_flops(dense)
    slim_flops, slim_source = file_flops(slim)
    if dense_flops is None or slim_flops is None:
        return None, dense_source if dense_flops is None else slim_source
    return (dense_flops, slim_flops), slim_source
