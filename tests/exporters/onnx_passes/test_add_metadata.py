"""AddMetadata: on small hand-built ONNX graphs, with numerics kept."""

from __future__ import annotations

import onnx_ir as ir
from onnx import helper

from slimship.exporters.onnx_passes import AddMetadata, run_surgery
from tests.exporters.onnx_passes.helpers import make_model, value


def test_metadata_pass_is_idempotent():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [value("x", [2])], [value("y", [2])])
    model.metadata_props.add(key="keep", value="me")
    meta = AddMetadata({"slimship_version": "1", "summary": '{"a": 1}'})
    new, report = run_surgery(model, [meta])
    assert {p.key: p.value for p in new.metadata_props} == {
        "keep": "me",
        "slimship_version": "1",
        "summary": '{"a": 1}',
    }
    assert report.changes["add_metadata"] == 2 and report.iterations == 2 and report.converged
    assert not meta(ir.serde.deserialize_model(new)).modified
