"""Reference runner on PyTorch (host only: devices never import torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimship.errors import ModelFileError
from slimship.exporters.common import torch_outputs


class TorchRunner:
    """Runs an `nn.Module` (given directly) or a `torch.export` program (.pt2) in eval mode."""

    def __init__(self, module: torch.nn.Module | None = None, threads: int | None = None) -> None:
        self.module = module.eval() if module is not None else None
        self.threads = threads
        self.source = "module" if module is not None else None

    def load(self, path: str | Path) -> TorchRunner:
        path = Path(path)
        if path.suffix != ".pt2":
            raise ModelFileError(
                f"{path}: TorchRunner loads torch.export programs (.pt2); pass a module instead"
            )
        from slimship.loading import load_program

        self.module = load_program(path).module  # never unpickles; ModelFileError names the file
        self.source = str(path)
        return self

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        if self.module is None:
            raise ModelFileError("TorchRunner: no module; pass one or call load(path)")
        previous = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:  # outputs flattened (tensor, tuple, dict ...) the way the exported files order them
            return torch_outputs(self.module, [torch.from_numpy(np.ascontiguousarray(x)) for x in inputs])
        finally:
            torch.set_num_threads(previous)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "torch",
            "version": torch.__version__,
            "threads": self.threads,
            "source": self.source,
        }
