"""Decoding speed of text-generation files: time to first token, prefill and decode tokens per second.

Every run is one greedy generation of `new_tokens` after a random prompt of `prompt_len` tokens (the same
prompt for every file, EOS ignored), through the runner `slimship generate` uses. Files are run in turn
within each run (dense, slim, dense, slim ...) in this process, so a dense/slim speedup is the median of
per-run ratios with its spread, as for every other speedup in slimship. Memory (`rss_kb`, Linux): what a
file's load and first generation added to a fresh runner process of its own on the target, after its
runtime was imported, as for one-pass models (`slimship.runtimes.measure`): the same figure whichever
files are benched beside it and in whatever order (a runtime's start-up is in every file's figure, not
only in the first one's); `peak_rss_kb`: the timing process's high-water mark after all runs.
"""

from __future__ import annotations

import dataclasses
import resource
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slimship.decoder.runner import Decoder, OnnxDecoder, check_room, greedy, open_decoder
from slimship.errors import ModelFileError, SlimshipError
from slimship.exporters.registry import precision_from_name
from slimship.runtimes.execute import run_on_target
from slimship.runtimes.measure import PROFILE_KEYS, Speedup, speedup_from_ratios, speedup_text, where_measured
from slimship.runtimes.profile import profile_models
from slimship.runtimes.targets import Target

RUNTIME_MODULES = {".pte": "executorch.runtime", ".onnx": "onnxruntime"}
LOCAL = "local"  # the target name of a bench run in this process without a named target


@dataclasses.dataclass
class Spread:
    """Median and 10th-90th percentiles of a per-run figure."""

    median: float
    p10: float
    p90: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        p10, med, p90 = (float(v) for v in np.percentile(np.asarray(values, np.float64), [10, 50, 90]))
        return cls(med, p10, p90)


@dataclasses.dataclass
class DecodeMeasurement:
    """One file's decoding figures over the timed runs."""

    model: str
    kind: str  # suffix and precision, e.g. ".pte fp32": files of one kind are compared
    bytes: int
    ttft_ms: Spread  # prefill call + first token
    prefill_tok_s: Spread
    decode_tok_s: Spread
    ms_per_token: Spread  # decode
    rss_kb: int | None
    tokens: list[int] = dataclasses.field(default_factory=list)  # generated in the first run


@dataclasses.dataclass
class DecodeBench:
    threads: int | None
    prompt_len: int
    new_tokens: int
    runs: int
    warmup: int
    measurements: list[DecodeMeasurement]
    decode_speedups: list[Speedup]  # dense/slim decode time per run
    prefill_speedups: list[Speedup]
    peak_rss_kb: int
    notes: list[str] = dataclasses.field(default_factory=list)
    where: str = "local (this process)"
    target: str = LOCAL  # the target's name (as in every speedup's `target`)
    prompt: list[int] = dataclasses.field(default_factory=list)
    profiles: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # per-layer, one decode step


def _decode_args(prompt_len: int, new_tokens: int, seed: int) -> list[str]:
    return ["--task", "text-generation", "--prompt-len", str(prompt_len), "--new-tokens", str(new_tokens),
            "--seed", str(seed)]  # fmt: skip


def file_memory_kb(
    paths: Sequence[Path], target: Target, prompt_len: int, new_tokens: int, seed: int = 0,
    staging_dir: Path | None = None,
) -> list[int | None]:  # fmt: skip
    """What each file's load and first generation add to a fresh runner process of its own on `target`
    (after its runtime is imported): independent of the other files and of their order."""
    memory: list[int | None] = []
    for path in paths:
        run = run_on_target(target, [path], [], warmup=0, runs=1, staging_dir=staging_dir,
                            extra_args=_decode_args(prompt_len, new_tokens, seed))  # fmt: skip
        rss = run.result["models"][0].get("model_rss_kb")
        memory.append(None if rss is None else int(rss))
    return memory


def file_kind(path: Path) -> str:
    """Suffix and precision (read from the file name; fp32 when it names none)."""
    return f"{path.suffix.lower()} {precision_from_name(path) or 'fp32'}"


def _first_run(decoder: Decoder, path: Path, prompt: list[int], new_tokens: int) -> list[int]:
    check_room(decoder.info, len(prompt), new_tokens, str(path))
    if max(prompt) >= decoder.info.vocab_size:
        raise SlimshipError(
            f"{path}: its vocabulary of {decoder.info.vocab_size} is smaller than the others'"
        )
    return greedy(decoder, prompt, new_tokens, stop_at_eos=False).tokens  # allocations, weight packing


Times = dict[Path, dict[str, list[float]]]  # file -> "prefill"/"decode" -> seconds per timed run


def _paths(files: Sequence[str | Path], dense: str | Path | None, runs: int, warmup: int):
    if runs < 1 or warmup < 0:
        raise SlimshipError(f"runs must be >= 1 and warmup >= 0 (got {runs}, {warmup})")
    paths = [Path(f) for f in files]
    dense_path = Path(dense) if dense is not None else None
    if dense_path is not None and dense_path not in paths:
        paths.insert(0, dense_path)
    return paths, dense_path


