"""The `slimship` command: parses arguments and calls the pipeline or one stage."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

from slimship._version import __version__
from slimship.errors import GateError, SlimshipError
from slimship.pipeline.config import FORMATS


def _gate_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The gate options given on the command line (they override the config's `gates:`)."""
    return {name: getattr(args, name) for name in GATE_HELP if getattr(args, name) is not None}


def _cmd_demo(args: argparse.Namespace) -> int:
    from slimship.pipeline.demo import demo_config
    from slimship.pipeline.run import run_pipeline

    release = {"out": str(args.out)} | ({"version": args.version} if args.version else {})
    run_pipeline(demo_config({"release": release, "gates": _gate_overrides(args)}))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from slimship.pipeline.config import load_config
    from slimship.pipeline.run import run_pipeline

    overrides: dict[str, Any] = {"gates": _gate_overrides(args)}
    if args.out:
        overrides["release"] = {"out": str(args.out)}
    run_pipeline(load_config(args.config, overrides))
    return 0


def _cmd_config_schema(args: argparse.Namespace) -> int:
    from slimship._util import atomic_write_bytes
    from slimship.pipeline.config import config_json_schema

    text = json.dumps(config_json_schema(), indent=2, sort_keys=True) + "\n"
    if args.out:
        atomic_write_bytes(args.out, text.encode())
    else:
        sys.stdout.write(text)
    return 0


def _load_program(args: argparse.Namespace) -> Any:
    """The .pt2 named on the command line, opened safely (unpickled only with --allow-pickle)."""
    from slimship.loading import load_program

    loaded = load_program(Path(args.model), allow_pickle=args.allow_pickle)
    if loaded.examples == "synthesized" and not args.input_shape:
        shapes = ", ".join(str(list(t.shape)) for t in loaded.example_inputs)
        print(f"note: example inputs synthesized from the graph's input metadata: {shapes}", file=sys.stderr)
    return loaded


def _example(args: argparse.Namespace, loaded: Any) -> tuple[Any, ...]:
    """--input-shape (batch of the program's example), else the loaded program's example inputs."""
    import torch

    from slimship.loading import check_example

    if args.input_shape:
        batch = loaded.example_inputs[0].shape[0] if loaded.example_inputs else 1
        example = (torch.randn(max(int(batch), 1), *args.input_shape),)
    else:
        example = loaded.example_inputs
    check_example(example, str(args.model))
    return example


def _channel_multiple(args: argparse.Namespace, module: Any, example: tuple[Any, ...]) -> int | None:
    """--channel-multiple: a number, or 'auto' (measured for the model's op kinds on --target)."""
    spec = args.channel_multiple
    if spec is None:
        return None
    if spec != "auto":
        if not spec.isdigit() or int(spec) < 1:
            raise SlimshipError(f"--channel-multiple is {spec!r}; expected a positive integer or 'auto'")
        return int(spec)
    from slimship.pipeline.alignment import choose_channel_multiple
    from slimship.runtimes import get_target, load_targets

    extra = load_targets(args.targets_file) if args.targets_file else None
    target = get_target(args.target, extra).with_overrides(runtime=args.align_runtime)
    multiple, info = choose_channel_multiple(module, example, example, target)
    per_kind = ", ".join(f"{k}: {m or 'none'}" for k, m in info["per_kind"].items())
    whole = info["whole_model"]
    tried = ", ".join(f"{m}: {v['speedup']:.3f}x" for m, v in (whole or {}).get("aligned", {}).items())
    check = f"; whole model vs exact slimming {tried}" if whole else ""
    where = f"{target.name} ({args.align_runtime})"
    print(f"channel alignment on {where}: {per_kind}{check} -> {multiple or 'none'}")
    return multiple


