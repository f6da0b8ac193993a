"""Shared pieces of the exporters: result records, parity checks, error localisation, file checks."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimship.compare import broken_reference, judge_cases
from slimship.errors import ExportError, ModelFileError
from slimship.runtimes.device_runner import RunnerLoadError, open_runner

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TensorSpec:
    """Name, shape (a string for a dynamic dimension) and dtype of one model input or output."""

    name: str
    shape: list[int | str]
    dtype: str
    #: (scale, zero point) of a quantised integer tensor (a full-int8 .tflite): float = (q - zero) * scale
    quantization: tuple[float, int] | None = None

    def float_range(self) -> tuple[float, float] | None:
        """The float values a quantised integer input represents, (lowest, highest); None otherwise."""
        if self.quantization is None:
            return None
        scale, zero = self.quantization
        info = np.iinfo(np.dtype(self.dtype))
        return (info.min - zero) * scale, (info.max - zero) * scale


@dataclasses.dataclass
class ParityReport:
    """How far an exported model's outputs are from PyTorch's on the same inputs.

    Decided by `slimship.compare.compare`: NaN/Inf must match in place (and sign), and max|diff| over
    the finite entries <= `tolerance` (= rel_bound * max(1, max|finite reference|)); `max_rel_diff` is
    max|diff| / max(1, max|finite reference|). A non-finite mismatch makes both diffs inf.
    """

    max_abs_diff: float
    max_rel_diff: float
    tolerance: float
    rel_bound: float
    passed: bool
    cases: list[str]
    top1_agreement: float | None = None
    top1_min: float | None = None
    reason: str = ""  # why it failed (which output, what mismatch, first index); empty when it passed
    #: each case's own figures (max_abs_diff, max_rel_diff, tolerance): the verdict is per case
    per_case: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    reference_case: str | None = None  # the case on the release's reference inputs (ExportRequest.example)

    def record(self) -> dict[str, float]:
        """What a release manifest records for this file: the figures on the reference inputs it stores
        (the release's example), which `slimship verify` measures again by the same rule."""
        case = self.per_case.get(self.reference_case or "")
        if case is not None:
            return dict(case)
        keys = ("max_abs_diff", "max_rel_diff", "tolerance")
        return {k: getattr(self, k) for k in keys}


@dataclasses.dataclass
class Timings:
    """Wall-clock seconds per stage."""

    stages: dict[str, float] = dataclasses.field(default_factory=dict)

    @contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages[stage] = round(self.stages.get(stage, 0.0) + time.perf_counter() - start, 4)


# ---------------------------------------------------------------- inputs and reference outputs


def as_input_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """Example inputs as a tuple of tensors (a single tensor is accepted)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    inputs = tuple(example_inputs)
    for i, value in enumerate(inputs):
        if not isinstance(value, torch.Tensor):
            raise ExportError(
                f"example input {i} is a {type(value).__name__}, not a torch.Tensor: pass a tuple of tensors"
            )
    return inputs


def eval_mode(model: torch.nn.Module) -> torch.nn.Module:
    """`model.eval()`, tolerating modules from `torch.export(...).module()` that refuse it."""
    try:
        return model.eval()
    except NotImplementedError:  # an unlifted exported module is already in inference form
        return model


def to_numpy(inputs: Sequence[torch.Tensor]) -> list[np.ndarray]:
    return [t.detach().cpu().numpy() for t in inputs]


def torch_outputs(model: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Run the PyTorch model and flatten its outputs (tensor, tuple, dict ...) into numpy arrays."""
    with torch.no_grad():
        out = model(*inputs)
    leaves = [x for x in torch.utils._pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
    return [x.detach().cpu().numpy() for x in leaves]


def check_reference(model: Any, example: Sequence[Any], names: Sequence[str] | None = None) -> None:
    """Raise ExportError when the PyTorch model's outputs on `example` hold no finite value (every parity and
    agreement check would compare against NaN and prove nothing). A model that does not run here is left
    to the exporters, which name their own failure."""
    try:
        outputs = torch_outputs(model, example)
    except Exception:  # the exporters report a model that does not run
        return
    labels = list(names) if names and len(names) == len(outputs) else None
    broken = broken_reference(outputs, labels)
    if broken is not None:
        raise ExportError(f"PyTorch model on the example inputs: {broken}")


class Memo:
    """`fn(inputs)` computed once per input tuple (by the tensors' identity): the calibration batches are
    often the evaluation batches too, and a parity check runs both through PyTorch and the runtime."""

    def __init__(self, fn: Any) -> None:
        self.fn, self.seen = fn, {}

    def __call__(self, inputs: Sequence[torch.Tensor]) -> Any:
        key = tuple(id(t) for t in inputs)
        if key not in self.seen:
            self.seen[key] = (inputs, self.fn(inputs))  # the inputs are held, so their ids stay theirs
        return self.seen[key][1]


def random_like(
    inputs: Sequence[torch.Tensor], seed: int, batch: int | None = None
) -> tuple[torch.Tensor, ...]:
    """Random inputs with the example's dtypes and shapes (batch dimension replaced if given)."""
    gen = torch.Generator().manual_seed(seed)
    result = []
    for t in inputs:
        shape = list(t.shape)
        if batch is not None and shape:
            shape[0] = batch
        if t.dtype.is_floating_point:
            result.append(torch.randn(shape, generator=gen, dtype=torch.float32).to(t.dtype))
        elif t.dtype == torch.bool:
            result.append(torch.randint(0, 2, shape, generator=gen).bool())
        else:  # integer ids: stay within the example's range so embeddings stay in bounds
            high = int(t.max().item()) + 1 if t.numel() else 1
            result.append(torch.randint(0, max(high, 1), shape, generator=gen, dtype=t.dtype))
    return tuple(result)


def batches_as_tuples(batches: Iterable[Any] | None) -> list[tuple[torch.Tensor, ...]]:
    """Calibration / evaluation data: an iterable of tensors or tuples of tensors (labels ignored)."""
    if batches is None:
        return []
    return [as_input_tuple(b) for b in batches]


def without_shape_guards(model: torch.nn.Module) -> torch.nn.Module | None:
    """A copy of a `torch.export(...).module()` without its input-shape checks (a `_guards_fn` call in the
    graph, or the input-constraint pre-hook that `validate_inputs` switches), else None.

    Such modules guard the traced batch size; the graph itself often works for any batch (the parity
    check at another batch size proves it).
    """
    graph = getattr(model, "graph", None)
    if not isinstance(graph, torch.fx.Graph):
        return None
    guards = [
        n for n in graph.nodes if n.op == "call_module" and str(n.target) == "_guards_fn" and not n.users
    ]
    if not guards and not getattr(model, "validate_inputs", False):
        return None
    clone = copy.deepcopy(model)
    for node in [n for n in clone.graph.nodes if n.op == "call_module" and str(n.target) == "_guards_fn"]:
        clone.graph.erase_node(node)
    clone.recompile()
    if hasattr(clone, "validate_inputs"):
        clone.validate_inputs = False
    return clone


# ---------------------------------------------------------------- parity


def compare_outputs(
    reference: list[list[np.ndarray]],
    candidate: list[list[np.ndarray]],
    case_names: list[str],
    rel_bound: float,
    cap: float | None = None,
) -> ParityReport:
    """Compare per-case output lists with `slimship.compare.judge_cases` (NaN/Inf as values, each case
    relative to its own max(1, max|reference|), capped at `cap` * max|reference|: see `MAGNITUDE_CAPS`)."""
    for case, ref_outs, cand_outs in zip(case_names, reference, candidate, strict=True):
        if len(ref_outs) != len(cand_outs):
            raise ExportError(
                f"parity case {case!r}: PyTorch gives {len(ref_outs)} outputs, the exported model "
                f"{len(cand_outs)}; check output_names and the model's return value"
            )
    result, per_case = judge_cases(reference, candidate, case_names, rel_bound, cap)
    return ParityReport(
        max_abs_diff=result.max_abs_diff,
        max_rel_diff=result.max_rel_diff,
        tolerance=result.tolerance,
        rel_bound=rel_bound,
        passed=result.passed,
        cases=list(case_names),
        reason=result.reason,
        per_case={
            name: {"max_abs_diff": c.max_abs_diff, "max_rel_diff": c.max_rel_diff, "tolerance": c.tolerance}
            for name, c in per_case.items()
        },
    )


def parity_failure(kind: str, variant: str, parity: ParityReport) -> str:
    """Why a file failed its verdict, with a way out that fits the precision (no calibration advice for
    a float file: there, the converter changed the model's numbers)."""
    top1 = "" if parity.top1_agreement is None else f", top-1 agreement {parity.top1_agreement:.3f}"
    minimum = "" if parity.top1_min is None else f" (minimum {parity.top1_min})"
    why = f" ({parity.reason})" if parity.reason else ""
    if variant == "int8":
        advice = "Try int8-dynamic or fp16, or calibration data closer to the inputs it will see."
    elif variant.startswith("int8") or variant == "fp16":
        advice = "Try a higher precision (fp16 or fp32) for this model."
    else:
        advice = (
            f"A float32 file should match: the {kind} converter computes some op differently. "
            "Please report it with the model; another format may convert exactly meanwhile."
        )
    return (f"{kind} {variant} outputs differ from PyTorch: max|diff| {parity.max_abs_diff:.3g} "
            f"(tolerance {parity.tolerance:.3g}){why}{top1}{minimum}. {advice}")  # fmt: skip


def fitting_reference(
    reference: Any, inputs: tuple[torch.Tensor, ...], dynamic: bool
) -> tuple[torch.Tensor, ...] | None:
    """The release's reference inputs when the exported file takes them (same shapes, or another batch
    when its batch is dynamic), else None."""
    if reference is None:
        return None
    reference = as_input_tuple(reference)
    fits = len(reference) == len(inputs) and all(
        a.shape == b.shape or (dynamic and a.shape[1:] == b.shape[1:])
        for a, b in zip(reference, inputs, strict=True)
    )
    return reference if fits else None


def with_reference_case(
    cases: list[tuple[str, tuple[torch.Tensor, ...]]], reference: tuple[torch.Tensor, ...] | None
) -> tuple[list[tuple[str, tuple[torch.Tensor, ...]]], str | None]:
    """`cases` with the release's reference inputs among them: (cases, that case's name).

    A case holding the same tensors is reused; otherwise a case "reference" is added."""
    if reference is None:
        return cases, None
    for name, inputs in cases:
        same = len(inputs) == len(reference) and all(
            a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
            for a, b in zip(inputs, reference, strict=True)
        )
        if same:
            return cases, name
    return [*cases, ("reference", tuple(reference))], "reference"


def agreement_check(report: ParityReport, precision: str, reference, candidate) -> ParityReport:
    """The second half of a file's verdict: top-1 agreement on evaluation data >= TOP1_MINIMUMS."""
    from slimship.compare import TOP1_MINIMUMS

    report.top1_agreement = top1_agreement(reference, candidate)
    report.top1_min = TOP1_MINIMUMS[precision]
    report.passed = report.passed and report.top1_agreement >= report.top1_min
    return report


def top1_agreement(reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]]) -> float:
    """Share of rows whose argmax over the last axis of the first output agrees.

    A row holding a NaN in one model and not at the same places in the other disagrees (argmax would
    otherwise pick the NaN's index as if it were a class), and so does any row whose reference holds a NaN:
    NaN logits name no class, so two NaN rows do not agree.
    """
    agree = total = 0
    for ref_outs, cand_outs in zip(reference, candidate, strict=True):
        ref = np.asarray(ref_outs[0])
        cand = np.asarray(cand_outs[0]).reshape(ref.shape)
        ref_rows, cand_rows = ref.reshape(-1, ref.shape[-1]), cand.reshape(-1, cand.shape[-1])
        same = ref_rows.argmax(-1) == cand_rows.argmax(-1)
        if ref_rows.dtype.kind in "fc" or cand_rows.dtype.kind in "fc":
            same &= (np.isnan(ref_rows) == np.isnan(cand_rows)).all(-1) & ~np.isnan(ref_rows).any(-1)
        agree += int(same.sum())
        total += same.size
    return agree / total if total else float("nan")


