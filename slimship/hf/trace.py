"""A transformers model as torch.export sees it: token ids in, logits out, no KV cache.

A decoder's default `use_cache=True` returns a `DynamicCache` that torch.export cannot return; slimming
and the exporters trace `LogitsOnly(model)`, whose forward turns the cache off and returns one tensor.
The wrapped model is the user's own object (`wrapper.model`): slimming it in place slims the model.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

DEFAULT_TOKENS = 8  # example sequence length when none is given


class LogitsOnly(nn.Module):
    """`model(input_ids=ids, use_cache=False).logits` as a module of one tensor in, one tensor out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        params = inspect.signature(model.forward).parameters
        self._cache_off = {"use_cache": False} if "use_cache" in params or _takes_kwargs(params) else {}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, return_dict=True, **self._cache_off)
        logits = getattr(out, "logits", None)
        return logits if isinstance(logits, torch.Tensor) else out[0]


def _takes_kwargs(params: Any) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def vocab_size(config: Any) -> int:
    """The vocabulary size of a (possibly composite) transformers config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text, "vocab_size", None)
    return int(size) if isinstance(size, int) and size > 0 else 2


def example_ids(config: Any, tokens: int = DEFAULT_TOKENS, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """Random token ids [batch, tokens] below the model's vocabulary size (a fixed seed)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size(config), (batch, tokens), generator=generator)
