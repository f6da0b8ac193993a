"""A transformers model as torch.export sees it: token ids in, logits out, no KV cache.

A decoder's default `use_cache=True` returns a `DynamicCache` that torch.export cannot return; slimming
and the exporters trace `LogitsOnly(model)`, whose forward turns the cache off and returns one tensor.
The wrapped model is the user's own object (`wrapper.model`): slimming it in place slims the model.
"""

from __future__ import annotations

import copy
import inspect
import sys
import types
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


def is_cached_decoder(model: Any) -> bool:
    """True for a transformers model whose forward returns a KV cache by default (`config.use_cache`)."""
    transformers = sys.modules.get("transformers")  # a transformers model means transformers is imported
    if transformers is None or not isinstance(model, transformers.PreTrainedModel):
        return False
    params = inspect.signature(model.forward).parameters
    return bool(getattr(model.config, "use_cache", False)) and (
        "use_cache" in params or _takes_kwargs(params)
    )


def for_tracing(model: Any) -> Any:
    """`model` as torch.export should see it. A transformers decoder with its default cache settings gets
    a view of itself (the same parameters, buffers and submodules under the same names) whose forward
    takes token ids and returns the logits with the KV cache off; any other model is returned as it is.

    `slim(for_tracing(model), ids)` reports the model's own tensor names, so `result.apply_to(model, ids)`
    and `find_groups` work on the model itself.
    """
    if not is_cached_decoder(model):
        return model
    view = copy.copy(model)  # shallow: shares the parameter, buffer and module tables
    view.forward = types.MethodType(_logits_forward, view)
    return view


def _logits_forward(self: Any, input_ids: torch.Tensor) -> torch.Tensor:
    out = type(self).forward(self, input_ids=input_ids, use_cache=False, return_dict=True)
    return out.logits
