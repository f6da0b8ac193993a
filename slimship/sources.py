""" "Get me a model and its example inputs from what the user gave": one helper every command uses.

A model is given as a torch.export program (`MODEL.pt2`, opened by the safe loader), as a Hugging Face
checkpoint folder (config.json + safetensors; `--input-shape TOKENS` sets the example's sequence length),
or as a factory (`--model package.module:function`, which returns an nn.Module, with `--input-shape`),
optionally with weights (`--weights FILE`: a state_dict in .safetensors, or a .pt read with
`torch.load(weights_only=True)`).
Deployment files (.onnx, .tflite, .pte) give their input names, shapes and dtypes through `input_specs`.
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimship.errors import ConfigError, ModelFileError, first_line
from slimship.exporters.common import TensorSpec
from slimship.inputs import check_declared_inputs, check_feedable

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


@dataclass
class ModelSource:
    """A model ready for slimming or export: the module, its example inputs and where it came from."""

    module: Any  # torch.nn.Module
    example: tuple[Any, ...]
    origin: str  # the .pt2 path, or 'package.module:function' (+ ' + WEIGHTS')
    stem: str  # a name for output files
    sha256: str  # of the .pt2, or of the weights file, or of the factory spec
    dynamic_shapes: Any = None  # the source program's dynamic dims (re-export keeps them)
    kind: str = "pt2"  # "pt2", "folder" or "factory" (a module in eager mode: any batch traces)
    notes: list[str] = field(default_factory=list)
    checkpoint: Any = None  # the slimship.hf.CheckpointFolder of a "folder" source


# ------------------------------------------------------------------------------------------ arguments


def add_model_arguments(parser: argparse.ArgumentParser, what: str = "the model") -> None:
    """The model options every model-taking command shares (a .pt2, or a factory with weights)."""
    parser.add_argument(
        "model",
        type=Path,
        nargs="?",
        default=None,
        help=f"{what}: a torch.export program (.pt2) or a Hugging Face checkpoint folder; or use --model",
    )
    group = parser.add_argument_group("model given as Python code instead of a .pt2")
    group.add_argument(
        "--model",
        dest="factory",
        default=None,
        metavar="MODULE:FUNCTION",
        help="a function returning an nn.Module, e.g. torchvision.models:resnet18 (needs --input-shape)",
    )
    group.add_argument(
        "--weights",
        type=Path,
        default=None,
        metavar="FILE",
        help="a state_dict for --model: .safetensors, or .pt/.pth read with torch.load(weights_only=True)",
    )
    parser.add_argument(
        "--input-shape",
        type=int,
        nargs="+",
        default=None,
        metavar="DIM",
        help="shape of the (first) input without the batch dim, e.g. 3 224 224; "
        "overrides the shape read from the file",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="let the .pt2 unpickle its stored parts (can run code from the file: trusted files only)",
    )


def model_from_args(args: argparse.Namespace) -> ModelSource:
    """The model named by `add_model_arguments` options; ConfigError when both or neither is given."""
    factory, path = getattr(args, "factory", None), getattr(args, "model", None)
    if factory and path:
        raise ConfigError(f"give either a .pt2 ({path}) or --model {factory}, not both")
    if factory:
        return from_factory(factory, args.input_shape, getattr(args, "weights", None))
    if path is None:
        raise ConfigError(
            "no model given: pass a .pt2 file, or --model package.module:function --input-shape"
        )
    if getattr(args, "weights", None):
        raise ConfigError(f"--weights {args.weights} applies to --model FACTORY, not to a .pt2 ({path})")
    if Path(path).is_dir():
        return from_folder(path, args.input_shape, allow_pickle=args.allow_pickle)
    return from_program(path, args.input_shape, allow_pickle=args.allow_pickle)


# ------------------------------------------------------------------------------------------ sources


def from_program(path: Path, input_shape: list[int] | None, *, allow_pickle: bool = False) -> ModelSource:
    """A .pt2 opened by the safe loader; `input_shape` replaces the first input (batch of the example)."""
    import torch

    from slimship._util import sha256_file
    from slimship.loading import check_example, load_program

    loaded = load_program(Path(path), allow_pickle=allow_pickle)
    example, notes = loaded.example_inputs, []
    if input_shape:
        batch = max(int(example[0].shape[0]), 1) if example and example[0].dim() else 1
        example = (torch.randn(batch, *input_shape), *example[1:])
    elif loaded.examples == "synthesized":
        shapes = ", ".join(
            f"{s.name} {list(t.shape)} {str(t.dtype).removeprefix('torch.')}"
            for s, t in zip(loaded.inputs, example, strict=False)
        )
        notes.append(f"example inputs from the graph's input metadata: {shapes}")
    check_example(example, str(path))
    stem = Path(path).stem
    return ModelSource(
        loaded.module, tuple(example), str(path), stem, sha256_file(path),
        dynamic_shapes=loaded.dynamic_shapes(), notes=notes,
    )  # fmt: skip


def from_folder(path: Path, input_shape: list[int] | None, *, allow_pickle: bool = False) -> ModelSource:
    """A Hugging Face checkpoint folder, loaded by `slimship.hf` and seen as token ids -> logits (no KV
    cache); `input_shape` is [TOKENS], the example's sequence length."""
    from slimship.hf import (
        DEFAULT_TOKENS,
        LogitsOnly,
        example_ids,
        folder_digest,
        load_checkpoint,
        read_folder,
    )

    if input_shape and len(input_shape) != 1:
        raise ConfigError(f"--input-shape {input_shape}: a checkpoint folder takes one number, the tokens")
    tokens = input_shape[0] if input_shape else DEFAULT_TOKENS
    ckpt = read_folder(path, allow_pickle=allow_pickle)
    model = load_checkpoint(ckpt)
    notes = [f"example inputs: {tokens} random token ids (input_ids [1, {tokens}]; --input-shape TOKENS)"]
    return ModelSource(
        LogitsOnly(model), (example_ids(model.config, tokens),), str(path), Path(path).resolve().name,
        folder_digest(ckpt), kind="folder", notes=notes, checkpoint=ckpt,
    )  # fmt: skip


