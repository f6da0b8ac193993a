"""Why a speedup headline and the p50 ratio beside it disagree: a ConvNeXt of the zoo, dense and slim, on a
one-thread target, measured a few times in a row.

    PYTHONPATH=. python benchmarks/bench_speedup_figures.py [--target mobile-1t] [--repeats 4] [--runs 50]
        [--size 64] [--aa]

The dense model is tests/zoo's ConvNeXt at widths (64, 128), the slim one the same architecture at
(48, 96) (what slimming half of a quarter of the channels leaves), both exported to ONNX (parity checked by
the exporter). Each repeat is one `measure_speedup`: dense and slim interleaved in one runner process.
Printed side by side per repeat: the headline (median of the per-pair ratios, p10-p90), the p50 ratio of
the same pairs, the pairs in which a run lost time to other processes (wall time beyond the runner
thread's CPU time), and the CPU-time ratio of the same pairs. `--aa` times the slim file against a copy
of itself (every figure should be 1.00x). On an idle core the figures agree; on a shared one the timings
are bimodal and the headline and the p50 ratio land anywhere, which the speedup's text then says.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from slimship.exporters.registry import ExportRequest, get_format
from slimship.runtimes.measure import measure_speedup
from slimship.runtimes.targets import get_target
from tests.zoo._base import seeded
from tests.zoo.convnext import ConvNeXt


def _export(folder: Path, size: int) -> dict[str, Path]:
    x = torch.randn(1, 3, size, size)
    record, paths = get_format("onnx"), {}
    for name, dims in (("dense", (64, 128)), ("slim", (48, 96))):
        model = seeded(lambda dims=dims: ConvNeXt(dims), 1)
        paths[name] = Path(record.export(ExportRequest(model, (x,), (x,), dynamic_batch=False),
                                         folder / record.file_name(name)).path)  # fmt: skip
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="mobile-1t")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--aa", action="store_true", help="the slim file against a copy of itself")
    args = parser.parse_args()
    target = get_target(args.target)
    with tempfile.TemporaryDirectory() as tmp:
        paths = _export(Path(tmp), args.size)
        if args.aa:
            paths["dense"] = Path(tmp) / "slim-copy.onnx"
            shutil.copyfile(paths["slim"], paths["dense"])
        x = [torch.randn(1, 3, args.size, args.size).numpy()]
        pair = "A/A" if args.aa else "dense (64,128) vs slim (48,96)"
        cores = list(target.affinity)
        print(f"target {target.name} (threads {target.threads}, cores {cores}), {args.runs} pairs, {pair}")
        print("| repeat | headline (p10-p90) | p50 dense -> slim ms | p50 ratio | pairs that lost time "
              "| CPU-time ratio |")  # fmt: skip
        print("|---|---|---|---|---|---|")
        for k in range(args.repeats):
            sp, _ = measure_speedup(paths["dense"], paths["slim"], x, target, warmup=5, runs=args.runs)
            cpu = f"{sp.cpu_ratio:.2f}x" if sp.cpu_ratio is not None else "n/a (threads != 1)"
            lost = f"{sp.lost_pairs} of {sp.pairs}" if sp.lost_pairs is not None else "n/a"
            print(f"| {k + 1} | {sp.median:.2f}x ({sp.p10:.2f}-{sp.p90:.2f}) | {sp.dense_p50_ms:.2f} -> "
                  f"{sp.slim_p50_ms:.2f} | {sp.p50_ratio:.2f}x | {lost} | {cpu} |")  # fmt: skip


if __name__ == "__main__":
    main()
