"""Trace a model with torch.export into a GraphModule whose parameters keep their qualified names."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimship.errors import SlimmingError, first_line
from slimship.hf.trace import for_tracing

log = logging.getLogger(__name__)


@dataclass
class Traced:
    """A traced copy of the model: `gm` runs like the model; `dynamic_batch` says whether dim 0 is free."""

    gm: torch.fx.GraphModule
    example_inputs: tuple[Any, ...]
    dynamic_batch: bool


def as_input_tuple(example_inputs: Any) -> tuple[Any, ...]:
    """Accept a tensor, a tuple or a list of example inputs."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list | tuple):
        return tuple(example_inputs)
    raise SlimmingError(
        f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}"
    )


def _export(model: nn.Module, inputs: tuple[Any, ...], dynamic: bool) -> torch.export.ExportedProgram:
    dynamic_shapes = None
    if dynamic:
        dynamic_shapes = tuple(
            {0: torch.export.Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() > 0 else None
            for x in inputs
        )
    return torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes, strict=False)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode for the duration; every submodule's own flag restored afterwards. The flags
    are set directly: a program's `module()` refuses `eval()` ("not supported yet")."""
    flags = [(m, m.training) for m in model.modules()]
    for m, _ in flags:
        m.training = False
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def drop_unread_attrs(gm: torch.fx.GraphModule) -> None:
    """Erase get_attr nodes nothing reads (a buffer kept for other settings, such as a rotary
    embedding's `original_inv_freq`): their tensors then stay exactly as they are."""
    unread = [n for n in gm.graph.nodes if n.op == "get_attr" and not n.users]
    for node in unread:
        gm.graph.erase_node(node)
    if unread:
        gm.recompile()


def shared_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of `gm` (modules, graph, code) that shares its parameters and buffers, without copying
    a single weight: a rewrite of the copy replaces tensors in the copy only."""
    memo: dict[int, Any] = {id(t): t for t in [*gm.parameters(), *gm.buffers()]}
    for module in gm.modules():  # constants the export lifted: plain tensor attributes
        memo.update({id(v): v for v in vars(module).values() if isinstance(v, torch.Tensor)})
    return copy.deepcopy(gm, memo)


def trace(model: nn.Module, example_inputs: Any, dynamic_batch: bool = True) -> Traced:
    """Export `model` (in eval mode) and return its GraphModule, which shares the model's tensors.

    Nothing is copied: the traced module holds the model's own parameters and buffers (a rewrite
    replaces them by new tensors, never writes into them), and the model's train/eval flags are
    restored afterwards. Parameters and buffers the forward does not read get no node, so nothing
    downstream touches them. A dynamic batch dimension is tried first; a model that specialises its
    batch falls back to a static trace (logged). A transformers decoder with its default KV cache is
    traced as token ids -> logits with the cache off (`slimship.hf.for_tracing`: the same tensors).
    """
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    if not isinstance(model, nn.Module):
        raise SlimmingError(f"expected an nn.Module or ExportedProgram, got {type(model).__name__}")
    model = for_tracing(model)
    inputs = as_input_tuple(example_inputs)
    errors = []
    for dynamic in (True, False) if dynamic_batch else (False,):
        try:
            with torch.no_grad(), _eval_mode(model):
                program = _export(model, inputs, dynamic)
            gm = program.module()
            del program
            drop_unread_attrs(gm)
            return Traced(gm=gm, example_inputs=inputs, dynamic_batch=dynamic)
        except Exception as exc:  # torch.export raises many exception types
            errors.append(exc)
            log.info("export with dynamic_batch=%s failed: %s", dynamic, first_line(exc))
    raise SlimmingError(
        f"torch.export could not trace {type(model).__name__}: {first_line(errors[-1])}. "
        "Make the forward exportable (no data-dependent Python control flow) or pass an ExportedProgram."
    ) from errors[-1]