def bench_decode(
    files: Sequence[str | Path], *, dense: str | Path | None = None, prompt_len: int = 32,
    new_tokens: int = 32,
    runs: int = 10, warmup: int = 2, threads: int | None = 1, seed: int = 0, profile: bool = False,
    target: Target | None = None,
) -> DecodeBench:  # fmt: skip
    """Time greedy generation of every file in this process (see the module doc); speedups of each file
    against `dense` where both are of one kind (suffix and precision); `profile`: a per-layer dense vs slim
    profile of one decode step of each such pair (`decode_profile`). `target`: the local target this
    process runs as (its name labels the figures; each file's memory is measured in a runner process of its
    own there); None: "local" with `threads`."""
    paths, dense_path = _paths(files, dense, runs, warmup)
    opened: list[Decoder] = []
    prompt: list[int] = []
    tokens: list[list[int]] = []
    for path in paths:
        decoder = open_decoder(path, threads)
        if not prompt:
            rng = np.random.default_rng(seed)
            prompt = [int(t) for t in rng.integers(0, decoder.info.vocab_size, prompt_len)]
        tokens.append(_first_run(decoder, path, prompt, new_tokens))
        opened.append(decoder)
    times: Times = {p: {"prefill": [], "decode": []} for p in paths}
    for run in range(warmup + runs):
        for path, decoder in zip(paths, opened, strict=True):
            result = greedy(decoder, prompt, new_tokens, stop_at_eos=False)
            if run >= warmup:
                times[path]["prefill"].append(result.prefill_s)
                times[path]["decode"].append(sum(result.step_s))
    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    target = target or Target(LOCAL, threads=threads)
    rss = file_memory_kb(paths, target, prompt_len, new_tokens, seed)
    result = _bench_result(paths, dense_path, times, rss, peak,
                           (threads, prompt_len, new_tokens, runs, warmup), target.name)  # fmt: skip
    result.prompt = prompt
    for measurement, generated in zip(result.measurements, tokens, strict=True):
        measurement.tokens = generated
    if profile:
        steps = max(10, min(runs * new_tokens, 50))
        result.profiles = [decode_profile(Path(s.dense), Path(s.slim), prompt, runs=steps, threads=threads)
                           for s in result.decode_speedups]  # fmt: skip
        if dense_path is None:
            result.notes.append("--profile compares a slim file with its dense one: give --dense")
    return result


def bench_decode_on_target(
    files: Sequence[str | Path], target: Target, *, dense: str | Path | None = None, prompt_len: int = 32,
    new_tokens: int = 32, runs: int = 10, warmup: int = 2, seed: int = 0, profile: bool = False,
    staging_dir: Path | None = None,
) -> DecodeBench:  # fmt: skip
    """`bench_decode` through the self-contained device runner on `target` (SSH, adb, emulated or local):
    the files are shipped, generated with in turn in one process there, and the timings read back."""
    paths, dense_path = _paths(files, dense, runs, warmup)
    if prompt_len < 1 or new_tokens < 1:
        raise SlimshipError(f"--prompt-len and --new-tokens must be >= 1 (got {prompt_len}, {new_tokens})")
    for path in paths:
        if path.suffix.lower() not in RUNTIME_MODULES:
            raise ModelFileError(f"{path}: text generation runs .pte and .onnx files (got {path.suffix})")
    extra = _decode_args(prompt_len, new_tokens, seed)
    run = run_on_target(target, paths, [], warmup=warmup, runs=runs, staging_dir=staging_dir,
                        extra_args=extra).result  # fmt: skip
    times: Times = {p: {"prefill": e["prefill_s"], "decode": e["decode_s"]}
                    for p, e in zip(paths, run["models"], strict=True)}  # fmt: skip
    rss = file_memory_kb(paths, target, prompt_len, new_tokens, seed, staging_dir)  # a process per file
    result = _bench_result(paths, dense_path, times, rss, int(run["peak_rss_kb"]),
                           (target.threads, prompt_len, new_tokens, runs, warmup), target.name)  # fmt: skip
    result.where, result.prompt = where_measured(target), [int(t) for t in run["prompt"]]
    for measurement, entry in zip(result.measurements, run["models"], strict=True):
        measurement.tokens = [int(t) for t in entry["tokens"]]
    if profile:
        result.notes.append(f"--profile: per-layer profiles run on this machine, not on {target.transport}")
    return result


def _bench_result(
    paths: list[Path], dense: Path | None, times: Times, rss: list[int | None], peak_rss_kb: int,
    settings: tuple[int | None, int, int, int, int], target: str,
) -> DecodeBench:  # fmt: skip
    threads, prompt_len, new_tokens, runs, warmup = settings
    measurements = [_measurement(p, times[p], kb, prompt_len, new_tokens) for p, kb in zip(paths, rss)]
    decode, prefill, notes = _speedups(paths, dense, times, target)
    return DecodeBench(
        threads, prompt_len, new_tokens, runs, warmup, measurements, decode, prefill, peak_rss_kb, notes,
        target=target,
    )  # fmt: skip


