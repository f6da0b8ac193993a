"""ONNX graph surgery: small passes run to a fixed point by a pass manager.

A pass is a class with a `name`, a `level` ("graph": works on an onnx-graphsurgeon `gs.Graph`;
"model": works on the `onnx.ModelProto`) and `run(target) -> bool` (changed anything?). A pass also
records how many rewrites its last run made in `last_changes`. Passes only rewire edges; the manager
removes dead nodes (`graph.cleanup()`) after each graph pass, re-infers shapes between rounds and stops
when a whole round changes nothing (or after `max_iterations` rounds).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections import Counter
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from slimship.errors import ExportError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- graph editing helpers


def _is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(out is tensor for out in graph.outputs)


def _replace_uses(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every consumer of `old` read `new` instead."""
    for consumer in list(old.outputs):
        for i, tensor in enumerate(consumer.inputs):
            if tensor is old:
                consumer.inputs[i] = new


def bypass(graph: gs.Graph, node: gs.Node) -> bool:
    """Remove a node whose first output equals its first input; False when it cannot be removed."""
    src, dst = node.inputs[0], node.outputs[0]
    if not _is_graph_output(graph, dst):
        _replace_uses(graph, dst, src)
        node.outputs.clear()
        return True
    # dst is a graph output: keep its name by making src's producer write dst directly.
    if (
        isinstance(src, gs.Constant)
        or not src.inputs
        or _is_graph_output(graph, src)
        or any(t is src for t in graph.inputs)
    ):
        return False
    producer = src.inputs[0]
    _replace_uses(graph, src, dst)
    node.outputs.clear()
    node.inputs.clear()
    for i, tensor in enumerate(producer.outputs):
        if tensor is src:
            producer.outputs[i] = dst
    if dst.dtype is None:
        dst.dtype = src.dtype
    return True


def _const(tensor: gs.Tensor) -> np.ndarray | None:
    return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None


def _static_dims(tensor: gs.Tensor) -> list[int | None] | None:
    """The tensor's dims with None for unknown/symbolic ones, or None when even the rank is unknown."""
    if tensor.shape is None:
        return None
    return [d if isinstance(d, int | np.integer) and d >= 0 else None for d in tensor.shape]


def _unused(tensor: gs.Tensor, graph: gs.Graph) -> bool:
    return not tensor.outputs and not _is_graph_output(graph, tensor)


# ---------------------------------------------------------------- passes


class Pass:
    """Base class: subclasses set `name`, `level` and implement `run`."""

    name: ClassVar[str] = "pass"
    level: ClassVar[str] = "graph"

    def __init__(self) -> None:
        self.last_changes = 0

    def run(self, target) -> bool:  # pragma: no cover - interface
        raise NotImplementedError


class FoldConstants(Pass):
    """Evaluate nodes whose inputs are all constant (via onnx-graphsurgeon + onnxruntime)."""

    name = "fold_constants"

    def __init__(self, size_threshold: int = 1 << 22) -> None:
        super().__init__()
        self.size_threshold = size_threshold

    def run(self, graph: gs.Graph) -> bool:
        before = len(graph.nodes)
        graph.fold_constants(fold_shapes=False, size_threshold=self.size_threshold, error_ok=True)
        graph.cleanup()
        self.last_changes = max(before - len(graph.nodes), 0)
        return self.last_changes > 0


class RemoveIdentity(Pass):
    """Drop Identity nodes and inference-mode Dropout whose mask output is unused."""

    name = "remove_identity"

    def run(self, graph: gs.Graph) -> bool:
        self.last_changes = 0
        for node in list(graph.nodes):
            if node.op == "Identity" or (node.op == "Dropout" and self._is_noop_dropout(graph, node)):
                self.last_changes += bypass(graph, node)
        return self.last_changes > 0

    @staticmethod
    def _is_noop_dropout(graph: gs.Graph, node: gs.Node) -> bool:
        if any(not _unused(t, graph) for t in node.outputs[1:]):
            return False
        if len(node.inputs) >= 3 and node.inputs[2].name:
            training = _const(node.inputs[2])
            return training is not None and not bool(training)
        return True


