"""Delete initializers no node (including subgraphs) or graph output reads."""

from __future__ import annotations

import onnx

from slimship.exporters.onnx_passes.base import Pass


class RemoveUnusedInitializers(Pass):
    """Delete initializers no node (including subgraphs) or graph output reads."""

    name = "remove_unused_initializers"
    level = "model"

    def run(self, model: onnx.ModelProto) -> bool:
        used = _names_read(model.graph) | {o.name for o in model.graph.output}
        for function in model.functions:
            used |= {name for node in function.node for name in node.input}
        keep = [init for init in model.graph.initializer if init.name in used]
        removed = {init.name for init in model.graph.initializer} - {init.name for init in keep}
        self.last_changes = len(removed)
        if removed:
            del model.graph.initializer[:]
            model.graph.initializer.extend(keep)
            # old IR versions also list initializers as graph inputs: drop those entries with them
            inputs = [value for value in model.graph.input if value.name not in removed]
            del model.graph.input[:]
            model.graph.input.extend(inputs)
        return self.last_changes > 0


def _names_read(graph: onnx.GraphProto) -> set[str]:
    names = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                names |= _names_read(sub) | {o.name for o in sub.output}
    return names
