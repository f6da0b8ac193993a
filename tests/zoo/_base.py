"""ZooCase, the registry and helpers shared by the zoo's family modules."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

BATCH = 2


@dataclass(repr=False)
class ZooCase:
    """One test architecture with random (seeded) weights, in eval mode.

    ``random_inputs(generator)`` draws fresh inputs of the same shapes and dtypes as ``example_inputs``
    (integer token ids for token models). ``dynamic_batch_ok`` records whether ``torch.export`` with
    ``Dim.AUTO`` on dim 0 of every input works (checked by tests/test_zoo.py).
    """

    name: str
    model: nn.Module
    example_inputs: tuple
    random_inputs: Callable[[torch.Generator], tuple]
    dynamic_batch_ok: bool = True
    family: str = ""
    notes: str = field(default="")

    def __repr__(self) -> str:
        shapes = ", ".join(f"{tuple(t.shape)}:{t.dtype}" for t in self.example_inputs)
        return f"ZooCase({self.name!r}, inputs=[{shapes}])"


ZOO: dict[str, Callable[[], ZooCase]] = {}


def register(name: str) -> Callable[[Callable[[], ZooCase]], Callable[[], ZooCase]]:
    """Decorator: add a builder to ``ZOO`` under ``name`` (names are unique)."""

    def wrap(builder: Callable[[], ZooCase]) -> Callable[[], ZooCase]:
        if name in ZOO:
            raise ValueError(f"zoo case {name!r} registered twice")
        ZOO[name] = builder
        return builder

    return wrap


def seeded(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """Build with a private RNG stream, randomise norm layers, return the model in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
        randomize_norms(model)
    return model.eval()


@torch.no_grad()
def randomize_norms(model: nn.Module) -> None:
    """Give norm layers non-trivial affine parameters and running statistics.

    Fresh BatchNorm is the identity in eval mode (mean 0, var 1, weight 1, bias 0), which would hide
    folding and slicing bugs; random statistics make every norm layer matter.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
        if isinstance(module, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm):
            if getattr(module, "weight", None) is not None:
                module.weight.uniform_(0.5, 1.5)
            if getattr(module, "bias", None) is not None:
                module.bias.uniform_(-0.3, 0.3)


def image_case(
    name: str, model: nn.Module, shape: tuple[int, ...], family: str, dynamic_batch_ok: bool = True
) -> ZooCase:
    """A case with one float input of ``(BATCH, *shape)``; example inputs come from generator seed 0."""
    full = (BATCH, *shape)

    def random_inputs(gen: torch.Generator) -> tuple:
        return (torch.randn(full, generator=gen),)

    example = random_inputs(torch.Generator().manual_seed(0))
    return ZooCase(name, model, example, random_inputs, dynamic_batch_ok, family)


def token_case(
    name: str,
    model: nn.Module,
    vocab: int,
    tokens: int,
    family: str,
    with_mask: bool = False,
    dynamic_batch_ok: bool = True,
) -> ZooCase:
    """A case with int64 token ids ``(BATCH, tokens)`` (and an int64 0/1 attention mask if asked)."""

    def random_inputs(gen: torch.Generator) -> tuple:
        ids = torch.randint(0, vocab, (BATCH, tokens), generator=gen, dtype=torch.int64)
        if not with_mask:
            return (ids,)
        lengths = torch.randint(1, tokens + 1, (BATCH,), generator=gen)
        mask = (torch.arange(tokens)[None, :] < lengths[:, None]).to(torch.int64)
        return ids, mask

    example = random_inputs(torch.Generator().manual_seed(0))
    return ZooCase(name, model, example, random_inputs, dynamic_batch_ok, family)
