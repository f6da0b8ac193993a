"""The one place slimship opens a torch.export program (.pt2): safe by default.

`torch.export.load` unpickles members of the archive (sample inputs, some weights, custom objects) and
hands strings from the graph JSON to `sympy.sympify` (which evaluates them) and to generated Python code.
`load_program(path)` therefore reads the zip itself, within bounds, and by default:

- never unpickles: weights and constants are built from their raw bytes; a member that needs pickle is
  refused (`PickleRequiredError`) with the way to opt in (`--allow-pickle` / `model.allow_pickle: true`);
- checks every string that torch would evaluate or put into code before deserializing: symbolic shape
  expressions (a small grammar), operator targets (ATen/prims/higher-order ops and the symbolic-int
  helpers), names and state-dict keys (identifiers), guard code; node stack traces and free-form
  annotations are dropped;
- synthesizes example inputs from the graph's input metadata (dynamic dims at their hint, integer inputs
  that index an embedding below its size, never batch 0) instead of reading the pickled sample inputs.

With `allow_pickle=True` it uses torch's own loader (stored sample inputs; may run code from the file).
"""

from __future__ import annotations

import json
import logging
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from slimship.budget import check_tensor
from slimship.errors import ModelFileError
from slimship.pt2_budget import check_declared_values, check_node_outputs
from slimship.pt2_checks import (
    FQN,
    OPT_IN,
    PickleRequiredError,
    check_graph_json,
    check_node_count,
    check_sample_inputs,
    drop_free_text,
    parse_json,
)

log = logging.getLogger(__name__)

MAX_MEMBERS = 65_536
MAX_TOTAL_BYTES = 16 << 30
INFLATION = 4  # torch.export.save stores members; declared sizes past 4x the file (+64 MiB) are a bomb
MAX_JSON_BYTES = 256 << 20

_ARCHIVE_FORMAT, _ARCHIVE_VERSION = "archive_format", "archive_version"
_MODEL_JSON = "models/model.json"
_WEIGHTS_DIR, _CONSTANTS_DIR = "data/weights/", "data/constants/"
_WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
_CONSTANTS_CONFIG = "data/constants/model_constants_config.json"
_TENSOR_PREFIX = "tensor_"
_MEMBER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")


@dataclass
class InputSpec:
    """One positional tensor input of a program: its name, dtype, example shape and dynamic dims."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    dynamic: dict[int, dict[str, Any]] = field(default_factory=dict)  # dim -> {symbol, min, max}


@dataclass
class LoadedProgram:
    """A .pt2 opened by `load_program`."""

    path: Path
    program: torch.export.ExportedProgram
    module: torch.nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    inputs: list[InputSpec]
    examples: str  # "stored" (the file's pickled sample inputs) or "synthesized" (from graph metadata)
    pickle_allowed: bool = False

    @property
    def has_dynamic_dims(self) -> bool:
        return any(spec.dynamic for spec in self.inputs)

    def dynamic_shapes(self) -> tuple[dict[int, Any], ...] | None:
        """`dynamic_shapes` for re-exporting with the same dynamic dims (one Dim per symbol, same range)."""
        if not self.has_dynamic_dims:
            return None
        dims: dict[str, Any] = {}
        shapes = []
        for spec in self.inputs:
            entry = {}
            for axis, info in spec.dynamic.items():
                symbol = info["symbol"]
                if symbol not in dims:
                    kwargs = {"min": info["min"]}
                    if info["max"] is not None:
                        kwargs["max"] = info["max"]
                    dims[symbol] = torch.export.Dim(f"{spec.name}_{axis}_{symbol}", **kwargs)
                entry[axis] = dims[symbol]
            shapes.append(entry)
        return tuple(shapes)


# ------------------------------------------------------------------------------------------ public API


def load_program(path: str | Path, *, allow_pickle: bool = False) -> LoadedProgram:
    """Open a .pt2 safely (see the module doc); ModelFileError naming the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    if allow_pickle:
        program = _load_with_torch(path)
        stored = program.example_inputs
        example = tuple(stored[0]) if stored and stored[0] else None
        source = "stored"
    else:
        members = read_archive(path)
        program = _deserialize(path, members)
        example, source = None, "synthesized"
    inputs = input_specs(program)
    module = program.module()
    if example is None:
        for spec in inputs:
            check_tensor(str(path), f"input {spec.name!r} ({spec.dtype})", spec.shape, spec.dtype.itemsize)
        check_node_outputs(module, [(spec.shape, spec.dtype) for spec in inputs], str(path))
        example = synthesize_inputs(program, inputs)
    check_example(example, str(path))
    return LoadedProgram(path, program, module, tuple(example), inputs, source, allow_pickle)


