"""Embedding tables of a dynamic-range int8 .tflite made loadable: symmetric int8, one scale per row.

litert-torch's dynamic-range conversion (`qdq_conversion_mode="DYNAMIC"`) quantises an embedding table it
finds (a decoder's `embed_tokens`, the `EMBEDDING_LOOKUP` it lowers a gather into) to int8 with one
asymmetric scale and a non-zero zero point, although PT2E left it float. LiteRT's hybrid EMBEDDING_LOOKUP
only takes zero points of 0 (`embedding_lookup.cc: qparams->zero_point->data[0] == 0`), so the file does
not load. This pass requantises each such table per row (axis 0), symmetric, from its dequantised values:
every row gets its own scale (max|row| / 127), so the file stays 8-bit and loses less than the
per-tensor table did, and LiteRT loads it.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _table_ops(model: Any) -> list[tuple[Any, Any]]:
    """(subgraph, table tensor) of every EMBEDDING_LOOKUP whose int8 table has a non-zero zero point."""
    from ai_edge_litert import schema_py_generated as schema

    lookup = schema.BuiltinOperator.EMBEDDING_LOOKUP
    found = []
    for graph in model.subgraphs or []:
        for op in graph.operators or []:
            code = model.operatorCodes[op.opcodeIndex]
            if max(code.builtinCode, code.deprecatedBuiltinCode) != lookup or len(op.inputs) < 2:
                continue
            table = graph.tensors[op.inputs[1]]
            zero_points = getattr(table.quantization, "zeroPoint", None)
            asymmetric = zero_points is not None and bool(np.any(np.asarray(zero_points) != 0))
            stored = model.buffers[table.buffer].data is not None
            if table.type == schema.TensorType.INT8 and asymmetric and stored:
                found.append((graph, table))
    return found


def _per_axis(values: Any, ndim: int) -> np.ndarray:
    array = np.asarray(values, np.float32)
    return array.reshape(-1, *[1] * (ndim - 1)) if array.size > 1 else array.reshape(())


def symmetric_embedding_tables(flatbuffer: bytes) -> tuple[bytes, list[str]]:
    """The model with every asymmetric int8 embedding table requantised symmetric per row (module doc),
    and the names of the tables changed (the input bytes unchanged when there is none)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(flatbuffer, 0))
    tables = _table_ops(model)
    if not tables:
        return flatbuffer, []
    names = []
    for _, table in tables:
        buffer, quant = model.buffers[table.buffer], table.quantization
        stored = np.frombuffer(bytes(buffer.data), np.int8).reshape(table.shape).astype(np.float32)
        values = (stored - _per_axis(quant.zeroPoint, stored.ndim)) * _per_axis(quant.scale, stored.ndim)
        peak = np.abs(values.reshape(values.shape[0], -1)).max(axis=1)
        scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
        requantised = np.clip(np.round(values / scale.reshape(-1, *[1] * (stored.ndim - 1))), -127, 127)
        buffer.data = np.frombuffer(requantised.astype(np.int8).tobytes(), np.uint8)
        quant.scale, quant.zeroPoint, quant.quantizedDimension = scale, np.zeros(scale.size, np.int64), 0
        quant.min = quant.max = None
        names.append(table.name.decode() if isinstance(table.name, bytes) else str(table.name))
    builder = flatbuffers.Builder(len(flatbuffer) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output()), names
