"""Sizes a checkpoint's config.json claims, checked against its safetensors headers before any model exists.

transformers builds the model config.json describes (on the meta device, but one Python object per module),
so a config that claims 40,000 layers or a vocabulary of 10^12 costs gigabytes before a single weight is
compared. Each rule reads one claim and the header figure it must agree with; a disagreement is a
ModelFileError naming the key and the tensor. A rule with nothing to compare with says nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimship.errors import ModelFileError

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embeddings.weight")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class Claim:
    """One size config.json states, the figure the weights give for it, and how the two must relate."""

    keys: tuple[str, ...]  # config keys naming the size (the first present is read)
    figure: Callable[[dict[str, list[int]]], tuple[int, str] | None]  # (figure, tensor it came from)
    agrees: Callable[[int, int], bool]  # (claimed, figure) -> consistent
    what: str  # what the figure is, for the message
    dense_only: bool = False  # slimming may change this size: checked on dense folders only


def _layers(shapes: dict[str, list[int]]) -> tuple[int, str] | None:
    found = [(int(m.group(1)), name) for name in shapes if (m := _LAYER_INDEX.search(name))]
    if not found:
        return None
    top, name = max(found)
    return top + 1, name


def _embedding(dim: int) -> Callable[[dict[str, list[int]]], tuple[int, str] | None]:
    def figure(shapes: dict[str, list[int]]) -> tuple[int, str] | None:
        for name, shape in sorted(shapes.items()):
            if name.endswith(_EMBEDDINGS) and len(shape) == 2:
                return shape[dim], name
        return None

    return figure


CLAIMS: tuple[Claim, ...] = (
    Claim(_LAYER_KEYS, _layers, lambda claimed, held: claimed <= held, "layers the weights hold"),
    Claim(("vocab_size",), _embedding(0), lambda claimed, rows: claimed <= rows, "rows of the embedding"),
    Claim(
        ("hidden_size", "n_embd", "d_model"),
        _embedding(1),
        lambda claimed, width: claimed == width,
        "width of the embedding",
        dense_only=True,
    ),
)


def _claimed(config: dict[str, Any], keys: tuple[str, ...]) -> tuple[str, Any] | None:
    for scope in (config, config.get("text_config") if isinstance(config.get("text_config"), dict) else None):
        for key in keys:
            if scope is not None and key in scope:
                return key, scope[key]
    return None


def check_claims(config_path: Path, config: dict[str, Any], shapes: dict[str, list[int]], slim: bool) -> None:
    """Raise ModelFileError when config.json claims a size its weights (safetensors headers) contradict."""
    for claim in CLAIMS:
        found = _claimed(config, claim.keys)
        if found is None or (claim.dense_only and slim):
            continue
        key, value = found
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ModelFileError(f"{config_path}: {key} is {value!r}, not a size")
        figure = claim.figure(shapes)
        if figure is not None and not claim.agrees(value, figure[0]):
            raise ModelFileError(
                f"{config_path}: {key} {value:,} disagrees with the weights: {figure[0]:,} {claim.what} "
                f"({figure[1]!r} is {shapes[figure[1]]})"
            )
