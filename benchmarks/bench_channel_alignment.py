"""Measured latency vs output channels of one layer (conv, 1x1, depthwise, linear): does alignment pay?

    PYTHONPATH=. python benchmarks/bench_channel_alignment.py [--target mobile-1t] [--fmt onnx|tflite]
        [--op conv|conv1x1|dwconv|linear] [--lo 24] [--hi 64] [--runs 40]

For each candidate multiple m: roundup = mean latency(round_up(c, m)) / latency(c) over
non-aligned c (about 1: padding is free), step = median latency(b + 1) / latency(b) over multiples
b (above 1: crossing a multiple costs). Alignment to m pays when both hold.
"""

from __future__ import annotations

import argparse
import logging

from slimship.runtimes.alignment import LAYER_KINDS, measure_alignment
from slimship.runtimes.targets import BUILTIN_TARGETS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="mobile-1t", choices=sorted(BUILTIN_TARGETS))
    parser.add_argument("--fmt", default="onnx", choices=("onnx", "tflite"))
    parser.add_argument("--op", default="conv", choices=LAYER_KINDS)
    parser.add_argument("--lo", type=int, default=24)
    parser.add_argument("--hi", type=int, default=64)
    parser.add_argument("--in-channels", type=int, default=None, help="default 32; dwconv: --hi")
    parser.add_argument("--spatial", type=int, default=28)
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    target = BUILTIN_TARGETS[args.target]
    result = measure_alignment(
        target, op=args.op, channels=range(args.lo, args.hi + 1), in_channels=args.in_channels,
        spatial=args.spatial, fmt=args.fmt, runs=args.runs,
    )  # fmt: skip
    base = result.p50_ms[0]
    print(f"target {target.name} ({target.runtime}, threads={target.threads}), {args.op} {args.fmt}")
    print(f"{'channels':>8} {'p50 ms':>9} {'vs first':>8}  {'ms/channel':>10}")
    for c, ms in zip(result.channels, result.p50_ms, strict=True):
        print(f"{c:>8} {ms:>9.4f} {ms / base:>8.2f}x {ms / c:>10.5f}")
    print("per multiple: roundup = mean latency(round_up)/latency(c); step = median latency(b+1)/latency(b)")
    for m, s in result.scores.items():
        print(f"  multiple {m:>2}: roundup {s['roundup']:.3f}  step {s['step']:.3f}")
    verdict = f"alignment to {result.multiple} pays" if result.multiple else "alignment does not pay here"
    print(f"=> {verdict} (tolerance {result.tolerance:.0%})")


if __name__ == "__main__":
    main()
