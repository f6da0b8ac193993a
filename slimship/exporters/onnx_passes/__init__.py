"""ONNX graph surgery: small passes, one per module, run to a fixed point by a pass manager.

A pass is a class with a `name`, a `level` ("graph": works on an onnx-graphsurgeon `gs.Graph`;
"model": works on the `onnx.ModelProto`) and `run(target) -> bool` (changed anything?). A pass also
records how many rewrites its last run made in `last_changes`. `run_surgery` (in `manager`) runs them.
"""

from slimship.exporters.onnx_passes.add_metadata import AddMetadata
from slimship.exporters.onnx_passes.base import Pass, bypass
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
    "bypass",
    "default_passes",
    "run_surgery",
]