def decode_step_inputs(path: Path, prompt: Sequence[int], threads: int | None = 1) -> list[np.ndarray]:
    """The inputs of the decode step after `prompt` (its next token, at position len(prompt)). An .onnx
    file's include the past keys and values its prefill returned; a .pte holds its cache inside, and the
    profiled program's cache is left unfilled (a step's kernels do the same work whatever it holds)."""
    decoder = open_decoder(path, threads)
    check_room(decoder.info, len(prompt), 1, str(path))
    token = int(np.argmax(decoder.forward(prompt, 0)[-1]))
    if isinstance(decoder, OnnxDecoder):
        feeds = decoder.feeds([token], len(prompt))
        return [feeds[name] for name in decoder.input_names]
    return [np.asarray([[token]], np.int64), np.asarray([len(prompt)], np.int64)]


def decode_profile(
    dense: Path, slim: Path, prompt: Sequence[int], *, runs: int = 50, threads: int | None = 1
) -> dict[str, Any]:
    """Per-layer dense vs slim kernel times of one decode step (the step after `prompt`), run `runs`
    times interleaved on this machine (`slimship.runtimes.profile`): the rows of `bench --profile`."""
    prof = profile_models(
        dense, slim, decode_step_inputs(dense, prompt, threads), runs=runs, threads=threads or 1,
        slim_inputs=decode_step_inputs(slim, prompt, threads),
    )  # fmt: skip
    return {
        "dense": str(dense), "slim": str(slim), "where": "local profile (this machine)",
        "runtime": prof.runtime, "rows": [{k: row[k] for k in PROFILE_KEYS} for row in prof.rows()],
        "note": "; ".join(n for n in (f"one decode step at position {len(prompt)}", prof.note) if n),
    }  # fmt: skip


def _measurement(
    path: Path, times: dict[str, list[float]], rss: int | None, prompt_len: int, new_tokens: int
):
    prefill, decode = np.asarray(times["prefill"]), np.asarray(times["decode"])
    steps = max(new_tokens - 1, 1)
    return DecodeMeasurement(
        model=str(path), kind=file_kind(path), bytes=path.stat().st_size,
        ttft_ms=Spread.of(prefill * 1e3), prefill_tok_s=Spread.of(prompt_len / prefill),
        decode_tok_s=Spread.of(steps / decode), ms_per_token=Spread.of(decode / steps * 1e3), rss_kb=rss,
    )  # fmt: skip


def _speedups(
    paths: list[Path], dense: Path | None, times: Times, target: str
) -> tuple[list[Speedup], list[Speedup], list[str]]:
    if dense is None:
        return [], [], []
    decode, prefill, notes = [], [], []
    for path in paths:
        if path == dense:
            continue
        if file_kind(path) != file_kind(dense):
            notes.append(
                f"{path.name}: no speedup against {dense.name} ({file_kind(path)} vs {file_kind(dense)})"
            )
            continue
        for key, out in (("decode", decode), ("prefill", prefill)):
            ratios = [d / s for d, s in zip(times[dense][key], times[path][key], strict=True)]
            record = speedup_from_ratios(ratios, str(dense), str(path), target)
            record.format = file_kind(path)
            out.append(record)
    return decode, prefill, notes


def format_decode_table(result: DecodeBench):
    """A rich Table: one row per file, then the dense/slim speedups."""
    from rich.table import Table

    title = (
        f"text generation on {result.target}, {result.where}: prompt {result.prompt_len}, "
        f"{result.new_tokens} new tokens, {result.runs} runs, threads={result.threads or 'default'} "
        "(median, p10-p90)"
    )
    table = Table(title=title)
    for header in ("model", "kind", "MB", "TTFT ms", "prefill tok/s", "decode tok/s", "ms/token", "RSS MB"):
        table.add_column(header)
    for m in result.measurements:
        table.add_row(  # RSS MB: what the file adds to a fresh runner process (the module doc)
            Path(m.model).name, m.kind, f"{m.bytes / 1e6:.2f}", _spread(m.ttft_ms, ".2f"),
            _spread(m.prefill_tok_s, ".0f"), _spread(m.decode_tok_s, ".0f"), _spread(m.ms_per_token, ".3f"),
            "-" if m.rss_kb is None else f"{m.rss_kb / 1024:.1f}",
        )  # fmt: skip
    for label, speedups in (("decode", result.decode_speedups), ("prefill", result.prefill_speedups)):
        for s in speedups:
            table.caption = (table.caption or "") + (
                f"\n{label} speedup {Path(s.dense).name} -> {Path(s.slim).name}: "
                f"{speedup_text(s.median, s.p10, s.p90)}"
            )
    for line in result.notes:
        table.caption = (table.caption or "") + f"\n{line}"
    return table


def _spread(s: Spread, spec: str) -> str:
    return f"{s.median:{spec}} ({s.p10:{spec}}-{s.p90:{spec}})"
