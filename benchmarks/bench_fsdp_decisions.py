"""Sparsifier decisions under FSDP2 against DDP and one process, on the same global batches, side by side.

    PYTHONPATH=. python benchmarks/bench_fsdp_decisions.py

One ``torchrun --nproc_per_node=2`` launch (gloo, CPU) of ``tests/compress/fsdp_sparsifier.py``: every
user-loop sparsifier trains the small CNN (8 and 12 channels) 20 steps on each rank's half of 20 global
batches of 32, once sharded with ``fully_shard`` and once under DistributedDataParallel; then a CNN of 7
and 11 channels (uneven shards) sharded, against one process inside the launch. One process also runs the
small CNN here on the whole global batches. Printed per method:

* steps whose decisions (zero groups, and the method's own: redundant, shrinking, clusters ...) are equal,
  out of 20: FSDP vs one process, DDP vs one process, FSDP vs DDP, and on the uneven CNN FSDP vs one process;
* whether the final zero groups are the same, and the largest weight difference FSDP vs DDP (gathered full
  state dict) and, uneven, FSDP vs one process;
* the time of the 20-step run under FSDP and DDP (each rank's, on this shared machine: a ratio, not a speed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.compress import ddp_sparsifier  # noqa: E402


def per_step(changes: list[list[Any]], steps: int) -> list[Any]:
    """The decisions after every step, from the list of [step, decisions] where they changed."""
    out, current, k = [], None, 0
    for step in range(steps):
        while k < len(changes) and changes[k][0] <= step:
            current = changes[k][1]
            k += 1
        out.append(current)
    return out


def agree(a: list[Any], b: list[Any]) -> int:
    return sum(x == y for x, y in zip(a, b, strict=True))


def launch(out: Path) -> list[dict[str, Any]]:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        raise SystemExit("torchrun not found beside this python")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--nproc_per_node=2", "--master_port", str(27600 + os.getpid() % 1000)]
    cmd += ["-m", "tests.compress.fsdp_sparsifier", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return [json.loads((out / f"fsdp-rank{r}.json").read_text()) for r in (0, 1)]


def main() -> None:
    torch.set_num_threads(1)
    steps = ddp_sparsifier.STEPS
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        ranks = launch(Path(tmp))
        launch_seconds = time.perf_counter() - start
    r0 = ranks[0]
    header = (
        f"{'method':<10} {'fsdp=1p':>8} {'ddp=1p':>7} {'fsdp=ddp':>9} {'uneven=1p':>10} {'ranks=':>7} "
        f"{'zeros=':>7} {'|w fsdp-ddp|':>13} {'|w uneven-1p|':>14} {'fsdp s':>7} {'ddp s':>6} {'1p s':>6}"
    )
    print(f"decisions equal at N of {steps} steps; 2 gloo ranks on CPU; launch took {launch_seconds:.0f} s")
    print(header)
    ddp_sparsifier.run("hesso", rank=0, world=1)  # warm-up: the first trace pays for imports
    for name in ddp_sparsifier.METHODS:
        start = time.perf_counter()
        single_changes = ddp_sparsifier.run(name, rank=0, world=1)[0]
        single_seconds = time.perf_counter() - start
        single = per_step(single_changes, steps)
        fsdp = [per_step(r["fsdp"][name]["changes"], steps) for r in ranks]
        ddp = per_step(r0["ddp"][name]["changes"], steps)
        uneven = r0["uneven"][name]
        odd, odd_single = per_step(uneven["changes"], steps), per_step(uneven["single"], steps)
        same_ranks = (
            fsdp[0] == fsdp[1] and r0["uneven"][name]["changes"] == ranks[1]["uneven"][name]["changes"]
        )
        zeros = fsdp[0][-1]["zero"] == ddp[-1]["zero"] == single[-1]["zero"]
        print(
            f"{name:<10} {agree(fsdp[0], single):>8} {agree(ddp, single):>7} {agree(fsdp[0], ddp):>9} "
            f"{agree(odd, odd_single):>10} {'yes' if same_ranks else 'NO':>7} {'yes' if zeros else 'NO':>7} "
            f"{r0['full'][name]['max_diff_from_ddp']:>13.2e} {uneven['max_diff']:>14.2e} "
            f"{r0['fsdp'][name]['seconds']:>7.2f} {r0['ddp'][name]['seconds']:>6.2f} {single_seconds:>6.2f}"
        )
    print("ranks=: both ranks took the same decisions at every step (even and uneven CNN)")
    print("zeros=: the final zero groups of FSDP, DDP and one process are the same")
    loop = r0["loop"]
    for name in ("hesso", "csgd"):
        print(
            f"compress({name!r}) under strategy fsdp vs ddp: removable {loop[name]['fsdp']['removable']} vs "
            f"{loop[name]['ddp']['removable']}, largest weight difference {loop[name]['max_diff']:.2e}"
        )


if __name__ == "__main__":
    main()
