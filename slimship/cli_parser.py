"""The `slimship` argument parser: every option with a help line and its default, every command an example."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slimship._version import __version__
from slimship.budget import parse_size
from slimship.decoder import cli as decoder_cli
from slimship.pipeline.gates import GATE_RULES
from slimship.runtimes.registry import RUNTIMES

DESCRIPTION = """slim pruned PyTorch models, export them (ONNX, TFLite, ExecuTorch) with parity checks,
measure them on your targets and publish checked release bundles.

Every command takes --json PATH (- for stdout: then stdout holds only that JSON; progress, notes and
tables go to stderr). Progress and notes are on stderr; third-party logs are silenced unless -v."""


DEFAULT_FORMATS = ("onnx", "tflite-fp32")  # export's formats, and release's when --format is omitted


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Option defaults in every help line (not for options off by default); epilogs kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


EXAMPLES = {
    "demo": "slimship demo --out artifacts",
    "run": "slimship run configs/example.yaml --out artifacts --min-speedup 1.2",
    "config-schema": "slimship config-schema --out slimship.schema.json",
    "targets": "slimship targets --targets-file my-targets.yaml",
    "slim": "slimship slim model.pt2 --out slim.pt2 --json slim.json\n"
    "  slimship slim --model torchvision.models:resnet18 --weights resnet18.safetensors "
    "--input-shape 3 224 224 --out slim.pt2",
    "export": "slimship export slim.pt2 --format onnx tflite-fp32 tflite-int8 --calibration calib.npz "
    "--out exported\n  slimship export --model my_models:slim_llama --task text-generation --max-seq-len 256 "
    "--format executorch-fp32 executorch-8da4w onnx --out exported",
    "bench": "slimship bench exported/slim.onnx --dense exported/model.onnx --target mobile-1t --json -\n"
    "  slimship bench slim.fp32.pte --dense dense.fp32.pte --task text-generation --prompt-len 32 "
    "--new-tokens 32 --runs 10 --target mobile-1t",
    "release": "slimship release slim.pt2 --name my-model --version 1.0.0 --format onnx tflite-int8 "
    "--calibration calib.npz\n  slimship release llama-slim/ --task text-generation --name llama-slim "
    "--version 1.0.0 --files phone/llama-slim.fp32.pte phone/llama-slim.8da4w.pte --dense dense/llama.pte",
    "verify": "slimship verify artifacts/my-model-1.0.0",
    "generate": "slimship generate exported/slim.fp32.pte --prompt-ids 1,2,3 --max-new-tokens 16\n"
    "  slimship generate artifacts/llama-slim-1.0.0 --prompt 'Once upon a time' --max-new-tokens 32",
}


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _command(sub: Any, name: str, text: str, fn: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name, help=text, description=text, formatter_class=_Help, epilog=f"example:\n  {EXAMPLES[name]}"
    )
    p.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="write the result as JSON to PATH ('-': stdout, which then holds only the JSON)",
    )
    p.set_defaults(fn=fn)
    return p


def _targets_help() -> str:
    from slimship.runtimes.targets import BUILTIN_TARGETS

    return f"built-in {', '.join(BUILTIN_TARGETS)}, or a --targets-file entry (see: slimship targets)"


def build_parser(commands: dict[str, Callable[[argparse.Namespace], int]]) -> argparse.ArgumentParser:
    """The `slimship` parser; `commands` maps each command name to the function that runs it."""
    from slimship.exporters.registry import FORMATS
    from slimship.sources import add_model_arguments

    targets_help = _targets_help()
    formats = {
        "nargs": "+",
        "default": list(DEFAULT_FORMATS),
        "choices": list(FORMATS),
        "metavar": "FORMAT",
        "help": "formats: " + "; ".join(f"{n} ({r.description})" for n, r in FORMATS.items()),
    }
    calibration = {
        "default": None,
        "metavar": "FILE.npz",
        "help": "int8 calibration samples: arrays in0, in1, ... with samples along the first dim "
        "(used by tflite-int8, executorch-int8 and onnx-int8; random inputs without it)",
    }
    targets_file = {"default": None, "metavar": "FILE", "help": "YAML file of your own targets (see README)"}
    parser = argparse.ArgumentParser(prog="slimship", description=DESCRIPTION, formatter_class=_Help)
    parser.add_argument("--version", action="version", version=f"slimship {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log at INFO level, show third-party logs"
    )
    parser.add_argument(
        "--max-memory",
        type=_size,
        default=None,
        metavar="SIZE",
        help="memory budget for what a file declares (inputs, graph nodes, weights, .npz arrays), e.g. 4GiB "
        "(omitted: a quarter of this machine's memory)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "demo", "the whole pipeline on the built-in digits CNN", commands["demo"])
    p.add_argument("--out", type=Path, default=Path("artifacts"), help="release directory")
    p.add_argument("--version", dest="version", default=None, help="release version (omitted: 0.1.0)")
    _add_gate_options(p)

    p = _command(sub, "run", "the pipeline driven by a YAML config", commands["run"])
    p.add_argument("config", type=Path, help="pipeline config (see configs/example.yaml)")
    p.add_argument("--out", type=Path, default=None, help="override release.out")
    p.add_argument(
        "--exports",
        type=Path,
        default=None,
        metavar="DIR",
        help="reuse files exported and checked for the same model and options from DIR's export index, and "
        "record the run's new exports there (a cache folder)",
    )
    _add_gate_options(p)

    p = _command(sub, "config-schema", "the JSON Schema of a pipeline config", commands["config-schema"])
    p.add_argument("--out", type=Path, default=None, help="write it here (omitted: stdout)")

    p = _command(sub, "targets", "list built-in and user targets with what each means", commands["targets"])
    p.add_argument("--targets-file", **targets_file)

    p = _command(
        sub, "slim", "slim a model: remove zero / constant / duplicate channels, verify", commands["slim"]
    )
    add_model_arguments(p, "the model to slim")
    p.add_argument("--out", type=Path, required=True, help="where to write the slim program (.pt2)")
    p.add_argument(
        "--channel-multiple",
        default=None,
        help="round kept channels up to N; 'auto': one multiple measured on --target; 'latency': per channel"
        " space, the kept count its layers run fastest at on --target",
    )
    p.add_argument("--target", default="mobile-1t", help=f"where 'auto' measures: {targets_help}")
    p.add_argument("--targets-file", **targets_file)
    p.add_argument(
        "--align-runtime",
        default="onnxruntime",
        choices=[name for name, record in RUNTIMES.items() if record.times_alignment],
        help="runtime 'auto' and 'latency' measure with",
    )

    p = _command(
        sub, "export", "export a model to ONNX / TFLite / ExecuTorch, with parity checks", commands["export"]
    )
    add_model_arguments(p, "the model to export")
    p.add_argument("--format", **formats)
    p.add_argument("--calibration", **calibration)
    p.add_argument("--out", type=Path, default=Path("."), help="output folder")
    decoder_cli.add_export_arguments(p)

    p = _command(sub, "bench", "measure .onnx / .tflite / .pte models on a target", commands["bench"])
    p.add_argument("models", nargs="+", help="model files; input shapes are read from the first one")
    p.add_argument("--target", default="host", help=f"where to run: {targets_help}")
    p.add_argument("--targets-file", **targets_file)
    p.add_argument("--dense", default=None, help="dense model: report speedups against it")
    p.add_argument(
        "--inputs",
        default=None,
        metavar="FILE.npz",
        help="inputs: arrays in0, in1, ... (omitted: random, shaped as the model file says)",
    )
    p.add_argument(
        "--input-shape",
        type=int,
        nargs="+",
        default=None,
        metavar="DIM",
        help="override the first input's shape (without batch) read from the file",
    )
    p.add_argument("--runs", type=int, default=50, help="timed runs per model")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs before timing")
    p.add_argument(
        "--calibration", default=None, metavar="FILE.npz",
        help="with a dense .pt2: calibration samples for the full-int8 files bench exports from it (give the "
        "samples the slim files were calibrated on, so the pair compares like with like)",
    )  # fmt: skip
    p.add_argument(
        "--profile",
        action="store_true",
        help="also a per-layer profile of each dense/slim pair (onnxruntime profiler, ExecuTorch ETDump)",
    )
    decoder_cli.add_bench_arguments(p)

    p = _command(
        sub, "release", "bundle a slim model with fresh exports, gates and a model card", commands["release"]
    )
    add_model_arguments(p, "the slim model")
    p.add_argument("--name", required=True, help="release name")
    p.add_argument("--version", dest="version", required=True, help="release version MAJOR.MINOR.PATCH")
    p.add_argument("--out", type=Path, default=Path("artifacts"), help="releases folder")
    p.add_argument(
        "--format", **{**formats, "default": None, "help": formats["help"] + " (omitted: onnx tflite-fp32)"}
    )
    p.add_argument("--calibration", **calibration)
    p.add_argument(
        "--exports",
        type=Path,
        default=None,
        metavar="DIR",
        help="reuse the files `slimship export --out DIR` wrote and checked for the same model, formats and "
        "data (their sha256 is checked again); the others are exported",
    )
    p.add_argument(
        "--target", default=None,
        help="time every file on this target and record p50, speedup and efficiency in the bundle (timings "
        "vary, so a timed bundle is not byte-reproducible); without it the files are checked, not timed, "
        f"unless a latency gate needs the host's figure: {targets_help}",
    )  # fmt: skip
    _add_gate_options(p)
    decoder_cli.add_release_arguments(p)

    p = _command(sub, "verify", "check a release bundle: checksums, schema, parity", commands["verify"])
    p.add_argument("bundle", help="bundle directory or .tar.gz")

    p = _command(sub, "generate", "greedy text generation with a .pte / .onnx decoder or a release bundle",
                 commands["generate"])  # fmt: skip
    decoder_cli.add_generate_arguments(p)
    return parser


def _add_gate_options(p: argparse.ArgumentParser) -> None:
    """Quality gates (override the config's `gates:`); a failing gate exits 3 and publishes nothing."""
    group = p.add_argument_group("quality gates (a failing gate exits 3 and publishes nothing)")
    for name, rule in GATE_RULES.items():  # one option per gate record
        flag = "--" + name.replace("_", "-")
        group.add_argument(flag, dest=name, type=float, default=None, metavar=rule.metavar, help=rule.help)
