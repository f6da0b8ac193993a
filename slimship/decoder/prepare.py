"""What a decoder export needs of the model before any work: fp32 weights and no sliding window.

- A half-precision checkpoint (fp16 / bf16, as most published LLMs are) is converted to fp32 in place,
  once: every format starts from fp32 (the fp32 files are fp32; quantised ones are made from fp32) and
  the reference generation runs on the same fp32 model, so each file is judged against what it computes.
- Sliding-window attention is refused naming its config key: the exported caches attend over every slot.
"""

from __future__ import annotations

import torch
from torch import nn

from slimship.errors import ConfigError

_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}


def to_fp32(model: nn.Module) -> list[str]:
    """Convert `model`'s floating-point weights to fp32 in place; the notes saying from which dtypes."""
    tensors = [*model.parameters(), *model.buffers()]
    found = sorted({_NAMES[t.dtype] for t in tensors if t.dtype in _NAMES})
    if not found:
        return []
    model.to(torch.float32)
    return [f"converted from {' and '.join(found)} to float32 (every format starts from fp32)"]


def sliding_window(model: nn.Module) -> tuple[str, object] | None:
    """(config key, value) when the model's attention uses a sliding window, else None."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    if window is None:
        return None
    if getattr(text, "use_sliding_window", None) is False:
        return None
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    if getattr(text, "use_sliding_window", None) is True:
        return "use_sliding_window", True
    return "sliding_window", window


def refuse_sliding_window(model: nn.Module, max_seq_len: int) -> None:
    """ConfigError when the attention uses a sliding window (the export's caches are full-attention)."""
    found = sliding_window(model)
    if found is None:
        return
    key, value = found
    window = getattr(model.config.get_text_config(), "sliding_window", None)
    if isinstance(window, int) and window >= max_seq_len:
        way = (
            f"the window ({window}) covers --max-seq-len {max_seq_len}, so the same model exports with "
            "sliding_window set to null (use_sliding_window false) in its config.json"
        )
    else:
        way = (
            f"a window of {window} tokens under --max-seq-len {max_seq_len} changes the outputs of full "
            "attention; export a checkpoint without a sliding window"
        )
    raise ConfigError(
        f"config.json {key} = {value!r}: sliding-window attention is not supported by the text-generation "
        f"export (its caches attend over every slot); {way}"
    )
