"""The pass manager runs onnx-ir passes beside ours and names a failing one."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper
from onnx_ir.passes.common import IdentityEliminationPass

from slimship.errors import ExportError
from slimship.exporters.onnx_passes import Pass, run_surgery
from tests.exporters.onnx_passes.helpers import make_model, value


def _identity_relu() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_a_plain_onnx_ir_pass_runs_and_reports_under_its_class_name():
    new, report = run_surgery(_identity_relu(), [IdentityEliminationPass()])
    onnx.checker.check_model(new, full_check=True)
    assert [n.op_type for n in new.graph.node] == ["Relu"]
    assert report.changes == {"IdentityEliminationPass": 1} and report.iterations == 2 and report.converged


class BrokenIr(ir.passes.InPlacePass):
    name = "broken_ir"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        raise RuntimeError("boom")


def test_a_failing_onnx_ir_pass_is_named():
    with pytest.raises(ExportError, match=r"'broken_ir' failed: .*boom"):
        run_surgery(_identity_relu(), [BrokenIr()])


class AlwaysChanges(Pass):
    name = "always"
    level = "model"

    def run(self, model):
        self.last_changes = 1
        return True


class Broken(Pass):
    name = "broken"

    def run(self, graph):
        raise RuntimeError("boom")


def test_manager_is_bounded_and_reports_failing_pass():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [value("x", [2])], [value("y", [2])])
    _, report = run_surgery(model, [AlwaysChanges()], max_iterations=3)
    assert report.iterations == 3 and not report.converged and report.changes["always"] == 3
    with pytest.raises(ExportError, match="broken"):
        run_surgery(model, [Broken()])
