"""Latency-aware channel counts beside plain and uniformly aligned slimming, 1 thread: ResNet-18, MobileNets.

    PYTHONPATH=. python benchmarks/bench_latency_counts.py [--models resnet18,mobilenetv1,mobilenetv2]
        [--runtimes onnxruntime,litert,executorch] [--res 224] [--runs 60] [--probe-runs 20]
        [--multiple onnxruntime=8,litert=16,executorch=16] [--out results.md]

The models and the zeroing are those of bench_slim_speedup.py (random weights and BN statistics, 50% +-
10% of each space's groups zeroed, seed 0). Each model is slimmed three ways: plainly (every space keeps
exactly what it needs), uniformly aligned (`channel_multiple`: each space rounded up to the runtime's
multiple, from the per-op-kind sweeps in RESULTS_slim_speedup.md unless --multiple says otherwise), and
latency-aware (`channel_counts=LatencyAwareCounts(MeasuredLatency(target, fmt))`: per space, the needed
count and its round-ups to 4, 8 and 16 are built from the space's real layers and timed on the target in
that runtime's format; a round-up is kept only where it makes those layers at least 3% faster). Dense,
plain, aligned and latency-aware files are timed in ONE process per runtime, interleaved; speedup = median
of per-round ratios dense/variant, efficiency = speedup / FLOPs ratio.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_slim_speedup import (
    FORMATS,
    MODELS,
    TARGET_EFFICIENCY,
    channels_total,
    cpu_model,
    export,
    parse_multiples,
    randomize,
    zero_groups,
)

from slimship import slim
from slimship.runtimes import get_target
from slimship.runtimes.execute import run_on_target
from slimship.runtimes.latency_table import MeasuredLatency
from slimship.runtimes.measure import speedup_from_ratios
from slimship.slimming.channel_counts import LatencyAwareCounts

log = logging.getLogger("bench_latency_counts")
DEFAULT_MULTIPLES = "onnxruntime=8,litert=16,executorch=16"  # RESULTS_slim_speedup.md, ExecuTorch column


@dataclass
class Cell:
    model: str
    runtime: str
    variant: str
    channels: str
    flops_ratio: float
    p50_ms: float
    speedup: float
    p10: float
    p90: float

    @property
    def efficiency(self) -> float:
        return self.speedup / self.flops_ratio


def run_model(
    name: str, runtimes: list[str], multiples: dict[str, int], args, tmp: Path
) -> tuple[list[Cell], dict]:
    target = get_target(args.target)
    model = randomize(MODELS[name](), args.seed)
    x = torch.randn(1, 3, args.res, args.res, generator=torch.Generator().manual_seed(args.seed))
    zero_groups(model, x, 0.5, 0.1, args.seed)
    dense_ch, _ = channels_total(slim(model, (x,)))
    cells, info = [], {}
    for rt in runtimes:
        t0 = time.perf_counter()
        source = MeasuredLatency(target.with_overrides(runtime=rt), FORMATS[rt], runs=args.probe_runs)
        policy = LatencyAwareCounts(
            source, args.round_up, passes=args.passes, prefer_aligned=args.prefer_aligned, start=args.start
        )
        variants = {
            "plain": slim(model, (x,)),
            f"aligned-{multiples[rt]}": slim(model, (x,), channel_multiple=multiples[rt]),
            "latency": slim(model, (x,), channel_counts=policy),
        }
        rounded = sum(d.chosen != d.needed for d in policy.decisions.values())
        info[rt] = {"probes timed": source.timed, "spaces rounded up": f"{rounded}/{len(policy.decisions)}",
                    "seconds": round(time.perf_counter() - t0)}  # fmt: skip
        log.info("%s %s: latency table %s", name, rt, info[rt])
        paths = [export(model, x, tmp / f"{name}_{rt}_dense", [rt])[rt]]
        paths += [export(v.model, x, tmp / f"{name}_{rt}_{k}", [rt])[rt] for k, v in variants.items()]
        xs = np.random.default_rng(0).standard_normal((1, 3, args.res, args.res)).astype(np.float32)
        run = run_on_target(target.with_overrides(runtime=rt), paths, [xs], warmup=5, runs=args.runs)
        info[rt]["load"] = round(os.getloadavg()[0], 1)
        lat = [np.asarray(e["latencies_ms"]) for e in run.result["models"]]
        for (k, v), ratios, ms in zip(variants.items(), run.result["pair_ratios"], lat[1:], strict=True):
            sp = speedup_from_ratios(ratios, "dense", k, target.name, (v.flops_before, v.flops_after))
            kept = f"{channels_total(v)[1]}/{dense_ch}"
            cells.append(
                Cell(name, rt, k, kept, v.flops_ratio, float(np.median(ms)), sp.median, sp.p10, sp.p90)
            )
        info[rt]["dense_ms"] = round(float(np.median(lat[0])), 2)
    return cells, info


def tables(cells: list[Cell], infos: dict) -> list[str]:
    out = ["| model | runtime | variant | channels kept | FLOPs ratio | p50 ms | speedup median (p10-p90) "
           "| efficiency | >= 0.85 |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in cells:
        ok = "yes" if c.efficiency >= TARGET_EFFICIENCY else "no"
        out.append(f"| {c.model} | {c.runtime} | {c.variant} | {c.channels} | {c.flops_ratio:.2f}x "
                   f"| {c.p50_ms:.2f} | {c.speedup:.2f}x ({c.p10:.2f}-{c.p90:.2f}) "
                   f"| {c.efficiency:.2f} | {ok} |")  # fmt: skip
    out += ["", "Efficiency side by side (plain / uniform / latency-aware):", "",
            "| model | runtime | dense p50 ms | plain | uniform | latency-aware | latency table |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for (model, rt), info in ((k, v) for k, v in infos.items()):
        row = [c for c in cells if c.model == model and c.runtime == rt]
        eff = " | ".join(
            f"{c.efficiency:.2f} ({c.variant}, {c.speedup:.2f}x / {c.flops_ratio:.2f}x)" for c in row
        )
        table = f"{info['probes timed']} probes, {info['spaces rounded up']} spaces rounded up"
        table += f", {info['seconds']}s"
        out.append(f"| {model} | {rt} | {info['dense_ms']} | {eff} | {table} |")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="mobile-1t")
    parser.add_argument("--models", default="resnet18,mobilenetv1,mobilenetv2")
    parser.add_argument("--runtimes", default="onnxruntime,litert,executorch")
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--runs", type=int, default=60, help="interleaved rounds of the whole models")
    parser.add_argument("--probe-runs", type=int, default=20, help="interleaved rounds per latency probe")
    parser.add_argument("--multiple", default=DEFAULT_MULTIPLES, help="uniform multiple per runtime")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--passes", type=int, default=1, help="LatencyAwareCounts passes")
    parser.add_argument("--start", type=int, default=None, help="LatencyAwareCounts start multiple")
    parser.add_argument("--round-up", default="4,8,16", help="candidate multiples per space")
    parser.add_argument("--prefer-aligned", action="store_true", help="LatencyAwareCounts prefer_aligned")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    runtimes = [r for r in args.runtimes.split(",") if r]
    args.round_up = tuple(int(m) for m in args.round_up.split(","))
    multiples = parse_multiples(args.multiple)
    started = time.perf_counter()
    cells: list[Cell] = []
    infos: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        for name in [m for m in args.models.split(",") if m]:
            got, info = run_model(name, runtimes, multiples, args, Path(tmp))
            cells += got
            infos.update({(name, rt): v for rt, v in info.items()})
            print("\n".join(tables(got, {(name, rt): v for rt, v in info.items()})), flush=True)  # as it goes
    loads = ", ".join(f"{v['load']}" for v in infos.values())
    lines = [
        f"target {args.target} (1 thread, core 0), input 1x3x{args.res}x{args.res}, fp32, 50% +- 10% of each "
        f"space's groups zeroed (seed {args.seed}), {args.runs} interleaved rounds; "
        f"uniform multiples {multiples}",
        f"host: {cpu_model()}, {os.cpu_count()} cores; 1-min load average after each timing: {loads}",
        "", *tables(cells, infos), "", f"total time {time.perf_counter() - started:.0f}s",
    ]  # fmt: skip
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
