"""PT2E calibration: the quantizers' own observers, run on one intra-op thread.

The static int8 quantizers (LiteRT's PT2EQuantizer, ExecuTorch's XNNPACKQuantizer) observe activations
with `HistogramObserver`: per batch and per observed tensor, an `aminmax`, a `histc` of 2048 bins and,
when the range grows, a re-binning. Each is a small op on a small tensor, and with several intra-op
threads each one pays a thread-pool hand-off: on a 2-core machine that is busy elsewhere, calibration
ran 10-30x slower on 2 threads than on 1 (benchmarks/bench_export_times.py measures it). Calibration
therefore runs on one thread; the observers, the data and their order are unchanged, so the statistics
and the quantisation parameters are the observers' own. The parity checks that follow (one sample at a
time through PyTorch) run on one thread too (`small_ops`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

#: torch's intra-op threads for calibration and parity checks (small ops on small tensors); None: torch's
#: own setting (what the benchmark compares against)
SMALL_OP_THREADS: int | None = 1


@contextlib.contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to `count` inside, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def small_ops() -> contextlib.AbstractContextManager[None]:
    """Inside: SMALL_OP_THREADS intra-op threads (torch's own setting when it is None)."""
    return intra_op_threads(SMALL_OP_THREADS or torch.get_num_threads())


def calibrate(prepared: torch.nn.Module, batches: Sequence[tuple[torch.Tensor, ...]]) -> None:
    """Run `batches` through a `prepare_pt2e` module so that its observers see them, in order, on
    SMALL_OP_THREADS intra-op threads."""
    with torch.no_grad(), small_ops():
        for batch in batches:
            prepared(*batch)