class RemoveNoOpCast(Pass):
    """Drop Cast nodes whose target type equals the input's type."""

    name = "remove_noop_cast"

    def run(self, graph: gs.Graph) -> bool:
        self.last_changes = 0
        for node in list(graph.nodes):
            if node.op != "Cast" or node.inputs[0].dtype is None:
                continue
            target = onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"]))
            if np.dtype(node.inputs[0].dtype) == target:
                self.last_changes += bypass(graph, node)
        return self.last_changes > 0


class FoldCastLike(Pass):
    """CastLike(constant, x) with x's dtype known -> a constant (the exporter's way to type a literal)."""

    name = "fold_castlike"

    def run(self, graph: gs.Graph) -> bool:
        self.last_changes = 0
        for node in list(graph.nodes):
            if node.op != "CastLike" or not node.outputs or _is_graph_output(graph, node.outputs[0]):
                continue
            values, like = _const(node.inputs[0]), node.inputs[1]
            if values is None or like.dtype is None:
                continue
            const = gs.Constant(f"{node.outputs[0].name}.folded", values.astype(np.dtype(like.dtype)))
            _replace_uses(graph, node.outputs[0], const)
            node.outputs.clear()
            self.last_changes += 1
        return self.last_changes > 0


class RemoveNoOpReshape(Pass):
    """Drop Reshapes to the input's own shape; collapse Reshape(Reshape(x)) into one Reshape."""

    name = "remove_noop_reshape"

    def run(self, graph: gs.Graph) -> bool:
        self.last_changes = 0
        for node in list(graph.nodes):
            if node.op != "Reshape" or not node.outputs:
                continue
            target = _const(node.inputs[1])
            if target is None:
                continue
            allowzero = int(node.attrs.get("allowzero", 0))
            if self._is_noop(_static_dims(node.inputs[0]), target.tolist(), allowzero):
                self.last_changes += bypass(graph, node)
            elif self._collapse(node, target, allowzero):
                self.last_changes += 1
        return self.last_changes > 0

    @staticmethod
    def _is_noop(dims: list[int | None] | None, target: list[int], allowzero: int) -> bool:
        if dims is None or len(dims) != len(target):
            return False
        mismatched = [
            i
            for i, (d, t) in enumerate(zip(dims, target))
            if not ((t == 0 and not allowzero) or (d is not None and d == t))
        ]
        # one -1 entry is fine when every other dimension matches: it must then equal the input's.
        return not mismatched or (len(mismatched) == 1 and target[mismatched[0]] == -1)

    @staticmethod
    def _collapse(node: gs.Node, target: np.ndarray, allowzero: int) -> bool:
        src = node.inputs[0]
        if not src.inputs or src.inputs[0].op != "Reshape":
            return False
        if not allowzero and (target == 0).any():  # 0 copies a dim of the intermediate shape
            return False
        node.inputs[0] = src.inputs[0].inputs[0]
        return True


class FuseConvBatchNorm(Pass):
    """Fold an inference-mode BatchNormalization into the Conv that feeds only it."""

    name = "fuse_conv_batchnorm"

    def run(self, graph: gs.Graph) -> bool:
        self.last_changes = 0
        for bn in list(graph.nodes):
            if bn.op == "BatchNormalization" and self._fuse(graph, bn):
                self.last_changes += 1
        return self.last_changes > 0

    @staticmethod
    def _fuse(graph: gs.Graph, bn: gs.Node) -> bool:
        x = bn.inputs[0]
        if not x.inputs or x.inputs[0].op != "Conv" or len(x.outputs) != 1 or _is_graph_output(graph, x):
            return False
        if int(bn.attrs.get("training_mode", 0)) or any(not _unused(t, graph) for t in bn.outputs[1:]):
            return False
        conv = x.inputs[0]
        weight = _const(conv.inputs[1])
        params = [_const(t) for t in bn.inputs[1:5]]
        if weight is None or any(p is None for p in params):
            return False
        bias = _const(conv.inputs[2]) if len(conv.inputs) > 2 else np.zeros(weight.shape[0], weight.dtype)
        if bias is None:
            return False
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        scale = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
        new_w = (weight.astype(np.float64) * scale.reshape(-1, *([1] * (weight.ndim - 1)))).astype(
            weight.dtype
        )
        new_b = ((bias.astype(np.float64) - mean) * scale + beta).astype(weight.dtype)
        conv.inputs[1] = gs.Constant(f"{conv.name}.fused_weight", new_w)
        fused_bias = gs.Constant(f"{conv.name}.fused_bias", new_b)
        if len(conv.inputs) > 2:
            conv.inputs[2] = fused_bias
        else:
            conv.inputs.append(fused_bias)
        out = bn.outputs[0]
        bn.outputs.clear()
        bn.inputs.clear()
        conv.outputs[0] = out
        return True


