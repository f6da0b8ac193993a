"""Peak memory of `slimship slim FOLDER --out OUT` on checkpoint folders, anonymous and file-backed apart.

    PYTHONPATH=. python benchmarks/bench_decoder_slim_cli.py [--sizes 120m,1.1b] [--fraction 0.3]
        [--work DIR] [--interval 0.2]

Each size is a Llama-shaped bf16 decoder of `bench_decoder_slim.SHAPES` (random init, `fraction` of every
layer's FFN channels zeroed), written with `save_pretrained` (safetensors) to a folder under `--work`.
The command a user runs (`slimship slim FOLDER --out OUT`) then runs as a child process, sampled every
`--interval` seconds from /proc/PID/status: the peak of VmRSS (all resident pages), of RssAnon (memory the
process allocated: what the machine must really hold) and of RssFile (pages of files it maps: the
checkpoint and the written folder, read-only mappings the kernel can drop and read again). Ratios are
against the checkpoint's weight bytes. The samples can miss a peak shorter than the interval; the child's
ru_maxrss (the kernel's own VmRSS peak) is printed beside them.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_decoder_slim import build, zero_ffn

FIELDS = ("VmRSS", "RssAnon", "RssFile")


def write_folder(size: str, fraction: float, where: Path) -> int:
    """The checkpoint folder of `size` under `where` (built once); returns its weight bytes."""
    folder = where / f"llama-{size}"
    if not (folder / "config.json").exists():
        model = build(size, torch.bfloat16)
        zero_ffn(model, fraction)
        model.save_pretrained(str(folder), safe_serialization=True)
        del model
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def status(pid: int) -> dict[str, int] | None:
    """The memory fields of /proc/PID/status in bytes (None once the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in FIELDS:
            out[key] = int(value.split()[0]) * 1024
    return out


def run_slim(folder: Path, out: Path, interval: float) -> tuple[dict[str, int], int, float, int]:
    """Peaks of each field, the child's ru_maxrss (bytes), its wall seconds and exit code."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "slimship", "slim", str(folder), "--out", str(out)]
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peaks = dict.fromkeys(FIELDS, 0)
    while True:
        pid, wait_status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:  # reaped here, so its rusage is this child's alone
            break
        for key, value in (status(child.pid) or {}).items():
            peaks[key] = max(peaks[key], value)
        time.sleep(interval)
    child.returncode = os.waitstatus_to_exitcode(wait_status)
    return peaks, usage.ru_maxrss * 1024, time.perf_counter() - start, child.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="120m,1.1b")
    parser.add_argument("--fraction", type=float, default=0.3)
    parser.add_argument("--work", default="/tmp/slimship-bench-cli")
    parser.add_argument("--interval", type=float, default=0.2)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"host: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    head = ("size", "weights GiB", "peak VmRSS GiB (x)", "peak RssAnon GiB (x)", "peak RssFile GiB")
    print("| " + " | ".join((*head, "ru_maxrss GiB", "s")) + " |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        weights = write_folder(size, args.fraction, work)
        peaks, maxrss, seconds, code = run_slim(work / f"llama-{size}", work / f"slim-{size}", args.interval)
        if code:
            print(f"| {size} | failed (exit {code}) | | | | | |")
            continue
        gib = 2**30
        rss, anon, mapped = peaks["VmRSS"], peaks["RssAnon"], peaks["RssFile"]
        print(
            f"| {size} | {weights / gib:.2f} | {rss / gib:.2f} ({rss / weights:.2f}x) | "
            f"{anon / gib:.2f} ({anon / weights:.2f}x) | {mapped / gib:.2f} | {maxrss / gib:.2f} | "
            f"{seconds:.0f} |"
        )
    print(f"1-min load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
