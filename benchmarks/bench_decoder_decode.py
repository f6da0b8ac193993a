"""Does slimming a decoder make it decode faster on ExecuTorch and onnxruntime? Dense vs slim Llamas.

    PYTHONPATH=. python benchmarks/bench_decoder_decode.py [--sizes s,m] [--prompt-len 64] [--new-tokens 64]
        [--runs 10] [--max-seq-len 160] [--formats executorch-fp32,executorch-8da4w,onnx,onnx-int4]
        [--out results.md]

Each size is a random-init Llama (`LlamaForCausalLM`, eager attention, untied head). In every layer 50%
of the KV groups (a KV head with the query heads that read it) and 320/768 = 41.7% of the FFN channels
are zeroed (seed 0; the kept FFN width stays a multiple of 32, so 8da4w keeps every Linear at 4 bits);
`slimship.slim` + `apply_to` removes them. Dense (zeroed, unslimmed: the same function) and slim are
exported with their KV caches by `slimship.decoder.export_decoder` (each file checked from disk: fp32
files decode the same greedy tokens as transformers' generate(); the quantised files' (8da4w, int4)
top-1 agreement with the float model is printed) and timed by `slimship.decoder.bench_decode`: one
process, 1 thread, interleaved dense/slim greedy generations of `--new-tokens` after a random
`--prompt-len` prompt; a speedup is the median of the per-run ratios dense/slim (p10-p90 beside it).
FLOPs ratio: dense/slim FLOPs of one forward pass over `--prompt-len` tokens without cache
(`torch.utils.flop_counter`, via slim's report); efficiency = decode speedup / FLOPs ratio.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import random
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch
from torch import nn

import slimship
from slimship.decoder import DecoderExportOptions, bench_decode, export_decoder
from slimship.hf import LogitsOnly
from slimship.slimming.api import find_groups, zero_group

SIZES = {  # name: (hidden, layers, ffn, heads, kv heads, vocab)
    "s": (256, 4, 768, 8, 4, 4096),
    "m": (512, 4, 1536, 8, 4, 8192),
    "l": (768, 6, 2304, 12, 4, 16384),
}
FFN_ZEROED = 320 / 768
KV_ZEROED = 0.5


def build(size: str, seed: int = 0) -> nn.Module:
    """The dense model with its groups zeroed (see the module doc)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, ffn, heads, kv, vocab = SIZES[size]
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=1024,
        tie_word_embeddings=False, attn_implementation="eager", bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    wrapper, example = LogitsOnly(model), (torch.arange(8).unsqueeze(0),)
    found, rng = find_groups(wrapper, example), random.Random(seed)
    with torch.no_grad():
        for space, indices in found.by_space.items():
            fraction = KV_ZEROED if "self_attn" in space else FFN_ZEROED if "mlp" in space else 0.0
            for i in rng.sample(indices, int(round(fraction * len(indices)))):
                zero_group(wrapper, found.groups[i])
    return model


def slim_copy(size: str, prompt_len: int) -> tuple[nn.Module, float]:
    model = build(size)
    wrapper, example = LogitsOnly(model), (torch.arange(prompt_len).unsqueeze(0),)
    result = slimship.slim(wrapper, example)
    result.apply_to(wrapper, example)
    return model, result.flops_ratio


def _fmt(s: dict | object, spec: str) -> str:
    return f"{s.median:{spec}} ({s.p10:{spec}}-{s.p90:{spec}})"


def run(args: argparse.Namespace) -> list[str]:
    rows = [
        "| size | format | dense MB | slim MB | FLOPs ratio | dense decode tok/s | slim decode tok/s "
        "| decode speedup | efficiency | dense prefill tok/s | slim prefill tok/s | prefill speedup "
        "| TTFT ms dense / slim | quantised top-1 agreement (dense / slim) |",
        "|" + "---|" * 14,
    ]
    for size in args.sizes.split(","):
        hidden, layers, ffn, heads, kv, vocab = SIZES[size]
        began = time.time()
        dense = build(size)
        slim, flops_ratio = slim_copy(size, args.prompt_len)
        widths = (
            slim.model.layers[0].mlp.gate_proj.out_features,
            slim.model.layers[0].self_attn.k_proj.out_features,
        )
        shape = f"FFN {ffn} -> {widths[0]}, KV heads {kv} -> {widths[1] // (hidden // heads)}"
        what = f"hidden {hidden}, {layers} layers, {shape}, vocab {vocab}"
        print(f"[{size}] {what}; FLOPs ratio {flops_ratio:.2f}", file=sys.stderr)
        options = DecoderExportOptions(max_seq_len=args.max_seq_len, min_agreement=0.0)  # reported, not gated
        with tempfile.TemporaryDirectory() as tmp:
            files: dict[str, dict[str, object]] = {}
            for name, model in (("dense", dense), ("slim", slim)):
                files[name] = export_decoder(
                    model, args.formats.split(","), Path(tmp), f"{size}-{name}", options
                )
            print(f"[{size}] exported in {time.time() - began:.0f} s", file=sys.stderr)
            for fmt in args.formats.split(","):
                d, s = files["dense"][fmt], files["slim"][fmt]
                result = bench_decode(
                    [s.path], dense=d.path, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                    runs=args.runs, warmup=2, threads=1,
                )  # fmt: skip
                md, ms = result.measurements
                dec, pre = result.decode_speedups[0], result.prefill_speedups[0]
                agree = "-"
                if d.parity.top1_agreement is not None:
                    agree = f"{d.parity.top1_agreement:.2f} / {s.parity.top1_agreement:.2f}"
                rows.append(
                    f"| {size} | {fmt} | {d.bytes / 1e6:.2f} | {s.bytes / 1e6:.2f} | {flops_ratio:.2f} "
                    f"| {_fmt(md.decode_tok_s, '.0f')} | {_fmt(ms.decode_tok_s, '.0f')} "
                    f"| {dec.median:.2f}x ({dec.p10:.2f}-{dec.p90:.2f}) | {dec.median / flops_ratio:.2f} "
                    f"| {_fmt(md.prefill_tok_s, '.0f')} | {_fmt(ms.prefill_tok_s, '.0f')} "
                    f"| {pre.median:.2f}x ({pre.p10:.2f}-{pre.p90:.2f}) "
                    f"| {md.ttft_ms.median:.1f} / {ms.ttft_ms.median:.1f} | {agree} |"
                )
                print(rows[-1], file=sys.stderr)
                print(f"  load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="s,m")
    parser.add_argument("--formats", default="executorch-fp32,executorch-8da4w,onnx,onnx-int4")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-seq-len", type=int, default=160)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    began = time.time()
    rows = run(args)
    head = [
        f"command: PYTHONPATH=. python benchmarks/bench_decoder_decode.py {' '.join(sys.argv[1:])}",
        f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}, torch {torch.__version__}, executorch {version('executorch')}, "
        f"onnxruntime {version('onnxruntime')}, transformers {version('transformers')}, "
        f"torchao {version('torchao')}",
        f"wall time {time.time() - began:.0f} s; 1-min load average at the end {os.getloadavg()[0]:.1f}",
        "",
    ]
    text = "\n".join(head + rows) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
