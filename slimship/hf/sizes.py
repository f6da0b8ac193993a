"""Per-layer sizes of a slim transformers model, read from its weights and written into its modules.

transformers modules keep sizes next to their weights: a Linear's `out_features` (GPT-2's transposed
`Conv1D`: `nf`), an attention's `num_key_value_groups` (GPT-2's: `split_size`), and some read sizes
from the config every layer shares (Phi-3 splits its fused `qkv_proj` at
`config.num_attention_heads * head_dim`). After slimming, each layer has its own sizes: `sync_sizes`
sets the attributes a module keeps and gives a module whose sizes differ from the shared config a
`LayerConfig`: its own sizes, everything else read live from the shared config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

SizeRule = Callable[[nn.Module], int | None]


def _linear(module: nn.Module, *names: str) -> nn.Linear | None:
    for name in names:
        linear = getattr(module, name, None)
        if isinstance(linear, nn.Linear):
            return linear
    return None


def _conv1d(module: nn.Module, name: str) -> nn.Module | None:
    """The child `name` when it is a transformers `Conv1D` (GPT-2): a Linear whose weight is stored
    transposed, [in, out], with its widths kept as `nx` (in) and `nf` (out)."""
    child = getattr(module, name, None)
    return child if isinstance(child, nn.Module) and _is_conv1d(child) else None


def _is_conv1d(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    widths = (getattr(module, "nf", None), getattr(module, "nx", None))
    return all(isinstance(w, int) for w in widths) and isinstance(weight, nn.Parameter) and weight.dim() == 2


def _split_size(module: nn.Module) -> int | None:
    """GPT-2 attention's query width: a fused `c_attn` holds q, k, v (k, v with a separate `q_attn`)."""
    if (fused := _conv1d(module, "c_attn")) is None:
        return None
    if getattr(module, "is_cross_attention", False):
        query = _conv1d(module, "q_attn")
        return query.weight.shape[1] if query is not None else None
    return fused.weight.shape[1] // 3


def _head_dim(module: nn.Module) -> int | None:
    head_dim = getattr(module, "head_dim", None)
    return head_dim if isinstance(head_dim, int) and head_dim > 0 else None


def _heads(module: nn.Module) -> int | None:
    """Query heads: q_proj's rows, or o_proj's columns (a fused qkv_proj), over head_dim."""
    head_dim = _head_dim(module)
    if head_dim is None:
        return None
    if (q := _linear(module, "q_proj")) is not None:
        return q.out_features // head_dim
    if (o := _linear(module, "o_proj")) is not None and _linear(module, "qkv_proj") is not None:
        return o.in_features // head_dim
    if (split := _split_size(module)) is not None:
        return split // head_dim
    return None


def _kv_heads(module: nn.Module) -> int | None:
    """Key/value heads: k_proj's rows, or what a fused qkv_proj holds beside the query heads."""
    head_dim, heads = _head_dim(module), _heads(module)
    if head_dim is None or heads is None:
        return None
    if (k := _linear(module, "k_proj")) is not None:
        return k.out_features // head_dim
    if (qkv := _linear(module, "qkv_proj")) is not None:
        return (qkv.out_features - heads * head_dim) // (2 * head_dim)
    return None


def _groups(module: nn.Module) -> int | None:
    heads, kv = _heads(module), _kv_heads(module)
    return heads // kv if heads and kv else None


def _width(module: nn.Module) -> int | None:
    """An MLP's hidden width: up/gate projection rows (half of a fused gate_up_proj)."""
    if (up := _linear(module, "up_proj", "gate_proj", "fc1", "c_fc")) is not None:
        return up.out_features
    if (fused := _linear(module, "gate_up_proj")) is not None:
        return fused.out_features // 2
    if (conv := _conv1d(module, "c_fc")) is not None:
        return conv.weight.shape[1]
    return None


#: size attribute a transformers module keeps -> how to read it from the module's (slim) weights
SIZE_RULES: dict[str, SizeRule] = {
    "num_heads": _heads,
    "num_attention_heads": _heads,
    "num_key_value_heads": _kv_heads,
    "num_key_value_groups": _groups,
    "intermediate_size": _width,
    "split_size": _split_size,
}
#: the sizes reported per module and given to a module's own LayerConfig (config field names)
LAYER_FIELDS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


class LayerConfig:
    """The shared config as one slim layer sees it: its own sizes; every other field (the attention
    implementation included) read from the shared config when asked."""

    def __init__(self, shared: Any, sizes: dict[str, int]) -> None:
        self.__dict__["_shared"] = shared
        self.__dict__.update(sizes)

    def __getattr__(self, name: str) -> Any:
        if name == "_shared":  # while unpickling or copying, before __init__
            raise AttributeError(name)
        return getattr(self._shared, name)

    def __repr__(self) -> str:
        own = {k: v for k, v in self.__dict__.items() if k != "_shared"}
        return f"LayerConfig({type(self._shared).__name__}, {own})"


def module_sizes(module: nn.Module) -> dict[str, int]:
    """The LAYER_FIELDS sizes `module`'s weights give (empty for a module without heads or MLP width)."""
    sizes = {name: SIZE_RULES[name](module) for name in LAYER_FIELDS}
    return {k: v for k, v in sizes.items() if v is not None}


def sync_sizes(model: nn.Module) -> None:
    """Set the size attributes modules keep from their weights (Linear, Embedding, attention, MLP); a
    module whose sizes differ from the config it holds gets a LayerConfig with its own."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight is not None:
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.Embedding):
            module.num_embeddings, module.embedding_dim = module.weight.shape
        elif _is_conv1d(module):
            module.nx, module.nf = module.weight.shape
        for attr, rule in SIZE_RULES.items():
            current = getattr(module, attr, None)
            if isinstance(current, int) and not isinstance(current, bool):
                value = rule(module)
                if value is not None:
                    setattr(module, attr, value)
        _own_config(module)


def _own_config(module: nn.Module) -> None:
    config = getattr(module, "config", None)
    if config is None:
        return
    shared = config._shared if isinstance(config, LayerConfig) else config
    sizes = {k: v for k, v in module_sizes(module).items() if getattr(shared, k, None) not in (None, v)}
    if sizes:
        module.config = LayerConfig(shared, sizes)
    elif isinstance(config, LayerConfig):
        module.config = shared


def layer_sizes(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per module with attention heads or an MLP width: those sizes, e.g.
    {"model.layers.0.self_attn": {"num_attention_heads": 4, "num_key_value_heads": 2}}."""
    return {name: sizes for name, module in model.named_modules() if name and (sizes := module_sizes(module))}