# ---------------------------------------------------------------- model files


def open_model_runner(path: str | Path, runtime: str = "auto"):
    """`device_runner.open_runner`, with a load failure turned into a ModelFileError."""
    check_model_file(path)
    try:
        return open_runner(str(path), runtime=runtime)
    except RunnerLoadError as exc:
        raise ModelFileError(
            f"{path}: cannot be loaded ({exc}). The file may be corrupt or truncated: export it again."
        ) from None


def check_model_file(path: str | Path) -> None:
    """Cheap structural checks before a runtime sees the file: a non-empty file whose format's checks pass."""
    p = Path(path)
    if p.is_dir():
        raise ModelFileError(f"{p}: is a folder, not a model file")
    if not p.is_file():
        raise ModelFileError(f"{p}: no such model file")
    if p.stat().st_size == 0:
        raise ModelFileError(f"{p}: the file is empty (truncated write?); export it again")
    check = _STRUCTURE_CHECKS.get(p.suffix.lower())
    problem = check(p) if check else None
    if problem:
        raise ModelFileError(f"{p}: {problem}; the file is corrupt, truncated or of another format")


def _tflite_problem(path: Path) -> str | None:
    """A TFLite flatbuffer: a root-table offset inside the file, then the TFL3 identifier."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    if len(head) < 8 or head[4:8] != b"TFL3":
        return "not a TFLite flatbuffer (missing the TFL3 identifier)"
    if int.from_bytes(head[:4], "little") >= path.stat().st_size:
        return "a TFLite flatbuffer whose root table lies past the end of the file"
    return None


def _onnx_problem(path: Path) -> str | None:
    """An ONNX protobuf that parses (tensors in external files are not read) and has a graph with outputs."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning-like errors, ValueError ...
        return f"not a readable ONNX protobuf ({type(exc).__name__}: {str(exc)[:160]})"
    if model.ir_version <= 0 or not model.opset_import or not model.graph.output:
        return "not an ONNX model (no IR version, opset or graph outputs)"
    return None


