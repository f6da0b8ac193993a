"""Slim time and peak resident memory against model size: Llama-shaped bf16 decoders, 100M to 1.1B (7B).

    PYTHONPATH=. python benchmarks/bench_decoder_slim.py [--sizes 120m,300m,1.1b] [--with-7b]
        [--modes keep,release] [--dtype bfloat16] [--fraction 0.3] [--seq 16] [--append]
        [--out benchmarks/RESULTS_decoder_slim.md]

Each size runs in its own child process (so one size's memory cannot leak into the next): the decoder is
built from a `LlamaConfig` on the meta device, materialised in the chosen dtype with random weights
(N(0, 0.02), never downloaded), and `fraction` of every layer's FFN channels are zeroed (rows of
`up_proj`). The child then calls `slimship.slim` on it, once keeping the caller's model intact (the
default) and, in a second child, with `release_source=True` (dense tensors released as their slim ones
are made). Peak RSS is the child's `ru_maxrss` (it includes the Python process, torch and the model
itself); the ratio is peak RSS over the model's bytes (parameters + buffers). All sizes run side by side
in one invocation; the table is printed and written to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

#: name -> (hidden, layers, heads, kv heads, ffn); vocab 32000 for all
SHAPES: dict[str, tuple[int, int, int, int, int]] = {
    "120m": (768, 12, 12, 4, 2048),
    "300m": (1024, 16, 16, 4, 2816),
    "1.1b": (2048, 22, 32, 4, 5632),  # TinyLlama
    "7b": (4096, 32, 32, 8, 11008),
}
MODES = ("keep", "release")


@dataclass
class Row:
    size: str
    mode: str
    params: int
    model_bytes: int
    rss_after_build: int
    peak_rss: int
    seconds: float
    dtype_kept: bool
    verified: bool
    max_rel_diff: float
    tolerance: float
    params_after: int

    @property
    def ratio(self) -> float:
        return self.peak_rss / self.model_bytes


def build(size: str, dtype: torch.dtype) -> torch.nn.Module:
    """A random-init Llama of the named shape, materialised directly in `dtype` (no fp32 copy)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hidden, layers, heads, kv, ffn = SHAPES[size]
    config = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=ffn,
        vocab_size=32000,
        max_position_embeddings=2048,
        use_cache=False,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(dtype)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=generator)
    model.model.rotary_emb = LlamaRotaryEmbedding(config)  # its buffers are computed, not random
    return model.eval()


def zero_ffn(model: torch.nn.Module, fraction: float) -> int:
    """Zero `fraction` of each layer's FFN channels (rows of up_proj); return channels zeroed."""
    generator = torch.Generator().manual_seed(1)
    zeroed = 0
    with torch.no_grad():
        for layer in model.model.layers:
            rows = layer.mlp.up_proj.weight.shape[0]
            picked = torch.randperm(rows, generator=generator)[: int(fraction * rows)]
            layer.mlp.up_proj.weight[picked] = 0
            zeroed += len(picked)
    return zeroed


def child(size: str, mode: str, dtype_name: str, fraction: float, seq: int) -> Row:
    from slimship.slimming import slim

    dtype = getattr(torch, dtype_name)
    model = build(size, dtype)
    zero_ffn(model, fraction)
    params = sum(p.numel() for p in model.parameters())
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    rss_after_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ids = torch.randint(0, 32000, (1, seq), generator=torch.Generator().manual_seed(2))
    start = time.perf_counter()
    result = slim(model, (ids,), release_source=mode == "release")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    dtypes = {p.dtype for p in result.model.parameters() if p.is_floating_point()}
    check = result.report.verification
    return Row(
        size, mode, params, model_bytes, rss_after_build, peak, seconds, dtypes == {dtype},
        check.passed, check.max_rel_diff, check.tolerance, result.params_after,
    )  # fmt: skip


def run_child(size: str, mode: str, args: argparse.Namespace) -> Row | str:
    command = [sys.executable, __file__, "--child", size, "--mode", mode, "--dtype", args.dtype]
    command += ["--fraction", str(args.fraction), "--seq", str(args.seq)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"child failed (exit {done.returncode}): {tail}"
    return Row(**json.loads(lines[-1]))


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def table(rows: list[Row | tuple[str, str, str]]) -> list[str]:
    out = [
        "| size | mode | params | model GiB | RSS after build GiB | peak RSS GiB | peak / model | slim s |"
        " dtype kept | verified (max rel diff / tolerance) | params after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if isinstance(row, tuple):
            out.append(f"| {row[0]} | {row[1]} | {row[2]} |" + " |" * 8)
            continue
        verdict = f"{row.verified} ({row.max_rel_diff:.2g} / {row.tolerance:.2g})"
        out.append(
            f"| {row.size} | {row.mode} | {row.params / 1e6:.0f}M | {gib(row.model_bytes)} |"
            f" {gib(row.rss_after_build)} | {gib(row.peak_rss)} | {row.ratio:.2f}x | {row.seconds:.1f} |"
            f" {row.dtype_kept} | {verdict} | {row.params_after / 1e6:.0f}M |"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="120m,300m,1.1b")
    parser.add_argument("--with-7b", action="store_true", help="add the 7B shape (needs ~20 GB free)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--fraction", type=float, default=0.3)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS_decoder_slim.md")))
    parser.add_argument("--append", action="store_true", help="add this run to --out as a new section")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="keep", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        row = child(args.child, args.mode, args.dtype, args.fraction, args.seq)
        print(json.dumps(row.__dict__))
        return
    sizes = args.sizes.split(",") + (["7b"] if args.with_7b else [])
    rows: list[Row | tuple[str, str, str]] = []
    for size in sizes:
        for mode in args.modes.split(","):
            got = run_child(size, mode, args)
            rows.append(got if isinstance(got, Row) else (size, mode, got))
            print("\n".join(table(rows)[-1:]), flush=True)
    header = [
        "# Slim time and peak memory against decoder size",
        "",
        "Command:",
        "",
        "    PYTHONPATH=. python benchmarks/" + " ".join([Path(__file__).name, *sys.argv[1:]]),
        "",
        f"Llama-shaped decoders (vocab 32000), random init in {args.dtype} built on the meta device;"
        f" {args.fraction:.0%} of each layer's FFN channels zeroed; example input 1x{args.seq} token ids.",
        "One child process per row; peak RSS = the child's ru_maxrss (Python, torch, the model and the"
        " slim). `keep`: the caller's model is left intact (the default); `release`:"
        " `slim(..., release_source=True)`, dense tensors released as their slim ones are made.",
        f"Host: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__},"
        f" python {platform.python_version()}; 1-min load average at the end {os.getloadavg()[0]:.1f}.",
        "",
    ]
    text = "\n".join(header + table(rows)) + "\n"
    print(text)
    out = Path(args.out)
    if args.append and out.exists():
        text = out.read_text() + "\n" + text.replace("# Slim time", "## Slim time", 1)
    out.write_text(text)


if __name__ == "__main__":
    main()
