"""A real one-process gloo group for tests of the torchrun code paths (broadcasts, DDP wrappers)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist


@contextmanager
def single_process_group(tmp_path: Path) -> Iterator[None]:
    """init_process_group("gloo", world_size=1) on a FileStore in `tmp_path`; destroyed on exit."""
    store = dist.FileStore(str(tmp_path / "gloo-store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        gc.collect()  # DDP reducers the block left unreferenced die while their group lives
        dist.destroy_process_group()