class SimplifyShapeOps(Pass):
    """Replace Shape / Gather(Shape) / Slice(Shape) by constants where the dims involved are static."""

    name = "simplify_shape_ops"

    def run(self, graph: gs.Graph) -> bool:
        self.last_changes = 0
        for node in list(graph.nodes):
            if not node.outputs or _is_graph_output(graph, node.outputs[0]):
                continue
            rule = self._RULES.get(node.op)
            value = rule(node) if rule else None
            if value is not None:
                const = gs.Constant(f"{node.outputs[0].name}.folded", np.asarray(value, dtype=np.int64))
                _replace_uses(graph, node.outputs[0], const)
                node.outputs.clear()
                self.last_changes += 1
        return self.last_changes > 0

    @staticmethod
    def _shape_dims(node: gs.Node) -> list[int | None] | None:
        dims = _static_dims(node.inputs[0])
        if dims is None:
            return None
        start, end = node.attrs.get("start", 0), node.attrs.get("end", len(dims))
        return dims[slice(start, end)]

    @classmethod
    def _shape(cls, node: gs.Node) -> list[int] | None:
        dims = cls._shape_dims(node)
        return dims if dims is not None and None not in dims else None

    @classmethod
    def _gather(cls, node: gs.Node) -> np.ndarray | None:
        src, indices = node.inputs[0], _const(node.inputs[1])
        if indices is None or not src.inputs or src.inputs[0].op != "Shape" or int(node.attrs.get("axis", 0)):
            return None
        dims = cls._shape_dims(src.inputs[0])
        if dims is None:
            return None
        picked = np.asarray(np.asarray(dims, dtype=object)[indices], dtype=object)
        return None if any(d is None for d in picked.ravel()) else picked.astype(np.int64)

    @classmethod
    def _slice(cls, node: gs.Node) -> list[int] | None:
        src = node.inputs[0]
        params = [_const(t) for t in node.inputs[1:]]
        if not src.inputs or src.inputs[0].op != "Shape" or any(p is None for p in params):
            return None
        dims = cls._shape_dims(src.inputs[0])
        if dims is None:
            return None
        starts, ends = int(params[0][0]), int(params[1][0])
        if len(params) > 2 and int(params[2][0]) not in (0, -1):
            return None
        step = int(params[3][0]) if len(params) > 3 else 1
        picked = dims[slice(starts, ends, step)]
        return None if None in picked else picked

    _RULES: ClassVar[dict] = {}


SimplifyShapeOps._RULES = {
    "Shape": SimplifyShapeOps._shape,
    "Gather": SimplifyShapeOps._gather,
    "Slice": SimplifyShapeOps._slice,
}


class DeduplicateConstants(Pass):
    """Make consumers of equal constants (dtype, shape and bytes) share one tensor.

    The shape is the constant's own: a scalar and a one-element vector with the same bytes differ
    (merging them changes the rank of a Gather, Unsqueeze or Concat result downstream).
    """

    name = "deduplicate_constants"

    def run(self, graph: gs.Graph) -> bool:
        self.last_changes = 0
        seen: dict[tuple, gs.Constant] = {}
        for _, tensor in sorted(graph.tensors().items()):
            if not isinstance(tensor, gs.Constant) or _is_graph_output(graph, tensor):
                continue
            values = np.asarray(tensor.values)  # not ascontiguousarray: it turns a scalar into shape (1,)
            digest = hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()
            key = (values.dtype.str, values.shape, digest)
            keep = seen.setdefault(key, tensor)
            if keep is not tensor and tensor.outputs:
                _replace_uses(graph, tensor, keep)
                self.last_changes += 1
        return self.last_changes > 0


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


