"""Set `metadata_props` entries (slimship version, source hash, slimming summary ...)."""

from __future__ import annotations

import onnx

from slimship.exporters.onnx_passes.base import Pass


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
