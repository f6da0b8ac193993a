"""Each torchrun rank runs this: build_student in a 2-process gloo group, then one DDP distillation step.

    torchrun --nproc_per_node=2 -m tests.compress.ddp_distill OUT_DIR

Each rank starts from a different teacher (seeded by its rank), so only the broadcasts can make the
students equal. Every rank writes ``distill-rank{R}.json``: the choice, how many latency tables it
measured, and a digest of its student's weights after building and after one DDP step.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from slimship.compress import DistillationLoss, build_student, distill
from tests.compress.test_base import example, tiny_data, tiny_model

OPTIONS = {"widths": (0.75, 0.5), "latency_budget_ms": 1e9, "repeats": 3}


def digest(model: nn.Module) -> str:
    """sha256 of the model's state (names, then bytes)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    measured = []
    real = distill.latency_table
    distill.latency_table = lambda *a, **k: measured.append(rank) or real(*a, **k)
    teacher = tiny_model(seed=rank)
    student, info = build_student(teacher, example(), **OPTIONS)
    built = digest(student)
    ddp = nn.parallel.DistributedDataParallel(student)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    x, y = next(iter(tiny_data()))
    half = slice(rank * len(y) // 2, (rank + 1) * len(y) // 2)
    DistillationLoss(teacher)(ddp(x[half]), y[half], x[half]).backward()
    optimizer.step()
    record = {"chosen": info["chosen"], "measured": len(measured), "built": built, "stepped": digest(student)}
    (out / f"distill-rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
