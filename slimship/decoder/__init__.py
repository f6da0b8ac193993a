"""Text generation: a decoder (dense or slim) exported with its KV cache, decoded, timed and generated with.

Names are loaded on first use (PEP 562), so the command-line parser can import `slimship.decoder.cli`
without importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DecoderInfo": "cache", "KVLayout": "cache", "decoder_info": "cache", "kv_layout": "cache",
    "DECODER_FORMATS": "export", "DecoderExport": "export", "DecoderExporter": "export",
    "DecoderExportOptions": "export", "DecoderParity": "export", "export_decoder": "export",
    "Greedy": "runner", "greedy": "runner", "open_decoder": "runner",
    "DecodeBench": "bench", "bench_decode": "bench",
    "DecoderReleaseOptions": "release", "DecoderReleaseRequest": "release", "release_decoder": "release",
    "ReplayCheck": "replay", "load_tokenizer": "bundle",
}  # fmt: skip

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'slimship.decoder' has no attribute {name!r}")
    return getattr(importlib.import_module(f"slimship.decoder.{_EXPORTS[name]}"), name)