def from_factory(spec: str, input_shape: list[int] | None, weights: Path | None = None) -> ModelSource:
    """A module built by 'package.module:function' (weights applied), with a random batch-1 example."""
    import torch

    from slimship._util import sha256_file
    from slimship.pipeline.config import resolve

    if ":" not in spec:
        raise ConfigError(f"--model {spec!r}: expected 'package.module:function'")
    if not input_shape:
        raise ConfigError(f"--model {spec}: give --input-shape (without the batch dim), e.g. 3 224 224")
    fn = resolve(spec, "--model")
    try:
        module = fn()
    except Exception as exc:
        raise ConfigError(f"--model {spec}: calling it failed ({type(exc).__name__}: {exc})") from exc
    if not isinstance(module, torch.nn.Module):
        raise ConfigError(f"--model {spec}: returned {type(module).__name__}, not a torch.nn.Module")
    origin, digest = spec, hashlib.sha256(spec.encode()).hexdigest()
    if weights is not None:
        apply_weights(module, weights)
        origin, digest = f"{spec} + {weights}", sha256_file(weights)
    module.eval()
    example = (torch.randn(1, *input_shape, generator=torch.Generator().manual_seed(0)),)
    return ModelSource(module, example, origin, spec.rpartition(":")[2] or "model", digest, kind="factory")


