#!/usr/bin/env python3
"""Self-contained model runner: needs only Python, numpy and one runtime.

The host imports this module for local runs and ships the very same file to remote devices, where it runs as
a script and writes nothing but a JSON result file: no imports beyond numpy and the one runtime it loads.

CLI contract (stable; other modules rely on it):
    python device_runner.py --model M.tflite|M.onnx|M.pte --inputs inputs.npz --out result.json
        [--runtime auto|onnxruntime|litert|tflite_runtime|executorch] [--threads N] [--warmup W] [--runs R]
        [--save-outputs outputs.npz]
        [--model M2 ...]            (pair mode: models are timed interleaved, A B A B ...)
        [--affinity 0,1] [--xnnpack on|off] [--eval eval.npz [--eval-output K]]
        [--task text-generation --prompt-len P --new-tokens T [--seed S]]
`inputs.npz` holds arrays named in0, in1, ... in the model's input order.
With `--task text-generation` (decoders from `slimship export --task text-generation`; `inputs.npz` may be
empty) a run is one greedy generation of T tokens (EOS ignored) after P ids drawn by numpy's default_rng(S)
from the first model's vocabulary; each `models` entry has tokens (of the first run), prefill_s and decode_s
(seconds per run: the prompt's call; the T - 1 one-token calls); latencies_ms: whole generations.
`eval.npz` holds batches as b0_in0, b0_in1, b1_in0, ...; the result gets each batch's top-1 predictions
(argmax over the last axis of output K, default 0) per model.

A .pte program needs the `executorch` package, whose Python runtime also imports torch.

Result JSON (always written, atomically): ok, model, load_ms, runtime, latencies_ms (first model),
peak_rss_kb, baseline_rss_kb, affinity, and `models`: per --model its model, load_ms, runtime, latencies_ms,
cpu_ms (the calling thread's CPU time of each run: a run whose latency exceeds it lost time to other
processes, where the runtime computes on that thread, as with one thread) and (with --eval) eval_top1. With
two or more models, `pair_ratios` holds latency(model 0) / latency(model k) per interleaved round. On failure:
ok=false and `error` ("Type: message"); exit status 1.

peak_rss_kb is getrusage(RUSAGE_SELF).ru_maxrss: the high-water mark of everything this process holds (Python,
numpy, the runtime, all models), not of one model; baseline_rss_kb is the same before any model was loaded.
Each `models` entry has model_rss_kb: the resident memory (/proc/self/statm) the model's load and first run
added, after its runtime was imported (null where it cannot be read). `--save-outputs` writes out0, out1, ...
of the first model, and m1_out0, ... of further ones.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time
from typing import Any

import numpy as np


class RunnerLoadError(RuntimeError):
    """The model file or the runtime could not be loaded."""


def _tflite_interpreter_class(runtime: str) -> tuple[Any, str, str]:
    if runtime in ("auto", "litert"):
        try:
            from ai_edge_litert import interpreter as litert_interpreter

            version = _dist_version("ai-edge-litert")
            return litert_interpreter.Interpreter, "litert", version
        except ImportError:
            if runtime == "litert":
                raise RunnerLoadError(
                    "runtime 'litert' requested but ai_edge_litert is not installed"
                ) from None
    try:
        from tflite_runtime import interpreter as tflite_interpreter
    except ImportError:
        raise RunnerLoadError(
            "no TFLite interpreter found: install ai-edge-litert or tflite-runtime"
        ) from None
    return tflite_interpreter.Interpreter, "tflite_runtime", _dist_version("tflite-runtime")


def _dist_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "unknown"


class OrtRunner:
    """onnxruntime CPU session."""

    backend = "onnxruntime"
    files = "ONNX files"

    @staticmethod
    def preload(runtime: str) -> None:
        import onnxruntime  # noqa: F401

    def __init__(self, path: str, threads: int | None = None, runtime: str = "auto", xnnpack: bool = True):
        try:
            import onnxruntime as ort
        except ImportError:
            raise RunnerLoadError("runtime 'onnxruntime' is not installed") from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise RunnerLoadError(f"{path}: onnxruntime cannot load this model: {exc}") from exc
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.version = ort.__version__
        self.threads = threads

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        feed = dict(zip(self.input_names, inputs, strict=True))
        return list(self.session.run(self.output_names, feed))

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "version": self.version, "threads": self.threads}


class TFLiteRunner:
    """LiteRT interpreter (ai_edge_litert), else tflite_runtime."""

    files = "TFLite files"

    @staticmethod
    def preload(runtime: str) -> None:
        _tflite_interpreter_class(runtime)

    def __init__(
        self, path: str, threads: int | None = None, runtime: str = "auto", xnnpack: bool = True
    ) -> None:
        cls, self.backend, self.version = _tflite_interpreter_class(runtime)
        kwargs: dict[str, Any] = {"model_path": path, "num_threads": threads or None}
        if not xnnpack:
            # BUILTIN_WITHOUT_DEFAULT_DELEGATES: the built-in kernels without the XNNPACK delegate
            # that the interpreter otherwise applies by default.
            module = sys.modules[cls.__module__]
            kwargs["experimental_op_resolver_type"] = module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        self.xnnpack = xnnpack
        try:
            self.interpreter = cls(**kwargs)
            self.interpreter.allocate_tensors()
        except Exception as exc:
            raise RunnerLoadError(f"{path}: {self.backend} cannot load this model: {exc}") from exc
        self.inputs = self.interpreter.get_input_details()
        self.outputs = self.interpreter.get_output_details()
        self.threads = threads

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        if len(inputs) != len(self.inputs):
            raise ValueError(f"model takes {len(self.inputs)} inputs, got {len(inputs)}")
        for detail, value in zip(self.inputs, inputs, strict=True):
            value = _quantize(value, detail)
            if tuple(detail["shape"]) != value.shape:
                self.interpreter.resize_tensor_input(detail["index"], value.shape)
                self.interpreter.allocate_tensors()
            self.interpreter.set_tensor(detail["index"], value)
        self.interpreter.invoke()
        return [_dequantize(self.interpreter.get_tensor(d["index"]), d) for d in self.outputs]

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "version": self.version,
            "threads": self.threads,
            "xnnpack": self.xnnpack,
        }


class ExecuTorchRunner:
    """ExecuTorch program (.pte) through `executorch.runtime`; XNNPACK-delegated parts run on XNNPACK."""

    backend = "executorch"
    files = "ExecuTorch programs"

    @staticmethod
    def preload(runtime: str) -> None:
        from executorch.runtime import Runtime

        Runtime.get()

    def __init__(self, path: str, threads: int | None = None, runtime: str = "auto", xnnpack: bool = True):
        try:
            import torch
            from executorch.runtime import Runtime
        except ImportError:
            raise RunnerLoadError("runtime 'executorch' is not installed (pip install executorch)") from None
        self._torch = torch
        if threads:
            torch.set_num_threads(threads)
        try:
            program = Runtime.get().load_program(path)
            self.method = program.load_method("forward")
        except Exception as exc:
            raise RunnerLoadError(f"{path}: executorch cannot load this program: {exc}") from exc
        if self.method is None:
            raise RunnerLoadError(f"{path}: the program has no 'forward' method")
        meta = self.method.metadata
        self.num_inputs = meta.num_inputs()
        self.version = _dist_version("executorch")
        self.threads = threads

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        if len(inputs) != self.num_inputs:
            raise ValueError(f"program takes {self.num_inputs} inputs, got {len(inputs)}")
        tensors = [self._torch.from_numpy(np.ascontiguousarray(x)) for x in inputs]
        return [np.asarray(o.detach().numpy()).copy() for o in self.method.execute(tensors)]

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "version": self.version, "threads": self.threads}


def _quantize(value: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    dtype = detail["dtype"]
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if np.issubdtype(dtype, np.integer) and scale:
        info = np.iinfo(dtype)
        return np.clip(np.round(value / scale + zero_point), info.min, info.max).astype(dtype)
    return value.astype(dtype, copy=False)


def _dequantize(value: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if np.issubdtype(value.dtype, np.integer) and scale:
        return (value.astype(np.float32) - zero_point) * scale
    return value.copy()


# ------------------------------------------------------------------------------------ text generation
#: ONNX metadata_props key holding a text-generation file's facts as JSON
ONNX_METADATA_KEY = "slimship.text_generation"
#: ExecuTorch LLM runner metadata methods a text-generation .pte carries
PTE_METADATA = (
    "get_max_seq_len", "get_max_context_len", "get_vocab_size", "get_n_layers", "get_bos_id", "get_eos_ids",
    "use_kv_cache", "use_sdpa_with_kv_cache", "enable_dynamic_shape",
)  # fmt: skip


class NotTextGeneration(RunnerLoadError):
    """The file loads but holds no decoder with a KV cache."""


class OrtTokenDecoder:
    """An .onnx with past/present keys and values: `forward(tokens, start)` feeds `tokens` at positions
    `start ...` and returns their logits [len(tokens), vocab]; `reset()` starts a new sequence."""

    def __init__(self, path: str, threads: int | None = None) -> None:
        self._runner = OrtRunner(path, threads)
        self._session = self._runner.session
        raw = self._session.get_modelmeta().custom_metadata_map.get(ONNX_METADATA_KEY)
        if raw is None:
            raise NotTextGeneration(f"no {ONNX_METADATA_KEY} metadata")
        meta = json.loads(raw)
        layers = int(meta["layers"])
        self.meta = {
            "vocab_size": int(meta["vocab_size"]), "max_seq_len": meta.get("max_seq_len"), "layers": layers,
            "bos_id": meta.get("bos_id"), "eos_ids": tuple(meta.get("eos_ids", ())),
        }  # fmt: skip
        self._past_names = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
        self._shapes = {i.name: i.shape for i in self._session.get_inputs()}
        self.input_names = list(self._shapes)
        self.reset()

    def reset(self) -> None:
        self._past = {
            name: np.zeros((1, self._shapes[name][1], 0, self._shapes[name][3]), np.float32)
            for name in self._past_names
        }

    def feeds(self, tokens: list[int], start: int) -> dict[str, np.ndarray]:
        """The session's inputs for `tokens` at positions `start ...`, with the cache held so far."""
        return {
            "input_ids": np.asarray([list(tokens)], np.int64),
            "position_ids": np.arange(start, start + len(tokens), dtype=np.int64)[None],
            **self._past,
        }

    def forward(self, tokens: list[int], start: int) -> np.ndarray:
        outputs = self._session.run(None, self.feeds(tokens, start))
        self._past = dict(zip(self._past_names, outputs[1:], strict=True))
        return outputs[0].reshape(len(tokens), -1)

    def describe(self) -> dict[str, Any]:
        return self._runner.describe()


