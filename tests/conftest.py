"""Suite-wide order and threads, for plain `pytest` and for pytest-xdist workers (`pytest -n 2`) alike.

* The long (`slow`) tests run first, so that with several workers none is left running one alone at the
  end while the others sit idle.
* A worker gets its share of the cores as torch threads (and OMP/MKL threads for the processes it
  starts), not all of them each: two workers on two cores with two threads each would contend. A test or
  target that sets its own thread count still gets it; an OMP_NUM_THREADS set before pytest wins.
"""

from __future__ import annotations

import os

import pytest


def worker_threads() -> int | None:
    """The cores of this machine divided among the xdist workers; None outside a worker."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if not os.environ.get("PYTEST_XDIST_WORKER") or workers < 1:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // workers)


def pytest_configure(config: pytest.Config) -> None:
    threads = worker_threads()
    if threads is None or "OMP_NUM_THREADS" in os.environ:  # torch took the user's figure at import
        return
    import torch

    torch.set_num_threads(threads)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # for the processes the tests start
        os.environ.setdefault(var, str(threads))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests first; otherwise the collection order (a stable sort)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