def load_weights(path: Path) -> dict[str, Any]:
    """A state_dict from .safetensors or a weights-only torch.load; ModelFileError naming the file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"--weights {path}: no such file")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ModelFileError(f"--weights {path}: expected one of {', '.join(WEIGHT_SUFFIXES)}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelFileError(
            f"--weights {path}: not a readable state_dict ({type(exc).__name__}: {str(exc)[:300]}); "
            "save it with safetensors.torch.save_file or torch.save(model.state_dict(), path)"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a common checkpoint layout
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(
            f"--weights {path}: holds a {type(state).__name__}, not a name -> tensor state_dict"
        )
    return state


def apply_weights(module: Any, path: Path) -> None:
    """Load the state_dict at `path` into `module` (strict); ConfigError lists missing/unexpected keys."""
    state = load_weights(path)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConfigError(
            f"--weights {path}: does not fit the model: {first_line(exc, 200)} "
            f"{_key_mismatch(module.state_dict(), state)}"
        ) from None


def _key_mismatch(expected: dict[str, Any], given: dict[str, Any]) -> str:
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    parts = [
        f"missing {missing[:5]}" if missing else "",
        f"unexpected {unexpected[:5]}" if unexpected else "",
    ]
    return "; ".join(p for p in parts if p)


# ------------------------------------------------------------------------------------------ file inputs


def input_specs(path: str | Path) -> list[TensorSpec]:
    """Input names, shapes (a string for a dynamic dim) and dtypes of a .pt2, .onnx, .tflite or .pte."""
    p = Path(path)
    if p.is_dir():  # a checkpoint folder: token ids, as `from_folder` gives them
        from slimship.hf import DEFAULT_TOKENS

        return [TensorSpec("input_ids", [1, DEFAULT_TOKENS], "int64")]
    if p.suffix == ".pt2":
        from slimship.loading import load_program

        loaded = load_program(p)
        return [
            TensorSpec(
                s.name,
                [f"{s.name}_{a}" if a in s.dynamic else d for a, d in enumerate(s.shape)],
                str(s.dtype).removeprefix("torch."),
            )
            for s in loaded.inputs
        ]
    from slimship.inputs import model_input_specs

    return model_input_specs(p)


#: the format a checkpoint folder given to `bench` as a model to measure is exported to (a dense folder
#: is exported to each measured file's format instead, like a dense .pt2)
BENCH_FOLDER_FORMAT = "onnx"


def bench_files(
    models: list[Path], dense: Path | None, folder: Path
) -> tuple[list[Path], Path | None, list[str]]:
    """`bench`'s models with checkpoint folders made files in `folder`: the dense folder becomes its logits
    program (.pt2, which bench exports into each model's format), another folder an ONNX file (parity
    checked by the exporter). Returns (models, dense, notes)."""
    import torch

    from slimship.exporters.registry import ExportRequest, get_format

    made: dict[Path, Path] = {}
    notes = []
    for path in dict.fromkeys(Path(m) for m in models):
        if not path.is_dir():
            continue
        source = from_folder(path, None)
        name = f"{source.stem}-{len(made)}"
        if path == dense:
            target = folder / f"{name}.pt2"
            try:
                program = torch.export.export(source.module, source.example, strict=False)
            except Exception as exc:
                raise ModelFileError(
                    f"{path}: torch.export of its logits failed ({first_line(exc)})"
                ) from exc
            torch.export.save(program, str(target))
            notes.append(
                f"{path}: the dense model, as its logits program {target.name} (exported per format)"
            )
        else:
            record = get_format(BENCH_FOLDER_FORMAT)
            request = ExportRequest(source.module, source.example, source.example, dynamic_batch=False)
            target = Path(record.export(request, folder / record.file_name(name)).path)
            notes.append(f"{path}: measured as {record.name} (exported to {target.name}, parity checked)")
        made[path] = target
    files = [made.get(Path(m), Path(m)) for m in models]
    return files, (made.get(dense, dense) if dense is not None else None), notes


def random_inputs(
    specs: list[TensorSpec], input_shape: list[int] | None = None, seed: int = 0
) -> tuple[list[np.ndarray], list[str]]:
    """Random arrays for `specs` (`input_shape` replaces the first input's shape after the batch dim);
    dynamic dims become 1, each with a note. Floats ~ N(0, 1); integers 0 or 1 (valid token ids); a
    quantised integer input (full-int8 .tflite) uniform floats over the range its scale and zero point
    represent (the runner quantises them)."""
    rng, arrays, notes, shapes = np.random.default_rng(seed), [], [], []
    for i, spec in enumerate(specs):
        shape = list(spec.shape)
        if i == 0 and input_shape:
            shape = [shape[0] if shape else 1, *input_shape]
        for axis, dim in enumerate(shape):
            if not isinstance(dim, int) or dim < 1:
                what = "batch" if axis == 0 else f"dim {axis}"
                notes.append(
                    f"input {spec.name!r} {what} is dynamic ({dim}); using 1 (--input-shape overrides)"
                )
                shape[axis] = 1
        shapes.append(shape)
    check_feedable("random inputs", specs)
    check_declared_inputs("random inputs", [TensorSpec(s.name, d, s.dtype) for s, d in zip(specs, shapes)])
    for spec, shape in zip(specs, shapes):
        dtype = np.dtype(spec.dtype)
        quantised = spec.float_range() if hasattr(spec, "float_range") else None
        if quantised is not None:  # a full-int8 input: floats over its range (quantised when fed)
            arrays.append(rng.uniform(*quantised, shape).astype(np.float32))
        elif dtype in (np.float32, np.float64):  # drawn in the input's dtype: no float64 copy of float32
            arrays.append(rng.standard_normal(shape, dtype=dtype))
        elif np.issubdtype(dtype, np.floating):
            arrays.append(rng.standard_normal(shape).astype(dtype))
        elif dtype == np.bool_:
            arrays.append(rng.integers(0, 2, shape).astype(bool))
        else:
            arrays.append(rng.integers(0, 2, shape).astype(dtype))
    return arrays, notes


def output_names(module: Any, example: tuple[Any, ...]) -> list[str] | None:
    """Names of the model's flattened outputs from their structure (`logits`, `hidden_states.0`), or
    None when the outputs are a plain tensor or tuple (exporters then number them)."""
    import torch
    from torch.utils import _pytree as pytree

    with torch.no_grad():
        outputs = module(*example)
    leaves, _ = pytree.tree_flatten_with_path(outputs)
    names = [".".join(_key_name(k) for k in path) for path, _ in leaves]
    if not names or not any(
        isinstance(k, pytree.MappingKey | pytree.GetAttrKey) for p, _ in leaves for k in p
    ):
        return None
    names = [n or f"output_{i}" for i, n in enumerate(names)]
    return names if len(set(names)) == len(names) else None


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)