class PteTokenDecoder:
    """A .pte with `forward(tokens[1, S], input_pos[1]) -> logits` and the LLM runner's metadata methods
    (its cache lives in the program; the position comes with every call, so `reset` has nothing to clear)."""

    def __init__(self, path: str, threads: int | None = None) -> None:
        try:
            import torch
            from executorch.runtime import Runtime
        except ImportError:
            raise RunnerLoadError("runtime 'executorch' is not installed (pip install executorch)") from None
        self._torch, self.threads = torch, threads
        if threads:
            executorch_threads(threads)
        try:
            program = Runtime.get().load_program(path)
        except Exception as exc:
            raise RunnerLoadError(
                f"executorch cannot load it ({(str(exc) or 'error').splitlines()[0]})"
            ) from None
        names = set(program.method_names)
        if "use_kv_cache" not in names or "forward" not in names:
            raise NotTextGeneration("it has no use_kv_cache metadata method")
        meta = {n: program.load_method(n).execute([])[0] for n in PTE_METADATA if n in names}
        self._forward = program.load_method("forward")
        eos = meta.get("get_eos_ids", ())
        self.meta = {
            "vocab_size": int(meta["get_vocab_size"]), "max_seq_len": int(meta["get_max_seq_len"]),
            "layers": int(meta.get("get_n_layers", 0)),
            "bos_id": int(meta["get_bos_id"]) if "get_bos_id" in meta else None,
            "eos_ids": tuple(int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])),
        }  # fmt: skip

    def reset(self) -> None:
        return None

    def forward(self, tokens: list[int], start: int) -> np.ndarray:
        torch = self._torch  # the program holds its cache
        ids = torch.tensor([list(tokens)], dtype=torch.long)
        logits = self._forward.execute([ids, torch.tensor([start], dtype=torch.long)])[0]
        return logits.detach().numpy().reshape(len(tokens), -1)

    def describe(self) -> dict[str, Any]:
        return {"backend": "executorch", "version": _dist_version("executorch"), "threads": self.threads}


