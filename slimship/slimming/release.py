"""Release the source's dense tensors as their slim ones are made (`slim(..., release_source=True)`).

Each dense tensor is written to a temporary file before it is dropped from the source model and the
traced graph, so a slim that does not verify can put every dense tensor back and try again; the
files go when the slim is done. Tied tensors (one tensor under several names) are replaced under
every name, so the dense one is really freed.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimship.slimming.graph import get_tensor

log = logging.getLogger(__name__)


def set_tensor(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put `tensor` at a qualified name, as a parameter, buffer or plain attribute like the old one."""
    prefix, _, leaf = name.rpartition(".")
    owner = module.get_submodule(prefix) if prefix else module
    if leaf in owner._parameters:
        if not isinstance(tensor, nn.Parameter):
            old = owner._parameters[leaf]
            tensor = nn.Parameter(tensor, requires_grad=old.requires_grad if old is not None else True)
        owner._parameters[leaf] = tensor
    elif leaf in owner._buffers:
        owner._buffers[leaf] = tensor
    else:
        setattr(owner, leaf, tensor)


def tensor_names(module: nn.Module) -> dict[int, list[str]]:
    """Every qualified name of each parameter and buffer (tied tensors have several), by id."""
    names: dict[int, list[str]] = defaultdict(list)
    for name, t in module.named_parameters(remove_duplicate=False):
        names[id(t)].append(name)
    for name, t in module.named_buffers(remove_duplicate=False):
        names[id(t)].append(name)
    return dict(names)


class DenseRelease:
    """The `release` callback of `rewrite`: spill a dense tensor to disk, then swap the slim one into
    every module that held the dense one (the traced graph and the user's model)."""

    def __init__(self, holders: list[nn.Module]) -> None:
        self.holders = holders
        self.folder = Path(tempfile.mkdtemp(prefix="slimship-dense-"))
        self.spilled: dict[str, tuple[Path, torch.dtype, torch.Size, bool | None]] = {}
        self.names = [tensor_names(h) for h in holders]

    def __call__(self, name: str, new: torch.Tensor) -> None:
        dense = get_tensor(self.holders[0], name)
        if name not in self.spilled:
            path = self.folder / f"{len(self.spilled)}.bin"
            flat = dense.detach().contiguous().reshape(-1)
            flat.view(torch.uint8).numpy().tofile(path) if flat.numel() else path.write_bytes(b"")
            grad = dense.requires_grad if isinstance(dense, nn.Parameter) else None
            self.spilled[name] = (path, dense.dtype, dense.shape, grad)
        self._swap(dense, new)

    def _swap(self, old: torch.Tensor, new: torch.Tensor) -> None:
        for holder, names in zip(self.holders, self.names, strict=True):
            for alias in names.pop(id(old), []):
                set_tensor(holder, alias, new)
                names.setdefault(id(new), []).append(alias)

    def restore(self) -> None:
        """Put every spilled dense tensor back where its slim one went (a retry starts from the source)."""
        for name, (path, dtype, shape, grad) in self.spilled.items():
            raw = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
            dense = raw.view(dtype).reshape(shape)
            dense = nn.Parameter(dense, requires_grad=grad) if grad is not None else dense
            self._swap(get_tensor(self.holders[0], name), dense)
        log.info("restored %d dense tensors from %s", len(self.spilled), self.folder)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
