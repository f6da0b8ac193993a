"""Per-step cost of each sparsifier against plain training, and one process against two (torchrun, gloo).

    PYTHONPATH=. python benchmarks/bench_compress_overhead.py [--quick] [--models lenet5,small_resnet]
        [--methods hesso,hspg,drop,csgd,magnitude,simguided] [--steps 200] [--no-ddp]

For each model (slimship.models, digits batches of 64, one thread) and each sparsifier, two copies of the
same model train on the same batches with the same optimizer (SGD, momentum 0.9): one plain, one with
the sparsifier's ``after_backward`` / ``after_step`` around the step. The steps are interleaved (plain,
sparsified, plain, ...) and each is timed; the run covers all stages of the method (``total_steps`` is
the number of timed steps). Printed: median plain step, median sparsified step, the median of per-pair
ratios and the ratio of total times (which includes the rare decision steps).

Then HESSO on small_resnet runs under ``torchrun --nproc_per_node=1`` and ``=2`` on the same global batches
(64, split across ranks): the per-step median of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from slimship.compress import sparsifier
from slimship.data import digits_loaders
from slimship.models import lenet5, small_resnet

MODELS = {"lenet5": lenet5, "small_resnet": small_resnet}
METHODS = ("hesso", "hspg", "drop", "csgd", "magnitude", "simguided")
BATCH = 64


def batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` batches of 64 digits (passes repeat with a new shuffle), dropping the short last batch."""
    train, _ = digits_loaders(batch_size=BATCH, seed=0)
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    while len(out) < steps:
        out += [(x, y) for x, y in train if len(y) == BATCH]
    return out[:steps]


def timed_step(model, optimizer, x, y, sp=None) -> float:
    start = time.perf_counter()
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    if sp is not None:
        sp.after_backward()
    optimizer.step()
    if sp is not None:
        sp.after_step()
    return time.perf_counter() - start


def overhead(model_name: str, method: str, data: list) -> dict[str, float]:
    """Interleaved plain / sparsified steps on two copies of the model: medians and ratios."""
    plain, sparse = MODELS[model_name](seed=0).train(), MODELS[model_name](seed=0).train()
    sp = sparsifier(method, sparse, data[0][0][:2], total_steps=len(data))
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.02, momentum=0.9)
    opt_sparse = torch.optim.SGD(sparse.parameters(), lr=0.02, momentum=0.9)
    for x, y in data[:3]:  # warm-up of both (allocator, kernels); not timed, not counted by the sparsifier
        timed_step(plain, opt_plain, x, y)
    times_plain, times_sparse = [], []
    for x, y in data:
        times_plain.append(timed_step(plain, opt_plain, x, y))
        times_sparse.append(timed_step(sparse, opt_sparse, x, y, sp))
    ratios = [s / p for p, s in zip(times_plain, times_sparse, strict=True)]
    return {
        "plain_ms": 1e3 * statistics.median(times_plain),
        "sparse_ms": 1e3 * statistics.median(times_sparse),
        "median_ratio": statistics.median(ratios),
        "total_ratio": sum(times_sparse) / sum(times_plain),
        "sparsity": sp.summary()["group_sparsity"],
    }


# ---- one process vs two ------------------------------------------------------------------------------
def worker(out: Path, steps: int) -> None:
    """Run by each torchrun rank: HESSO on small_resnet, global batch 64 split across ranks."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = small_resnet(seed=0).train()
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    data = batches(steps + 3)
    sp = sparsifier("hesso", wrapped, data[0][0][:2], total_steps=steps)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.02, momentum=0.9)
    times = []
    for k, (x, y) in enumerate(data):
        dist.barrier()
        t = timed_step(wrapped, optimizer, x[rank::world], y[rank::world], sp if k >= 3 else None)
        times.append(t)
    if rank == 0:
        out.write_text(json.dumps({"world": world, "step_ms": 1e3 * statistics.median(times[3:])}))
    dist.destroy_process_group()


def processes(steps: int) -> dict[int, float]:
    """Median step time under torchrun with 1 and with 2 processes."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    results = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, 2):
            out = Path(tmp) / f"world{n}.json"
            cmd = [torchrun, f"--nproc_per_node={n}", "--master_port", str(29700 + n), __file__]
            subprocess.run([*cmd, "--worker", str(out), "--steps", str(steps)], check=True, env=env)
            results[n] = json.loads(out.read_text())["step_ms"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps (smoke run)")
    parser.add_argument("--models", default="lenet5,small_resnet")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--no-ddp", action="store_true", help="skip the 1- vs 2-process timing")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = args.steps or (60 if args.quick else 300)
    if args.worker is not None:
        worker(args.worker, steps)
        return
    torch.set_num_threads(1)
    data = batches(steps)
    rows: list[dict[str, Any]] = []
    print(
        f"{'model':<13} {'method':<10} {'plain ms':>9} {'sparse ms':>10} "
        f"{'median ratio':>13} {'total ratio':>12}"
    )
    for model_name in args.models.split(","):
        for method in args.methods.split(","):
            r = {"model": model_name, "method": method, **overhead(model_name, method, data)}
            rows.append(r)
            print(
                f"{model_name:<13} {method:<10} {r['plain_ms']:>9.2f} {r['sparse_ms']:>10.2f} "
                f"{r['median_ratio']:>12.3f}x {r['total_ratio']:>11.3f}x",
                flush=True,
            )
    if not args.no_ddp:
        timing = processes(max(20, steps // 3))
        print(
            f"hesso small_resnet, global batch {BATCH}: 1 process {timing[1]:.2f} ms/step, "
            f"2 processes {timing[2]:.2f} ms/step, ratio 2p/1p {timing[2] / timing[1]:.3f}"
        )


if __name__ == "__main__":
    main()