def _cmd_slim(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from slimship.slimming import slim

    check_output_file(Path(args.out), "--out")
    loaded = _load_program(args)
    example = _example(args, loaded)
    multiple = _channel_multiple(args, loaded.module, example)
    result = slim(loaded.module, example, channel_multiple=multiple)
    program = _reexport(result.model, example, loaded.dynamic_shapes(), args.model)
    torch.export.save(program, str(args.out))
    console = Console()
    console.print(f"slim model written to {args.out}")
    console.print_json(json.dumps(_jsonable(result.summary())))
    return 0


def _reexport(module: Any, example: tuple[Any, ...], dynamic_shapes: Any, source: Path) -> Any:
    """torch.export of the slim module, keeping the source program's dynamic dims."""
    import torch

    from slimship.errors import SlimmingError

    try:
        return torch.export.export(module, example, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:
        dims = "with the source's dynamic dims " if dynamic_shapes else ""
        raise SlimmingError(
            f"{source}: the slim model could not be exported {dims}({type(exc).__name__}: {str(exc)[:300]})"
        ) from exc


def _cmd_export(args: argparse.Namespace) -> int:
    from slimship.exporters import export_onnx, export_tflite

    out = Path(args.out)
    check_output_dir(out, "--out")
    loaded = _load_program(args)
    module, example = loaded.module, _example(args, loaded)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(args.model).stem
    for fmt in args.format:
        if fmt == "onnx":
            result = export_onnx(module, example, out / f"{stem}.onnx")
        else:
            variant = fmt.removeprefix("tflite-")
            result = export_tflite(module, example, out / f"{stem}-{variant}.tflite", variant=variant)
        print(f"{result.path}  {result.bytes} bytes  parity max|diff| {result.parity.max_abs_diff:.3g}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from rich.console import Console

    from slimship._util import atomic_write_bytes, dump_json
    from slimship.runtimes.measure import bench, format_bench_table, format_profile_table
    from slimship.runtimes.targets import get_target, load_targets

    if args.json and args.json != "-":
        check_output_file(Path(args.json), "--json")
    extra = load_targets(args.targets_file) if args.targets_file else None
    target = get_target(args.target, extra)
    models = [Path(m) for m in args.models]
    dense = Path(args.dense) if args.dense else None
    if dense is not None and dense not in models:
        models.insert(0, dense)
    inputs = _bench_inputs(args, models)
    result = bench(
        models, target, inputs, dense=dense, runs=args.runs, warmup=args.warmup, profile=args.profile
    )
    Console().print(format_bench_table(result))
    for profile in result.profiles:
        Console().print(format_profile_table(profile))
    if args.json == "-":
        print(dump_json(result), end="")
    elif args.json:
        atomic_write_bytes(args.json, dump_json(result).encode())
    return 0


def _bench_inputs(args: argparse.Namespace, models: list[Path]) -> list[Any]:
    """--inputs (checked against every model's inputs, read on this host) or random ones of --input-shape."""
    import numpy as np

    from slimship.inputs import check_inputs, load_npz_inputs, model_input_specs

    specs = {model: model_input_specs(model) for model in models}  # each model opened here first
    if not args.inputs:
        return [np.random.default_rng(0).standard_normal((1, *args.input_shape)).astype(np.float32)]
    inputs = load_npz_inputs(args.inputs)
    for model, model_specs in specs.items():
        check_inputs(inputs, model_specs, f"{args.inputs} (for {model})")
    return inputs


def _cmd_verify(args: argparse.Namespace) -> int:
    from slimship.pipeline.verify import verify_bundle

    result = verify_bundle(Path(args.bundle))
    print(json.dumps(_jsonable(result), indent=2, default=str))
    return 0


def _cmd_release(args: argparse.Namespace) -> int:
    """Bundle a slim .pt2 with fresh ONNX/TFLite exports (no bench figures)."""
    import tempfile

    from slimship.exporters import export_onnx, export_tflite
    from slimship.pipeline.config import gates_from_options
    from slimship.pipeline.release import ReleaseInputs, check_new_version, write_release
    from slimship.pipeline.run import gate_release

    check_new_version(Path(args.out), args.name, args.version)  # before any work
    gates = gates_from_options(_gate_overrides(args))  # checked before any export
    loaded = _load_program(args)
    module, example = loaded.module, _example(args, loaded)
    with tempfile.TemporaryDirectory() as tmp:
        exports = {}
        for fmt in dict.fromkeys(args.format):
            variant = fmt.removeprefix("tflite-")
            exports[fmt] = (
                export_onnx(module, example, Path(tmp) / "model.onnx")
                if fmt == "onnx"
                else export_tflite(module, example, Path(tmp) / f"model-{variant}.tflite", variant=variant)
            )
        parity = {
            fmt: {"max_abs_diff": e.parity.max_abs_diff, "max_rel_diff": e.parity.max_rel_diff,
                  "tolerance": e.parity.tolerance}
            for fmt, e in exports.items()
        }  # fmt: skip
        files = {fmt: e.path for fmt, e in exports.items()}
        results = gate_release(module, example, files, gates, args.target)  # GateError: nothing published
        from slimship._util import sha256_file

        inputs = ReleaseInputs(
            name=args.name, version=args.version, slim_module=module, example_inputs=example,
            model_files=files, reference={"source_sha256": sha256_file(args.model)}, slimming={},
            parity=parity, accuracy={}, latency={},
            config={"command": "release", "model": str(args.model), "gates": gates.model_dump()},
            gates=[r.to_dict() for r in results],
        )  # fmt: skip
        result = write_release(inputs, Path(args.out))
    print(result.bundle_dir)
    return 0


def _jsonable(value: Any) -> Any:
    from slimship._util import to_jsonable

    return to_jsonable(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimship", description=__doc__)
    parser.add_argument("--version", action="version", version=f"slimship {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the whole pipeline on the built-in digits CNN")
    p.add_argument(
        "--out", type=Path, default=Path("artifacts"), help="release directory (default: artifacts)"
    )
    p.add_argument("--version", dest="version", default=None, help="release version (default 0.1.0)")
    _add_gate_options(p)
    p.set_defaults(fn=_cmd_demo)

    p = sub.add_parser("run", help="the pipeline driven by a YAML config")
    p.add_argument("config", type=Path)
    p.add_argument("--out", type=Path, default=None, help="override release.out")
    _add_gate_options(p)
    p.set_defaults(fn=_cmd_run)

    p = sub.add_parser("config-schema", help="the JSON Schema of a pipeline config")
    p.add_argument("--out", type=Path, default=None, help="write it here (default: stdout)")
    p.set_defaults(fn=_cmd_config_schema)

    shape = {"type": int, "nargs": "+", "default": None, "help": "input shape without batch, e.g. 1 8 8"}
    pickle = {
        "action": "store_true",
        "help": "let the .pt2 unpickle its stored parts (can run code from the file: trusted files only)",
    }
    p = sub.add_parser("slim", help="slim a torch.export program (.pt2)")
    p.add_argument("model", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--channel-multiple",
        default=None,
        help="round kept channels up to N, or 'auto': measured on --target",
    )
    p.add_argument("--target", default="mobile-1t", help="where 'auto' measures (default mobile-1t)")
    p.add_argument("--targets-file", default=None)
    p.add_argument("--align-runtime", default="onnxruntime", choices=["onnxruntime", "litert"])
    p.add_argument("--input-shape", **shape)
    p.add_argument("--allow-pickle", **pickle)
    p.set_defaults(fn=_cmd_slim)

    p = sub.add_parser("export", help="export a .pt2 to ONNX / TFLite, with parity checks")
    p.add_argument("model", type=Path)
    p.add_argument("--format", nargs="+", default=["onnx", "tflite-fp32"], choices=list(FORMATS))
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--input-shape", **shape)
    p.add_argument("--allow-pickle", **pickle)
    p.set_defaults(fn=_cmd_export)

    p = sub.add_parser("bench", help="measure .onnx/.tflite models on a target")
    p.add_argument("models", nargs="+")
    p.add_argument("--target", default="host")
    p.add_argument("--targets-file", default=None)
    p.add_argument("--dense", default=None, help="dense model: report speedups against it")
    p.add_argument("--inputs", default=None, help=".npz with in0, in1, ...")
    p.add_argument("--input-shape", type=int, nargs="+", default=[1, 8, 8])
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", default=None, help="write the result as JSON here (- for stdout)")
    p.add_argument("--profile", action="store_true", help="per-layer dense vs slim profile of each pair")
    p.set_defaults(fn=_cmd_bench)

    p = sub.add_parser("release", help="bundle a slim .pt2 with its ONNX and TFLite exports")
    p.add_argument("model", type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--version", dest="version", required=True)
    p.add_argument("--out", type=Path, default=Path("artifacts"))
    p.add_argument("--input-shape", **shape)
    p.add_argument("--format", nargs="+", default=["onnx", "tflite-fp32"], choices=list(FORMATS))
    p.add_argument("--target", default="host", help="where gates time and evaluate the exports")
    _add_gate_options(p)
    p.add_argument("--allow-pickle", **pickle)
    p.set_defaults(fn=_cmd_release)

    p = sub.add_parser("verify", help="check a release bundle (directory or .tar.gz)")
    p.add_argument("bundle")
    p.set_defaults(fn=_cmd_verify)
    return parser


GATE_HELP = {
    "max_accuracy_drop": ("POINTS", "top-1 points the slim model may lose against the dense one (default 1)"),
    "min_speedup": ("X", "smallest dense/slim speedup per target (default off)"),
    "max_latency_ms": ("MS", "largest p50 latency per target (default off)"),
    "min_agreement": ("FRACTION", "top-1 agreement of quantised variants with the slim model (default 0.9)"),
}


def _add_gate_options(p: argparse.ArgumentParser) -> None:
    """Quality gates (override the config's `gates:`); a failing gate exits 3 and publishes nothing."""
    group = p.add_argument_group("quality gates (a failing gate exits 3 and publishes nothing)")
    for name, (metavar, text) in GATE_HELP.items():
        flag = "--" + name.replace("_", "-")
        group.add_argument(flag, dest=name, type=float, default=None, metavar=metavar, help=text)


def check_output_file(path: Path, option: str) -> None:
    """Refuse an output file path that is a folder or whose parent is not an existing folder."""
    if path.is_dir():
        raise SlimshipError(f"{option} {path}: is a folder; give the path of a file to write")
    if not path.parent.is_dir():
        what = "is a file" if path.parent.exists() else "does not exist"
        raise SlimshipError(f"{option} {path}: its folder {path.parent} {what}; create the folder first")


def check_output_dir(path: Path, option: str) -> None:
    """Refuse an output folder path that is an existing file (or lies below one)."""
    from slimship._util import file_in_the_way

    blocker = file_in_the_way(path)
    if blocker is not None:
        raise SlimshipError(f"{option} {path}: {blocker} is a file, not a folder; give a folder path")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    if not args.verbose:  # library chatter (exporter registrations, pytree notices) is not for users
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        for name in ("torch", "onnxscript", "torch.onnx", "absl"):
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        return args.fn(args)
    except GateError as exc:
        print(f"slimship: gate failed: {exc}", file=sys.stderr)
        return 3
    except SlimshipError as exc:
        print(f"slimship: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slimship: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: say so, and show the traceback with -v
        if args.verbose:
            traceback.print_exc(file=sys.stderr)
        hint = "" if args.verbose else " (run with -v for the traceback; please report)"
        print(f"slimship: internal error: {type(exc).__name__}: {exc}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
