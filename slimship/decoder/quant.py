"""8da4w: 8-bit dynamic activations and 4-bit group-wise weights on every Linear (ExecuTorch's LLM recipe).

torchao's `Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32))`
as ExecuTorch's LLM export applies it; XNNPACK runs it as a dynamically quantised linear. XNNPACK takes
4-bit groups only in multiples of 32 along the input, so a Linear whose input width is not a multiple of
the group size (a slim FFN of 77 channels, say) gets 8-bit per-channel weights instead (XNNPACK's qc8w),
and the result names those layers: slim with `--channel-multiple 32` to keep every layer at 4 bits.
Embeddings stay float32 (ExecuTorch's quantised embedding kernels are outside XNNPACK).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from slimship.errors import ExportError

GROUP_SIZE = 32


@dataclasses.dataclass(frozen=True)
class QuantReport:
    """Which Linear layers got 4-bit groups and which fell back to 8-bit per-channel weights (and why)."""

    group_size: int
    int4: tuple[str, ...]
    int8_fallback: tuple[str, ...]

    @property
    def note(self) -> str:
        if not self.int8_fallback:
            return f"all {len(self.int4)} Linear layers at 4 bits (groups of {self.group_size})"
        shown = ", ".join(self.int8_fallback[:4]) + (" ..." if len(self.int8_fallback) > 4 else "")
        return (
            f"{len(self.int4)} Linear layers at 4 bits (groups of {self.group_size}); "
            f"{len(self.int8_fallback)} at 8-bit per-channel because their input width is not a multiple "
            f"of {self.group_size} ({shown}): slim with --channel-multiple {self.group_size} to avoid it"
        )


def quantize_8da4w(model: nn.Module, group_size: int = GROUP_SIZE) -> QuantReport:
    """Quantise `model`'s Linear layers in place (see the module doc); returns which got what."""
    try:
        from torchao.quantization import quantize_
        from torchao.quantization.granularity import PerAxis, PerGroup
        from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig
    except ImportError as exc:
        raise ExportError(f"executorch-8da4w needs torchao ({exc}); install slimship[executorch]") from None
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    int4 = tuple(name for name, m in linears.items() if m.in_features % group_size == 0)
    fallback = tuple(name for name in linears if name not in int4)
    chosen = set(int4)
    quantize_(
        model,
        Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(group_size)
        ),
        filter_fn=lambda m, name: isinstance(m, nn.Linear) and name in chosen,
    )
    if fallback:
        rest = set(fallback)
        quantize_(
            model,
            Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)),
            filter_fn=lambda m, name: isinstance(m, nn.Linear) and name in rest,
        )
    return QuantReport(group_size, int4, fallback)
