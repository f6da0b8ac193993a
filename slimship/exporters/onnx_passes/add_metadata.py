"""Set `metadata_props` entries (slimship version, source hash, slimming summary ...)."""

from __future__ import annotations

from typing import ClassVar

import onnx_ir as ir

from slimship.exporters.onnx_passes.base import CountedResult


class AddMetadata(ir.passes.InPlacePass):
    """Set `metadata_props` entries, keys sorted; its changes are the entries it added or changed."""

    name: ClassVar[str] = "add_metadata"

    def __init__(self, entries: dict[str, str]) -> None:
        super().__init__()
        self.entries = {str(k): str(v) for k, v in entries.items()}

    def call(self, model: ir.Model) -> CountedResult:
        current = model.metadata_props
        changes = sum(current.get(k) != v for k, v in self.entries.items())
        if changes:
            merged = {**current, **self.entries}
            current.clear()
            current.update(sorted(merged.items()))
        return CountedResult(model, bool(changes), changes)