def executorch_threads(threads: int) -> None:
    """XNNPACK's thread pool in this process (ExecuTorch's portable kernels run on the calling thread)."""
    import torch
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(int(threads))
    torch.set_num_threads(int(threads))


#: file suffix -> the decoder class that opens a text-generation file
TOKEN_DECODERS: dict[str, type] = {".onnx": OrtTokenDecoder, ".pte": PteTokenDecoder}


def greedy_decode(
    decoder: Any, prompt: list[int], new_tokens: int, eos: frozenset[int] = frozenset()
) -> tuple[list[int], list[np.ndarray], float, list[float]]:
    """(tokens, logits rows per call, prefill seconds, seconds per decode step): the prompt in one call,
    then one call per new token, until `new_tokens` or an id in `eos`."""
    decoder.reset()
    began = time.perf_counter()
    rows = [decoder.forward(prompt, 0)]
    prefill = time.perf_counter() - began
    tokens = [int(np.argmax(rows[-1][-1]))]
    steps: list[float] = []
    while len(tokens) < new_tokens and tokens[-1] not in eos:
        began = time.perf_counter()
        rows.append(decoder.forward([tokens[-1]], len(prompt) + len(tokens) - 1))
        steps.append(time.perf_counter() - began)
        tokens.append(int(np.argmax(rows[-1][-1])))
    return tokens, rows, prefill, steps