class AddMetadata(Pass):
    """Set `metadata_props` entries (slimship version, source hash, slimming summary ...)."""

    name = "add_metadata"
    level = "model"

    def __init__(self, entries: dict[str, str]) -> None:
        super().__init__()
        self.entries = {str(k): str(v) for k, v in entries.items()}

    def run(self, model: onnx.ModelProto) -> bool:
        current = {p.key: p.value for p in model.metadata_props}
        self.last_changes = sum(current.get(k) != v for k, v in self.entries.items())
        if self.last_changes:
            current.update(self.entries)
            del model.metadata_props[:]
            for key in sorted(current):
                model.metadata_props.add(key=key, value=current[key])
        return self.last_changes > 0


def default_passes(metadata: dict[str, str] | None = None) -> list[Pass]:
    """The standard pipeline, in the order one round runs them."""
    passes: list[Pass] = [
        RemoveUnusedInitializers(),
        RemoveIdentity(),
        RemoveNoOpCast(),
        FoldCastLike(),
        SimplifyShapeOps(),
        FoldConstants(),
        RemoveNoOpReshape(),
        FuseConvBatchNorm(),
        DeduplicateConstants(),
    ]
    if metadata:
        passes.append(AddMetadata(metadata))
    return passes


# ---------------------------------------------------------------- manager


@dataclasses.dataclass
class SurgeryReport:
    """What the pass manager did: sizes before/after and rewrites per pass."""

    nodes_before: int
    nodes_after: int
    initializers_before: int
    initializers_after: int
    bytes_before: int
    bytes_after: int
    iterations: int
    converged: bool
    changes: dict[str, int]
    op_counts_before: dict[str, int]
    op_counts_after: dict[str, int]


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:  # shape inference is a help for the passes, not a requirement
        log.debug("shape inference failed during surgery: %s", exc)
        return model


def _export(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = template.ir_version
    model.producer_name = template.producer_name
    model.producer_version = template.producer_version
    model.doc_string = template.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    del model.graph.value_info[:]  # stale after rewrites; shape inference refills it
    return model


def run_surgery(
    model: onnx.ModelProto, passes: list[Pass] | None = None, max_iterations: int = 8
) -> tuple[onnx.ModelProto, SurgeryReport]:
    """Run `passes` (default: `default_passes()`) to a fixed point; return the new model and a report."""
    if not isinstance(model, onnx.ModelProto):
        raise ExportError(f"run_surgery expects an onnx.ModelProto, got {type(model).__name__}")
    passes = default_passes() if passes is None else passes
    changes = {p.name: 0 for p in passes}
    before = model
    current = onnx.ModelProto()
    current.CopyFrom(model)
    converged = False
    iterations = 0
    while iterations < max_iterations:
        iterations += 1
        changed = False
        for p in (p for p in passes if p.level == "model"):
            changed |= _apply(p, current, changes)
        graph = gs.import_onnx(_infer(current))
        for p in (p for p in passes if p.level == "graph"):
            if _apply(p, graph, changes):
                changed = True
                graph.cleanup().toposort()
        current = _export(graph, current)
        if not changed:
            converged = True
            break
    if not converged:
        log.warning("surgery stopped after %d rounds without reaching a fixed point", max_iterations)
    current = _infer(current)
    report = SurgeryReport(
        nodes_before=len(before.graph.node),
        nodes_after=len(current.graph.node),
        initializers_before=len(before.graph.initializer),
        initializers_after=len(current.graph.initializer),
        bytes_before=before.ByteSize(),
        bytes_after=current.ByteSize(),
        iterations=iterations,
        converged=converged,
        changes=changes,
        op_counts_before=dict(Counter(n.op_type for n in before.graph.node)),
        op_counts_after=dict(Counter(n.op_type for n in current.graph.node)),
    )
    log.info(
        "surgery: %d -> %d nodes in %d rounds (%s)",
        report.nodes_before,
        report.nodes_after,
        iterations,
        ", ".join(f"{k}={v}" for k, v in changes.items() if v),
    )
    return current, report


def _apply(p: Pass, target, changes: dict[str, int]) -> bool:
    p.last_changes = 0
    try:
        changed = bool(p.run(target))
    except Exception as exc:
        raise ExportError(
            f"ONNX surgery pass {p.name!r} failed: {type(exc).__name__}: {exc}. "
            "Run export_onnx(..., surgery=False) to skip surgery, or drop this pass from `passes`."
        ) from exc
    changes[p.name] = changes.get(p.name, 0) + p.last_changes
    return changed
