"""Make consumers of equal initializers (dtype, shape and bytes) share one: onnx-ir's pass, any size."""

from __future__ import annotations

from typing import ClassVar

from onnx_ir.passes.common import DeduplicateInitializersPass


class DeduplicateConstants(DeduplicateInitializersPass):
    """onnx-ir's `DeduplicateInitializersPass` without its size limit.

    The key holds the constant's own shape: a scalar and a one-element vector with the same bytes differ
    (merging them changes the rank of a Gather, Unsqueeze or Concat result downstream).
    """

    name: ClassVar[str] = "deduplicate_constants"

    def __init__(self, size_limit: int = 1 << 62) -> None:
        super().__init__(size_limit=size_limit)
