"""ONNX graph surgery: small passes, one per module, run to a fixed point by a pass manager.

Two kinds of pass. An onnx-ir pass (`ir.passes.PassBase`, `call(model) -> PassResult`; ours return a
`CountedResult` carrying how many rewrites they made): every pass here but FoldConstants, and any pass
onnx-ir ships; RemoveIdentity, RemoveUnusedInitializers and DeduplicateConstants wrap onnx-ir's own.
And a `Pass` (`name`, `level` "graph" on an onnx-graphsurgeon `gs.Graph` or "model" on the
`onnx.ModelProto`, `run(target) -> bool`, its count in `last_changes`): FoldConstants (onnx-ir 1.1.0
ships no constant folding; graphsurgeon evaluates with onnxruntime) and users' own passes.
`run_surgery` (in `manager`) runs both.
"""

from slimship.exporters.onnx_passes.add_metadata import AddMetadata
from slimship.exporters.onnx_passes.base import CountedResult, Pass, bypass_ir, const_array, static_dims
from slimship.exporters.onnx_passes.deduplicate_constants import DeduplicateConstants
from slimship.exporters.onnx_passes.defaults import default_passes
from slimship.exporters.onnx_passes.fold_castlike import FoldCastLike
from slimship.exporters.onnx_passes.fold_constants import FoldConstants
from slimship.exporters.onnx_passes.fuse_conv_batchnorm import FuseConvBatchNorm
from slimship.exporters.onnx_passes.manager import SurgeryReport, run_surgery
from slimship.exporters.onnx_passes.remove_identity import RemoveIdentity
from slimship.exporters.onnx_passes.remove_noop_cast import RemoveNoOpCast
from slimship.exporters.onnx_passes.remove_noop_reshape import RemoveNoOpReshape
from slimship.exporters.onnx_passes.remove_unused_initializers import RemoveUnusedInitializers
from slimship.exporters.onnx_passes.simplify_shape_ops import SimplifyShapeOps

__all__ = [
    "AddMetadata",
    "CountedResult",
    "DeduplicateConstants",
    "FoldCastLike",
    "FoldConstants",
    "FuseConvBatchNorm",
    "Pass",
    "RemoveIdentity",
    "RemoveNoOpCast",
    "RemoveNoOpReshape",
    "RemoveUnusedInitializers",
    "SimplifyShapeOps",
    "SurgeryReport",
    "bypass_ir",
    "const_array",
    "default_passes",
    "run_surgery",
    "static_dims",
]