_STRUCTURE_CHECKS = {".tflite": _tflite_problem, ".onnx": _onnx_problem}


# ---------------------------------------------------------------- hashing


def module_hash(model: torch.nn.Module) -> str:
    """sha256 over the sorted state_dict (names, dtypes, shapes, bytes): identifies the source weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


# ---------------------------------------------------------------- error localisation

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _chain(exc: BaseException) -> list[BaseException]:
    chain = [exc]
    while chain[-1].__cause__ is not None and len(chain) < 20:
        chain.append(chain[-1].__cause__)
    return chain


def _op_names(node: torch.fx.Node) -> tuple[str, list[str]] | None:
    """(display name `ns::op`, spellings that may appear in an error) for a call_function node."""
    if node.op != "call_function":
        return None
    target = node.target
    qualified = target.name() if callable(getattr(target, "name", None)) else None  # ns::op[.overload]
    if not qualified:
        return None
    base = qualified.split(".")[0]
    ns, _, op = base.partition("::")
    return base, [f"{ns}.{op}", base]


def _source_line(node: torch.fx.Node) -> str | None:
    """The innermost frame of the node's stack trace outside torch / site-packages, else its module path."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    frames = [(i, ln) for i, ln in enumerate(lines) if ln.startswith("File ")]
    user = [(i, ln) for i, ln in frames if "site-packages" not in ln and "/torch/" not in ln]
    chosen = (user or frames)[-1] if (user or frames) else None
    if chosen:
        i, frame = chosen
        code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
        return f"{frame}: {code}" if code else frame
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, cls = list(stack.values())[-1]
        return f"inside module {path or '<root>'} ({getattr(cls, '__name__', cls)})"
    return None


