"""Each torchrun rank runs this: adc_search on a small CNN with a rank-dependent `evaluate`.

    torchrun --nproc_per_node=2 -m tests.compress.ddp_adc OUT_DIR

Rank R's `evaluate` prefers keeping the output channels of a different layer (conv1 on rank 0, the
hidden linear on rank 1), so each rank alone would pick another policy; averaged across ranks they must
agree. Every rank writes ``adc-rank{R}.json`` (policy, rewards). ``run(evaluate)`` is the one-process
search with the same settings.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn

from slimship.compress.adc import DDPG, adc_search
from tests.compress.test_adc_search import X, kept_rows, small_cnn

LAYERS = (0, 7)  # rank -> the layer whose kept channels its evaluate prefers


def run(evaluate: Callable[[nn.Module], float]) -> dict[str, Any]:
    ddpg = DDPG(warmup_episodes=4, batch_size=16, updates_per_step=1, hidden=16)
    result = adc_search(small_cnn(), (X,), evaluate, target_flops_kept=0.4, episodes=12, ddpg=ddpg, seed=2)
    return {"policy": result.policy.to_dict(), "rewards": result.rewards}


def mean_of_ranks(model: nn.Module) -> float:
    """What the ranks' evaluates average to (the one-process equivalent)."""
    return sum(kept_rows(layer)(model) for layer in LAYERS) / len(LAYERS)


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        record = run(kept_rows(LAYERS[rank]))
    finally:
        dist.destroy_process_group()
    (out / f"adc-rank{rank}.json").write_text(json.dumps(record, sort_keys=True))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
