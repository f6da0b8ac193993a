"""Drop Cast nodes whose target type equals the input's type."""

from __future__ import annotations

from typing import ClassVar

import onnx_ir as ir

from slimship.exporters.onnx_passes.base import CountedResult, bypass_ir


class RemoveNoOpCast(ir.passes.InPlacePass):
    """Drop Cast nodes whose target type equals the input's (known) type."""

    name: ClassVar[str] = "remove_noop_cast"

    def call(self, model: ir.Model) -> CountedResult:
        changes = 0
        for node in list(model.graph):
            if node.op_type != "Cast" or node.domain != "" or node.inputs[0] is None:
                continue
            to = node.attributes.get("to")
            if to is not None and node.inputs[0].dtype == ir.DataType(to.as_int()):
                changes += bypass_ir(node)
        return CountedResult(model, bool(changes), changes)
