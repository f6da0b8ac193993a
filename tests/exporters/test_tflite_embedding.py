"""Dynamic-range int8 TFLite of a decoder: the embedding table litert-torch quantises asymmetric is
requantised symmetric per row, so LiteRT loads the file and it passes its verdict."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimship.errors import ExportError
from slimship.exporters import tflite_export
from slimship.exporters.registry import FORMATS, ExportRequest
from tests.zoo import ZOO


def _embedding_tables(path) -> list:
    from ai_edge_litert import schema_py_generated as schema

    data = path.read_bytes()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(data, 0))
    graph = model.subgraphs[0]
    lookup = schema.BuiltinOperator.EMBEDDING_LOOKUP
    ops = [op for op in graph.operators if model.operatorCodes[op.opcodeIndex].builtinCode == lookup]
    return [graph.tensors[op.inputs[1]] for op in ops]


@pytest.fixture(scope="module")
def llama():
    case = ZOO["llama_lm"]()
    gen = torch.Generator().manual_seed(5)
    return case.model, case.example_inputs, [case.random_inputs(gen) for _ in range(8)]


@pytest.mark.slow
def test_int8_dynamic_decoder_has_a_symmetric_per_row_embedding_and_passes(llama, tmp_path) -> None:
    model, example, data = llama
    record = FORMATS["tflite-int8-dynamic"]
    request = ExportRequest(model, example, example, data, data)
    result = record.export(request, tmp_path / record.file_name("llama"))
    assert result.parity.passed and result.parity.top1_agreement >= result.parity.top1_min
    (table,) = _embedding_tables(result.path)
    vocab = model.llama.model.embed_tokens.weight.shape[0]
    quant = table.quantization
    assert table.type == 9 and list(table.shape) == list(model.llama.model.embed_tokens.weight.shape)  # INT8
    assert quant.quantizedDimension == 0 and len(quant.scale) == vocab and not np.any(quant.zeroPoint)
    # each row's scale is its own largest magnitude / 127 (within the int8 rounding of the first pass)
    rows = model.llama.model.embed_tokens.weight.detach().abs().amax(dim=1).numpy()
    np.testing.assert_allclose(np.asarray(quant.scale) * 127, rows, rtol=0.02)


@pytest.mark.slow
def test_a_file_litert_cannot_load_is_an_export_error_naming_the_op(llama, tmp_path, monkeypatch) -> None:
    """Without the per-row pass, LiteRT refuses litert-torch's file: the export says so (the converter's
    failure), instead of calling the file corrupt, and leaves nothing behind."""
    monkeypatch.setattr(tflite_export, "symmetric_embedding_tables", lambda data: (data, []))
    model, example, data = llama
    record = FORMATS["tflite-int8-dynamic"]
    request = ExportRequest(model, example, example, data, data)
    with pytest.raises(ExportError, match=r"LiteRT cannot load that file: .*EMBEDDING_LOOKUP"):
        record.export(request, tmp_path / record.file_name("llama"))
    assert not list(tmp_path.iterdir())