def locate_failure(
    exc: BaseException, graph_module: torch.fx.GraphModule | None
) -> tuple[str | None, str | None, str | None]:
    """(op, fx node name, source line) for an export failure, where they can be found.

    Ops are looked up among the graph's own nodes (deepest exception in the chain first), so only an
    op that is really in the model is named.
    """
    texts = [_ANSI.sub("", str(e)) for e in reversed(_chain(exc))]
    node_hint = next(
        (m.group(1) for t in texts for m in [re.search(r"translating node %(\w+)", t)] if m), None
    )
    if graph_module is None:
        return None, node_hint, None
    nodes = list(graph_module.graph.nodes)
    if node_hint:
        for node in nodes:
            names = _op_names(node)
            if node.name == node_hint and names:
                return names[0], node.name, _source_line(node)
    for text in texts:
        for node in nodes:
            names = _op_names(node)
            if names and any(re.search(rf"(?<![\w.:]){re.escape(n)}\b", text) for n in names[1]):
                return names[0], node.name, _source_line(node)
    return None, node_hint, None


def export_error(
    stage: str, exc: BaseException, graph_module: torch.fx.GraphModule | None, way_out: str
) -> ExportError:
    """An ExportError naming the op, graph node and source line where known, with a way out."""
    op, node, line = locate_failure(exc, graph_module)
    root = _chain(exc)[-1]
    first = next((ln for ln in _ANSI.sub("", str(root)).strip().splitlines() if ln.strip()), "")
    where = []
    if op:
        where.append(f"op {op}")
    if node:
        where.append(f"graph node {node!r}")
    if line:
        where.append(f"source {line}")
    location = f" at {', '.join(where)}" if where else ""
    return ExportError(f"{stage} failed{location}: {type(root).__name__}: {first[:400]}. {way_out}")


def nbytes_and_hash(path: Path) -> tuple[int, str]:
    from slimship._util import sha256_file

    return path.stat().st_size, sha256_file(path)
