"""The standard pass pipeline."""

from __future__ import annotations

from slimship.exporters.onnx_passes.add_metadata import AddMetadata
from slimship.exporters.onnx_passes.base import AnyPass
from slimship.exporters.onnx_passes.deduplicate_constants import DeduplicateConstants
from slimship.exporters.onnx_passes.fold_castlike import FoldCastLike
from slimship.exporters.onnx_passes.fold_constants import FoldConstants
from slimship.exporters.onnx_passes.fuse_conv_batchnorm import FuseConvBatchNorm
from slimship.exporters.onnx_passes.remove_identity import RemoveIdentity
from slimship.exporters.onnx_passes.remove_noop_cast import RemoveNoOpCast
from slimship.exporters.onnx_passes.remove_noop_reshape import RemoveNoOpReshape
from slimship.exporters.onnx_passes.remove_unused_initializers import RemoveUnusedInitializers
from slimship.exporters.onnx_passes.simplify_shape_ops import SimplifyShapeOps


def default_passes(metadata: dict[str, str] | None = None) -> list[AnyPass]:
    """The standard pipeline, in the order one round runs them."""
    passes: list[AnyPass] = [
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
