"""Accept models pruned elsewhere: torch.nn.utils.prune reparametrisations, zeroed models, checkpoints.

* ``make_prune_permanent(model)``: every ``weight_orig`` / ``weight_mask`` pair left by
  ``torch.nn.utils.prune`` becomes a plain parameter ``weight = weight_orig * weight_mask``.
* ``fold_mask_keys(state_dict)``: the same on a saved state dict (``*_orig`` and ``*_mask`` keys).
* ``load_state_checkpoint(path, factory)``: ``torch.load(weights_only=True)`` of a state dict (bare, or
  under ``state_dict`` / ``model``) into ``factory()``'s model; a file that needs full unpickling is
  refused with a message naming the file and the ``allow_pickle=True`` opt-in.
* ``compress("import", model, example_inputs, None, tol=0.0)``: make pruning permanent, snap groups
  whose norm is <= ``tol`` to exactly zero (tools that leave 1e-12 dust), and report the structure the
  slimming engine will find (zero groups per space, unstructured zeros it cannot use).
"""

from __future__ import annotations

import copy
import logging
import pickle
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from slimship.compress.groups import GroupTensors
from slimship.compress.registry import CompressResult, register
from slimship.compress.training import Batch
from slimship.errors import CompressionError, ModelFileError
from slimship.slimming.api import find_groups

log = logging.getLogger(__name__)

STATE_KEYS = ("state_dict", "model_state_dict", "model")


def make_prune_permanent(model: nn.Module) -> list[str]:
    """Remove torch.nn.utils.prune reparametrisations in place; return the names made permanent."""
    done = []
    for module_name, module in model.named_modules():
        hooks = [h for h in module._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)]
        for hook in hooks:
            names = (
                [m._tensor_name for m in hook]
                if isinstance(hook, prune.PruningContainer)
                else [hook._tensor_name]
            )
            for name in dict.fromkeys(names):
                if hasattr(module, f"{name}_orig"):
                    prune.remove(module, name)
                    done.append(f"{module_name}.{name}" if module_name else name)
    if done:
        log.info("made %d pruned tensors permanent: %s", len(done), ", ".join(done))
    return done


def _pruned_tensors(model: nn.Module) -> list[tuple[nn.Module, str]]:
    out = []
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                names = (
                    [m._tensor_name for m in hook]
                    if isinstance(hook, prune.PruningContainer)
                    else [hook._tensor_name]
                )
                out += [(module, n) for n in dict.fromkeys(names) if hasattr(module, f"{n}_orig")]
    return out


def copy_pruned(model: nn.Module) -> nn.Module:
    """Deep copy that also works while torch.nn.utils.prune masks are attached (computed weights)."""
    stash = [(m, n, getattr(m, n)) for m, n in _pruned_tensors(model)]
    for m, n, _ in stash:
        delattr(m, n)
    try:
        clone = copy.deepcopy(model)
    finally:
        for m, n, value in stash:
            setattr(m, n, value)
    with torch.no_grad():
        for m, n in _pruned_tensors(clone):
            setattr(m, n, getattr(m, f"{n}_orig") * getattr(m, f"{n}_mask"))
    return clone


def fold_mask_keys(state: Mapping[str, Any]) -> dict[str, Any]:
    """A state dict where each ``X_orig`` / ``X_mask`` pair is replaced by ``X = X_orig * X_mask``."""
    out = dict(state)
    for key in [k for k in state if k.endswith("_orig")]:
        base = key[: -len("_orig")]
        mask = state.get(f"{base}_mask")
        if mask is None:
            continue
        out[base] = state[key] * mask
        del out[key], out[f"{base}_mask"]
    return out


def _state_dict_of(obj: Any, path: Path) -> Mapping[str, Any]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        for key in STATE_KEYS:
            if isinstance(obj.get(key), Mapping):
                return obj[key]
            if isinstance(obj.get(key), nn.Module):
                return obj[key].state_dict()
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise ModelFileError(
        f"{path}: not a state dict (a mapping of tensor names to tensors, or one under "
        f"{', '.join(map(repr, STATE_KEYS))}); got {type(obj).__name__}"
    )


def load_state_checkpoint(
    path: str | Path,
    factory: Callable[[], nn.Module] | None = None,
    *,
    allow_pickle: bool = False,
    strict: bool = True,
) -> nn.Module:
    """Load a checkpoint into a model built by `factory` (or a pickled whole module if `allow_pickle`).

    Loads with ``weights_only=True`` unless `allow_pickle=True` (which runs arbitrary code from the file:
    only for files you trust). Pruning masks in the state dict are folded into the weights.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as exc:
        raise ModelFileError(
            f"{path}: this checkpoint needs full unpickling (weights_only=False), which can run code from "
            f"the file. If you trust it, pass allow_pickle=True (config: model.allow_pickle: true). ({exc})"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise ModelFileError(f"{path}: not a readable torch checkpoint ({exc})") from exc
    if isinstance(obj, nn.Module) and factory is None:
        make_prune_permanent(obj)
        return obj
    if factory is None:
        raise ModelFileError(
            f"{path} holds a state dict; pass the factory that builds its model (model.factory)"
        )
    model = factory()
    state = fold_mask_keys(_state_dict_of(obj, path))
    try:
        missing, unexpected = model.load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        raise ModelFileError(f"{path}: does not fit the factory's model: {exc}") from exc
    if missing or unexpected:
        log.warning("%s: missing keys %s, unexpected keys %s", path, missing, unexpected)
    return model


@register("import")
def import_pruned(
    model: nn.Module,
    example_inputs: Any,
    train: Iterable[Batch] | None = None,
    test: Iterable[Batch] | None = None,
    *,
    tol: float = 0.0,
) -> CompressResult:
    """Take a model pruned by another tool as it is: permanent masks, exact zeros, a structure report."""
    if tol < 0:
        raise CompressionError(f"tol must be >= 0, got {tol}")
    model = copy_pruned(model)
    permanent = make_prune_permanent(model)
    found = find_groups(model, example_inputs)
    gt = GroupTensors(model, found.groups)
    snapped = 0
    per_space: dict[str, list[int]] = {}
    for i, g in enumerate(found.groups):
        zero = gt.is_zero(i)
        if not zero and tol > 0 and gt.norm(i) <= tol:
            gt.zero(i)
            snapped += 1
            zero = True
        entry = per_space.setdefault(g.space, [0, 0])
        entry[0] += int(zero)
        entry[1] += 1
    params = [p for p in model.parameters() if p.dim() > 1]
    zeros = sum(int((p == 0).sum()) for p in params)
    total = sum(p.numel() for p in params)
    in_groups = sum(
        int(t[idx].numel()) for i in range(len(gt)) if gt.is_zero(i) for t, idx in gt.slices[i] if t.dim() > 1
    )
    info = {
        "made_permanent": permanent,
        "snapped_to_zero": snapped,
        "zero_groups": sum(v[0] for v in per_space.values()),
        "groups": len(found.groups),
        "per_space": per_space,
        "pinned_spaces": found.pinned_spaces,
        "zero_weight_fraction": zeros / max(total, 1),
        "unstructured_zero_fraction": max(zeros - in_groups, 0) / max(total, 1),
    }
    if info["unstructured_zero_fraction"] > 0.05 and not info["zero_groups"]:
        log.warning(
            "%.0f%% of the weights are zero but no whole channel group is: unstructured sparsity does not "
            "slim; prune whole channels (e.g. prune.ln_structured(dim=0)) or use hesso",
            100 * info["unstructured_zero_fraction"],
        )
    return CompressResult(model=model, method="import", history=[], info=info)