def check_example(example: tuple[Any, ...], where: str) -> None:
    """Refuse example inputs with batch 0: every export would be fixed to an empty batch."""
    for i, value in enumerate(example):
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == 0:
            raise ModelFileError(
                f"{where}: example input {i} has batch 0 (shape {list(value.shape)}); exports would be "
                "fixed to an empty batch: give an example with at least one sample (e.g. --input-shape)"
            )


def _load_with_torch(path: Path) -> torch.export.ExportedProgram:
    """torch's own loader (unpickles). Its 'fallback to weights_only=False' log record has a broken format
    string, so it is replaced by our own warning that says which file was unpickled."""
    serde_log = logging.getLogger("torch._export.serde.serialize")
    fallback = _FallbackNotice()
    serde_log.addFilter(fallback)
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise ModelFileError(f"{path}: not a readable torch.export program (.pt2): {_cause(exc)}") from None
    finally:
        serde_log.removeFilter(fallback)
    if fallback.seen:
        log.warning("%s: parts of the file were unpickled with weights_only=False (--allow-pickle)", path)
    return program


class _FallbackNotice(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Fallback to weights_only=False"):
            self.seen = True
            return False
        return True


def _cause(exc: BaseException) -> str:
    """The message of an error and of the error it was raised from."""
    text = f"{type(exc).__name__}: {str(exc)[:300]}"
    if exc.__cause__ is not None:
        text += f" (caused by {type(exc.__cause__).__name__}: {str(exc.__cause__)[:300]})"
    return text


# ------------------------------------------------------------------------------------------ archive


def read_archive(path: Path) -> dict[str, bytes]:
    """Members of a .pt2 zip by name below its root folder, read within bounds."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            root = _check_layout(path, infos)
            return {info.filename[len(root) :]: _read_member(path, archive, info) for info in infos
                    if not info.is_dir()}  # fmt: skip
    except ModelFileError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError) as exc:
        raise ModelFileError(
            f"{path}: not a readable torch.export program (.pt2): corrupt or truncated zip ({exc})"
        ) from None


def _check_layout(path: Path, infos: list[zipfile.ZipInfo]) -> str:
    if not infos or len(infos) > MAX_MEMBERS:
        raise ModelFileError(f"{path}: not a readable torch.export program (.pt2): {len(infos)} members")
    total = sum(info.file_size for info in infos)
    bound = min(MAX_TOTAL_BYTES, INFLATION * path.stat().st_size + (64 << 20))
    if total > bound:
        raise ModelFileError(
            f"{path}: declares {total} uncompressed bytes, over the {bound} limit (a .pt2 stores its members "
            f"uncompressed; this one would inflate {total / max(path.stat().st_size, 1):.0f}x)"
        )
    names = [info.filename for info in infos]
    if len(set(names)) != len(names):
        raise ModelFileError(f"{path}: the archive has duplicate member names")
    roots = set()
    for name in names:
        parts = PurePosixPath(name).parts
        if name.startswith("/") or "\\" in name or ".." in parts or len(parts) < 2:
            raise ModelFileError(f"{path}: unsafe or unexpected archive member {name!r}")
        roots.add(parts[0])
    if len(roots) != 1:
        raise ModelFileError(f"{path}: expected one root folder in the archive, found {sorted(roots)}")
    return f"{roots.pop()}/"


def _read_member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise ModelFileError(f"{path}: member {info.filename!r} uses an unsupported compression")
    chunks, size = [], 0
    with archive.open(info) as stream:
        while block := stream.read(min(1 << 20, info.file_size + 1 - size)):
            size += len(block)
            if size > info.file_size:
                raise ModelFileError(f"{path}: member {info.filename!r} is larger than its declared size")
            chunks.append(block)
    if size != info.file_size:
        raise ModelFileError(
            f"{path}: member {info.filename!r} is truncated ({size} of {info.file_size} bytes)"
        )
    return b"".join(chunks)


def _json_member(path: Path, members: dict[str, bytes], name: str) -> Any:
    if name not in members:
        raise ModelFileError(f"{path}: not a readable torch.export program (.pt2): no member {name!r}")
    data = members[name]
    if len(data) > MAX_JSON_BYTES:
        raise ModelFileError(f"{path}: member {name!r} is over {MAX_JSON_BYTES} bytes")
    if name == _MODEL_JSON:  # the graph: its size is bounded before parsing; a duplicate key hides nothing
        check_node_count(data, f"{path}: {_MODEL_JSON}")
        return parse_json(data, f"{path}: member {name!r}", unique_keys=False)
    return parse_json(data, f"{path}: member {name!r}")


# ------------------------------------------------------------------------------------------ tensors


def require_no_pickle(path: Path, members: dict[str, bytes]) -> None:
    """PickleRequiredError if rebuilding the program needs unpickling (the sample inputs are never read)."""
    if "serialized_exported_program.json" in members or "data/weights/model.pt" in members:
        raise PickleRequiredError(f"{path}: an old-format .pt2 stores its weights as a pickle; {OPT_IN}")
    for directory, name in ((_WEIGHTS_DIR, _WEIGHTS_CONFIG), (_CONSTANTS_DIR, _CONSTANTS_CONFIG)):
        config = _json_member(path, members, name).get("config", {}) if name in members else {}
        for fqn, meta in config.items():
            path_name = str(meta.get("path_name", ""))
            if not _MEMBER_NAME.fullmatch(path_name):
                raise ModelFileError(
                    f"{path}: {name} ({str(fqn)[:80]}): refusing path {path_name[:80]!r}: not a plain member "
                    f"name inside the archive's {directory} folder"
                )
            if meta.get("use_pickle") or not path_name.startswith(("weight_", _TENSOR_PREFIX)):
                raise PickleRequiredError(
                    f"{path}: member {directory + path_name!r} ({fqn}) is stored as a pickle (a tensor "
                    f"subclass or custom object), and unpickling can run code from the file; it was not "
                    f"loaded: {OPT_IN}"
                )


def _payload(path: Path, members: dict[str, bytes], directory: str, config_name: str) -> dict[str, Any]:
    """Tensors of a weights/constants config, built from raw bytes; pickled entries are refused."""
    from torch._export.serde.schema import ScalarType
    from torch._export.serde.serialize import deserialize_scalar_type

    config = _json_member(path, members, config_name).get("config", {})
    tensors = {}
    for fqn, meta in config.items():
        member = f"{directory}{meta.get('path_name', '')}"
        where = f"{path}: member {member!r} ({fqn})"
        if not FQN.match(fqn):
            raise ModelFileError(f"{where}: refusing state-dict key {fqn[:80]!r}: not a plain name")
        info = meta.get("tensor_meta") or {}
        try:
            dtype = deserialize_scalar_type(ScalarType(info["dtype"]))
            sizes = [int(s["as_int"]) for s in info["sizes"]]
            strides = [int(s["as_int"]) for s in info["strides"]]
            offset = int(info["storage_offset"]["as_int"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"{where}: invalid tensor metadata ({exc!r})") from None
        if member not in members:
            raise ModelFileError(f"{where}: the member is missing from the archive")
        tensor = _strided(members[member], dtype, sizes, strides, offset, where)
        if meta.get("is_param"):
            tensor = torch.nn.Parameter(tensor, requires_grad=bool(info.get("requires_grad")))
        tensors[fqn] = tensor
    return tensors


def _strided(
    data: bytes, dtype: torch.dtype, sizes: list[int], strides: list[int], offset: int, where: str
) -> torch.Tensor:
    element = torch.empty((), dtype=dtype).element_size()
    if len(data) % element:
        raise ModelFileError(f"{where}: {len(data)} bytes is not a multiple of {dtype}'s {element}-byte size")
    numel = len(data) // element
    if any(s < 0 for s in sizes) or any(s < 0 for s in strides) or offset < 0:
        raise ModelFileError(f"{where}: negative size, stride or offset")
    if len(sizes) != len(strides):
        raise ModelFileError(f"{where}: {len(sizes)} sizes but {len(strides)} strides")
    if any(n > 1 and s == 0 for n, s in zip(sizes, strides)):
        raise ModelFileError(
            f"{where}: refusing sizes {sizes} with strides {strides}: a stride of 0 repeats its storage, "
            "which torch.export does not write for a weight"
        )
    check_tensor(where, f"weight ({dtype})", sizes, element)
    extent = offset + sum((n - 1) * s for n, s in zip(sizes, strides)) + 1 if all(sizes) else 0
    if extent > numel:
        raise ModelFileError(f"{where}: the tensor reaches element {extent} of a {numel}-element storage")
    if numel == 0:
        return torch.zeros(sizes, dtype=dtype)
    flat = torch.frombuffer(bytearray(data), dtype=dtype)
    return torch.as_strided(flat, sizes, strides, offset)


# ------------------------------------------------------------------------------------------ program


def _deserialize(path: Path, members: dict[str, bytes]) -> torch.export.ExportedProgram:
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    require_no_pickle(path, members)
    check_sample_inputs(path, members)
    if members.get(_ARCHIVE_FORMAT, b"").strip() != b"pt2" or _MODEL_JSON not in members:
        raise ModelFileError(f"{path}: not a readable torch.export program (.pt2): no {_MODEL_JSON}")
    version = members.get(_ARCHIVE_VERSION, b"").strip().decode("ascii", "replace")
    if version != "0":
        raise ModelFileError(f"{path}: .pt2 archive version {version[:20]!r} is not supported (expected '0')")
    doc = _json_member(path, members, _MODEL_JSON)
    if not isinstance(doc, dict) or "graph_module" not in doc:
        raise ModelFileError(f"{path}: {_MODEL_JSON} is not a serialized ExportedProgram")
    where = f"{path}: {_MODEL_JSON}"
    check_graph_json(doc, where)
    check_declared_values(doc, where)
    drop_free_text(doc, where)
    fallback_unknown_pytree_types(doc, where)
    state_dict = _payload(path, members, _WEIGHTS_DIR, _WEIGHTS_CONFIG)
    constants = _payload(path, members, _CONSTANTS_DIR, _CONSTANTS_CONFIG)
    try:
        serialized = _dict_to_dataclass(schema.ExportedProgram, doc)
        return ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, None)
    except ModelFileError:
        raise
    except Exception as exc:
        raise ModelFileError(f"{where}: could not rebuild the program: {_cause(exc)}") from None


def fallback_unknown_pytree_types(doc: dict[str, Any], where: str = "model.json") -> list[str]:
    """Output/input containers of unregistered pytree types (e.g. a transformers ModelOutput) become dicts.

    Only nodes whose context is a JSON list of string keys (as dict-like containers store it) are
    rewritten; anything else is left for the deserializer to report. The specs are JSON inside JSON,
    parsed within the same bounds (ModelFileError naming `where` and the spec). Returns the types replaced.
    """
    from torch.utils._pytree import SERIALIZED_TYPE_TO_PYTHON_TYPE

    replaced: list[str] = []

    def fix(node: Any) -> None:
        if not isinstance(node, dict):
            return
        kind = node.get("type")
        if kind is not None and kind not in SERIALIZED_TYPE_TO_PYTHON_TYPE:
            try:
                keys = json.loads(node.get("context") or "null")
            except ValueError:
                keys = None
            except RecursionError:
                raise ModelFileError(f"{where}: a pytree context nests deeper than can be parsed") from None
            if isinstance(keys, list) and all(isinstance(k, str) for k in keys):
                replaced.append(kind)
                node["type"] = "builtins.dict"
        for child in node.get("children_spec") or []:
            fix(child)

    for entry in doc["graph_module"].get("module_call_graph") or []:
        signature = entry.get("signature") or {}
        for key in ("in_spec", "out_spec"):
            if isinstance(signature.get(key), str):
                spec = parse_json(signature[key].encode(), f"{where}: {key}", unique_keys=False)
                if isinstance(spec, list) and len(spec) == 2:
                    fix(spec[1])
                    signature[key] = json.dumps(spec)
    return replaced


# ------------------------------------------------------------------------------------------ inputs


def input_specs(program: torch.export.ExportedProgram) -> list[InputSpec]:
    """The program's positional tensor inputs with their dynamic dims (symbol, range)."""
    names = set(program.graph_signature.user_inputs)
    specs = []
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in names:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        shape, dynamic = [], {}
        for axis, dim in enumerate(val.shape):
            if isinstance(dim, torch.SymInt):
                info = _dim_info(program, dim)
                dynamic[axis] = info
                shape.append(info["example"])
            else:
                shape.append(int(dim))
        specs.append(InputSpec(node.name, val.dtype, tuple(shape), dynamic))
    return specs


def _dim_info(program: torch.export.ExportedProgram, dim: torch.SymInt) -> dict[str, Any]:
    expr = dim.node.expr
    ranges = program.range_constraints.get(expr)
    low = (_finite_int(ranges.lower) if ranges is not None else None) or 0
    high = _finite_int(ranges.upper) if ranges is not None else None
    hint = dim.node.hint
    example = int(hint) if hint is not None else max(low, 2)
    example = max(example, low, 1)
    if high is not None:
        example = min(example, high)
    return {"symbol": str(expr), "min": low, "max": high, "example": example}


def _finite_int(value: Any) -> int | None:
    """An integer bound, or None for an infinite one (sympy oo / torch int_oo)."""
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None


_PASS_THROUGH = frozenset(
    "view reshape flatten unsqueeze squeeze clone contiguous _to_copy to expand slice select permute "
    "transpose".split()
)


def _embedding_limit(node: torch.fx.Node, depth: int = 6) -> int | None:
    """The smallest num_embeddings of an embedding this (integer) node indexes, through view-like ops."""
    limits = []
    for user in node.users:
        name = getattr(user.target, "__name__", "").split(".")[0]
        if name == "embedding" and len(user.args) > 1 and user.args[1] is node:
            weight = user.args[0].meta.get("val") if isinstance(user.args[0], torch.fx.Node) else None
            if weight is not None:
                limits.append(int(weight.shape[0]))
        elif name in _PASS_THROUGH and depth:
            limit = _embedding_limit(user, depth - 1)
            if limit is not None:
                limits.append(limit)
    return min(limits) if limits else None


def synthesize_inputs(
    program: torch.export.ExportedProgram, specs: list[InputSpec], seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Example inputs from graph metadata: floats ~ N(0, 1), integers below any embedding's size."""
    gen = torch.Generator().manual_seed(seed)
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    result = []
    for spec in specs:
        if spec.dtype.is_floating_point or spec.dtype.is_complex:
            result.append(torch.randn(spec.shape, generator=gen).to(spec.dtype))
        elif spec.dtype == torch.bool:
            result.append(torch.randint(0, 2, spec.shape, generator=gen).bool())
        else:
            high = _embedding_limit(placeholders[spec.name]) or 2
            result.append(torch.randint(0, high, spec.shape, generator=gen, dtype=spec.dtype))
    return tuple(result)
