"""What a decoder export needs of the model before any work: fp32 weights and no sliding window.

- A half-precision checkpoint (fp16 / bf16, as most published LLMs are) is converted to fp32 in place,
  once: every format starts from fp32 (the fp32 files are fp32; quantised ones are made from fp32) and
  the reference generation runs on the same fp32 model, so each file is judged against what it computes.
- Sliding-window attention: a window covering --max-seq-len is switched off (it masks nothing there),
  a shorter one refused naming its config key: the exported caches attend over every slot.
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


def check_sliding_window(model: nn.Module, max_seq_len: int) -> tuple[str, object, int] | None:
    """(config key, value, window) of a sliding window at least `max_seq_len` long (it masks nothing
    within the cache: `switch_off_sliding_window` exports the same outputs), None without a window; a
    shorter window is refused (ConfigError naming the key): the export's caches attend over every slot."""
    found = sliding_window(model)
    if found is None:
        return None
    key, value = found
    window = model.config.get_text_config().sliding_window
    if not isinstance(window, int) or window < max_seq_len:
        raise ConfigError(
            f"config.json {key} = {value!r}: a sliding window of {window} tokens is not supported by the "
            f"text-generation export (its caches attend over every slot); give --max-seq-len {window} or "
            "less (a window that covers the whole cache masks nothing), or a checkpoint without one"
        )
    return key, value, window


def switch_off_sliding_window(model: nn.Module, found: tuple[str, object, int], max_seq_len: int) -> str:
    """Switch the sliding window off in place (the config and the attention modules that copied it); the
    note saying so."""
    text = model.config.get_text_config()
    text.sliding_window = None
    if getattr(text, "use_sliding_window", None) is not None:
        text.use_sliding_window = False
    if getattr(text, "layer_types", None) is not None:
        text.layer_types = ["full_attention" if t == "sliding_attention" else t for t in text.layer_types]
    for module in model.modules():
        if getattr(module, "layer_type", None) == "sliding_attention":
            module.layer_type = "full_attention"
        if isinstance(getattr(module, "sliding_window", None), int):
            module.sliding_window = None
        if getattr(module, "has_sliding_layers", False) is True:
            module.has_sliding_layers = False
    key, value, window = found
    return (
        f"{key} {value!r} (window {window}) covers --max-seq-len {max_seq_len}: exported with full "
        "attention, checked against the reference made with the window"
    )