def _open_token_decoder(path: str, threads: int | None) -> Any:
    cls = TOKEN_DECODERS.get(os.path.splitext(path)[1].lower())
    if cls is None:
        raise RunnerLoadError(f"{path}: text generation runs .pte and .onnx files")
    try:
        return cls(path, threads)
    except RunnerLoadError as exc:
        raise type(exc)(f"{os.path.basename(path)}: {exc}") from None


def _measure_decode(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """`--task text-generation`: every run one greedy generation per model, interleaved (module doc)."""
    result["affinity"], result["baseline_rss_kb"] = apply_affinity(args.affinity), _peak_rss_kb()
    pairs: list[tuple[dict[str, Any], Any]] = []  # (entry, decoder) per model
    prompt: list[int] = []
    for path in args.model:
        _preload_runtime(path, args.runtime)
        before, start = _current_rss_kb(), time.perf_counter()
        decoder = _open_token_decoder(path, args.threads)
        entry = {"model": os.path.basename(path), "load_ms": (time.perf_counter() - start) * 1e3}
        vocab, room = decoder.meta["vocab_size"], decoder.meta["max_seq_len"]
        if not prompt:
            rng = np.random.default_rng(args.seed)
            prompt = [int(t) for t in rng.integers(0, vocab, args.prompt_len)]
        if max(prompt) >= vocab:
            raise ValueError(f"{entry['model']}: its vocabulary of {vocab} is smaller than the others'")
        if room is not None and args.prompt_len + args.new_tokens > room:
            raise ValueError(f"{entry['model']}: {args.prompt_len} prompt + {args.new_tokens} new tokens "
                             f"exceed its cache of {room} (export with a larger --max-seq-len)")  # fmt: skip
        entry["tokens"] = greedy_decode(decoder, prompt, args.new_tokens)[0]  # allocations, weight packing
        after = _current_rss_kb()
        entry["model_rss_kb"] = None if before is None or after is None else max(after - before, 0)
        entry.update(runtime=decoder.describe(), prefill_s=[], decode_s=[], latencies_ms=[])
        pairs.append((entry, decoder))
    for run in range(args.warmup + args.runs):
        for entry, decoder in pairs:
            _, _, prefill, steps = greedy_decode(decoder, prompt, args.new_tokens)
            if run >= args.warmup:
                entry["prefill_s"].append(prefill)
                entry["decode_s"].append(sum(steps))
                entry["latencies_ms"].append((prefill + sum(steps)) * 1e3)
    first = pairs[0][0]
    result.update(ok=True, models=[e for e, _ in pairs], prompt=prompt, load_ms=first["load_ms"],
                  runtime=first["runtime"], latencies_ms=first["latencies_ms"])  # fmt: skip


# The runtimes this script runs, by name: the file suffixes each opens and its runner class (constructed as
# `cls(path, threads, runtime, xnnpack)`). This copy keeps the script self-contained on a device;
# `slimship.runtimes.registry.RUNTIMES` holds the same names and suffixes, and a test ties the two.
RUNNERS: dict[str, tuple[tuple[str, ...], type]] = {
    "onnxruntime": ((".onnx",), OrtRunner),
    "litert": ((".tflite",), TFLiteRunner),
    "tflite_runtime": ((".tflite",), TFLiteRunner),
    "executorch": ((".pte",), ExecuTorchRunner),
}
RUNTIMES = tuple(RUNNERS)
SUFFIXES = tuple(dict.fromkeys(suffix for suffixes, _ in RUNNERS.values() for suffix in suffixes))


def runtimes_for(path: str) -> list[str]:
    """The runtimes that open `path` (by its suffix), in table order."""
    return [name for name, (suffixes, _) in RUNNERS.items() if path.lower().endswith(suffixes)]


def open_runner(
    path: str, runtime: str = "auto", threads: int | None = None, xnnpack: bool = True
) -> OrtRunner | TFLiteRunner | ExecuTorchRunner:
    """Open a runner for a model file: `auto` picks by suffix (`xnnpack` applies to TFLite only)."""
    if not os.path.isfile(path):
        raise RunnerLoadError(f"{path}: no such model file")
    names = runtimes_for(path)
    if not names:
        raise RunnerLoadError(f"{path}: unknown model format (expected {', '.join(SUFFIXES)})")
    if runtime not in (*names, "auto"):
        raise RunnerLoadError(f"{path}: runtime {runtime!r} cannot run {RUNNERS[names[0]][1].files}")
    runner_class = RUNNERS[names[0] if runtime == "auto" else runtime][1]
    return runner_class(path, threads, runtime, xnnpack)


def load_inputs(path: str) -> list[np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return [data[f"in{i}"] for i in range(len(data.files))]


def load_eval_batches(path: str) -> list[list[np.ndarray]]:
    """Read b{i}_in{j} arrays from an .npz into a list of input lists."""
    with np.load(path, allow_pickle=False) as data:
        names = set(data.files)
        batches = []
        while f"b{len(batches)}_in0" in names:
            b = len(batches)
            count = sum(1 for n in names if n.startswith(f"b{b}_in"))
            batches.append([data[f"b{b}_in{j}"] for j in range(count)])
    return batches


def apply_affinity(spec: str | None) -> list[int] | None:
    """Pin this process to the given cores ("0,1"); return the cores in effect."""
    if spec:
        cores = {int(c) for c in spec.split(",") if c.strip()}
        if not hasattr(os, "sched_setaffinity"):
            raise OSError("CPU affinity was requested but this platform has no sched_setaffinity")
        os.sched_setaffinity(0, cores)
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return None


def _peak_rss_kb() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak // 1024) if sys.platform == "darwin" else int(peak)  # macOS reports bytes


def _current_rss_kb() -> int | None:
    """Resident memory of this process now (Linux /proc/self/statm), else None."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        return None


def _preload_runtime(path: str, runtime: str) -> None:
    """Import the runtime a model file needs, so the RSS measured around its load is the model's own."""
    names = runtimes_for(path)
    if names:
        with contextlib.suppress(Exception):  # open_runner reports a missing runtime with its own message
            RUNNERS[names[0]][1].preload(runtime)


def _time_interleaved(
    runners: list[Any], inputs: list[np.ndarray], runs: int
) -> tuple[list[list[float]], list[list[float]]]:
    """Time `runs` rounds; in each round every model runs once, in order (A B A B ...). Returns the wall
    latencies and the calling thread's CPU time of each run (ms)."""
    latencies: list[list[float]] = [[] for _ in runners]
    cpu: list[list[float]] = [[] for _ in runners]
    for _ in range(runs):
        for k, runner in enumerate(runners):
            c0, t0 = time.thread_time(), time.perf_counter()
            runner.run(inputs)
            latencies[k].append((time.perf_counter() - t0) * 1e3)
            cpu[k].append((time.thread_time() - c0) * 1e3)
    return latencies, cpu


def _top1(outputs: list[np.ndarray], index: int = 0) -> list[int]:
    """argmax over the last axis of output `index` per row; -1 for a row holding a NaN (it names no class)."""
    rows = np.asarray(outputs[index]).reshape(-1, np.asarray(outputs[index]).shape[-1])
    top = rows.argmax(-1)
    if rows.dtype.kind in "fc":
        top = np.where(np.isnan(rows).any(-1), -1, top)
    return [int(v) for v in top]


def _measure(args: argparse.Namespace, result: dict[str, Any]) -> None:
    result["affinity"] = apply_affinity(args.affinity)
    result["baseline_rss_kb"] = _peak_rss_kb()
    inputs = load_inputs(args.inputs)
    entries: list[dict[str, Any]] = []
    runners = []
    first_outputs: list[list[np.ndarray]] = []
    for path in args.model:
        _preload_runtime(path, args.runtime)
        before = _current_rss_kb()
        start = time.perf_counter()
        runner = open_runner(path, args.runtime, args.threads, args.xnnpack == "on")
        entry = {"model": os.path.basename(path), "load_ms": (time.perf_counter() - start) * 1e3}
        first_outputs.append(runner.run(inputs))
        after = _current_rss_kb()
        entry["model_rss_kb"] = None if before is None or after is None else max(after - before, 0)
        entry["runtime"] = runner.describe()
        runners.append(runner)
        entries.append(entry)
    for _ in range(max(args.warmup - 1, 0)):
        for runner in runners:
            runner.run(inputs)
    latencies, cpu = _time_interleaved(runners, inputs, args.runs)
    for entry, lat, cpu_ms in zip(entries, latencies, cpu, strict=True):
        entry["latencies_ms"], entry["cpu_ms"] = lat, cpu_ms
    if args.eval:
        batches = load_eval_batches(args.eval)
        for entry, runner in zip(entries, runners, strict=True):
            entry["eval_top1"] = [_top1(runner.run(batch), args.eval_output) for batch in batches]
    if len(runners) > 1:
        result["pair_ratios"] = [
            [a / b for a, b in zip(latencies[0], lat, strict=True)] for lat in latencies[1:]
        ]
    if args.save_outputs:
        arrays = {}
        for k, outputs in enumerate(first_outputs):
            prefix = "" if k == 0 else f"m{k}_"
            arrays.update({f"{prefix}out{i}": o for i, o in enumerate(outputs)})
        np.savez(args.save_outputs + ".tmp.npz", **arrays)
        os.replace(args.save_outputs + ".tmp.npz", args.save_outputs)
    first = entries[0]
    result.update(ok=True, models=entries, load_ms=first["load_ms"], runtime=first["runtime"],
                  latencies_ms=first["latencies_ms"])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, action="append", help="repeat for interleaved pairs")
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--runtime", default="auto", choices=("auto", *RUNTIMES))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--save-outputs", default=None)
    parser.add_argument("--affinity", default=None, help="comma-separated CPU cores, e.g. 0,1")
    parser.add_argument("--xnnpack", default="on", choices=("on", "off"))
    parser.add_argument("--eval", default=None, help="npz of evaluation batches b{i}_in{j}")
    parser.add_argument("--eval-output", type=int, default=0, help="the output whose argmax is top-1")
    parser.add_argument("--task", default=None, choices=("text-generation",))
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"ok": False, "model": os.path.basename(args.model[0])}
    try:
        (_measure_decode if args.task == "text-generation" else _measure)(args, result)
    except Exception as exc:  # reported to the host as data, never as a traceback
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["peak_rss_kb"] = _peak_rss_kb()
    tmp = args.out + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(result, handle)
    os.replace(tmp, args.out)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
