"""Release bundles: a slim model with its exports, manifest, model card and report, written safely.

`write_release(inputs, out_dir)` produces, side by side in `out_dir`:

    NAME-VERSION/                 the bundle directory
        manifest.json             schema: slimship/pipeline/manifest.schema.json (see manifest.py)
        MODEL_CARD.md             what a person deploying the model needs
        report.html               self-contained page with plots
        model.pt2                 torch.export program of the slim model (role "pt2")
        model.safetensors         its state_dict, keys unchanged (role "safetensors")
        reference_io.npz          stored inputs in0.. and slim PyTorch outputs out0.. (role "reference-io")
        model.onnx, model.fp32.tflite, model.int8.tflite, model.fp32.pte, ...
                                  each given model file, named by `FormatRecord.file_name("model")` when its
                                  role is a registered format, else `model.ROLE.EXT` (an ONNX model with
                                  external data is stored with its tensors inlined)

Every file sits at the top of the bundle (no sub-folders). Files get the mode a plain `open()` gives
(0644 under the usual umask 022), folders 0755; the tarball stores 0644/0755 whatever the umask.
    NAME-VERSION.tar.gz           the same directory as a tarball (beside it, never inside it)

Guarantees:
- Reproducible: the same inputs give byte-identical files and tarball. Nothing dated goes into the
  manifest; the .npz is written with fixed zip timestamps; the tarball has sorted entries, mtime 0,
  uid/gid 0, empty user/group names, modes 0644/0755, and a gzip header with mtime 0 and no file name.
  `torch.export.save` is deterministic for a fixed file name (its archive root is the file's stem and its
  serialization id is derived from the content), so model.pt2 always gets the same name; node metadata
  that holds object ids or source paths (`from_node` provenance, `stack_trace`) is dropped before saving.
- Safe: everything is written into a hidden temporary directory in `out_dir`, verified with
  `verify_bundle`, then renamed into place. An existing NAME-VERSION (directory or tarball) is never
  overwritten, and a failure at any point removes the temporary directory, leaving no partial bundle.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimship._util import dump_json, file_in_the_way, sha256_file, to_jsonable, write_problem
from slimship._version import __version__
from slimship.compare import REL_BOUNDS, compare, finite_scale
from slimship.errors import ReleaseError
from slimship.exporters.common import eval_mode
from slimship.pipeline import manifest as mf
from slimship.pipeline.bundle_files import (
    CARD_NAME,
    PT2_NAME,
    REFERENCE_NAME,
    REPORT_NAME,
    RESERVED_ROLES,
    RUNNABLE_FORMATS,
    WEIGHTS_NAME,
    bundle_file_names,
    flatten_outputs,
    format_of,
    normalise_modes,
    npz_bytes,
    write_tarball,
)
from slimship.pipeline.model_card import render_model_card
from slimship.pipeline.names import NAME_RE, VERSION_RE
from slimship.pipeline.records import (
    AccuracyRecord,
    CalibrationRecord,
    GateRecord,
    LatencyRecord,
    ModelReference,
    ParityRecord,
    TargetRecord,
)
from slimship.pipeline.report import render_report
from slimship.pipeline.verify import verify_bundle

log = logging.getLogger(__name__)

ROLE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

_PROTOBUF_LIMIT = 2**31 - 1
STAGING_SUFFIX = ".partial"
_STAGING_RE = re.compile(r"^\.(?P<stem>.+)\.(?P<pid>[0-9]+)\.[A-Za-z0-9_]+\.partial$")


@dataclass
class ReleaseInputs:
    """Everything a release is made from: the pipeline fills it from its stages' records
    (`slimship.pipeline.publish.release_inputs`); a library caller may fill it by hand.

    Each figure field is one manifest section (see slimship.pipeline.records for its keys and
    manifest.schema.json for every field): `reference` needs `source_sha256` (missing input and output
    specs are taken from the example tensors), `parity[role]` needs `tolerance` (the largest absolute
    difference accepted) for every .onnx/.tflite/.pte model file, `latency[target]` needs p50_ms, p90_ms,
    p99_ms and `emulated`.
    """

    name: str
    version: str
    slim_module: torch.nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    model_files: dict[str, Path]  # role (a format name, or any other) -> file
    reference: ModelReference
    slimming: dict[str, Any]  # SlimResult.summary() and per-layer channels (free-form, schema-checked)
    parity: dict[str, ParityRecord]
    accuracy: dict[str, AccuracyRecord]
    latency: dict[str, LatencyRecord]
    config: dict[str, Any]  # the config the release came from, as JSON data
    extra_plots: dict[str, Any] = field(default_factory=dict)
    model_card_notes: str = ""
    gates: list[GateRecord] | None = None  # quality gate results (slimship.pipeline.gates)
    calibration: CalibrationRecord | None = None  # what int8 files were calibrated on
    targets: dict[str, TargetRecord] | None = None  # target name -> definition (explain.target_record)


@dataclass
class ReleaseResult:
    """Where the bundle went and what it holds."""

    bundle_dir: Path
    tarball: Path
    tarball_sha256: str
    manifest: dict[str, Any]
    files: list[str]


def bundle_stem(name: str, version: str) -> str:
    return f"{name}-{version}"


def write_release(inputs: ReleaseInputs, out_dir: Path, *, verify: bool = True) -> ReleaseResult:
    """Write `out_dir/NAME-VERSION/` and `out_dir/NAME-VERSION.tar.gz`; never overwrite an existing version.

    With `verify` (default) the staged bundle is checked with `verify_bundle` before it is published.
    """
    _validate_inputs(inputs)
    return publish_bundle(
        inputs.name, inputs.version, Path(out_dir), lambda b: _write_bundle(inputs, b), verify
    )


def publish_bundle(
    name: str, version: str, out_dir: Path, write: Callable[[Path], dict[str, Any]], verify: bool = True
) -> ReleaseResult:
    """Stage, verify and publish the bundle `out_dir/NAME-VERSION` whose files `write(bundle_dir)` writes
    (returning its manifest, already written): every kind of release goes through here (see the module
    doc: staged in a hidden folder, tarball, `verify_bundle`, renamed into place, never overwriting)."""
    check_name_version(name, version)
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = bundle_stem(name, version)
    final_dir, final_tar = out_dir / stem, out_dir / f"{stem}.tar.gz"
    _refuse_existing(final_dir, final_tar)
    remove_stale_staging(out_dir)
    with _sigterm_unwinds():
        manifest = _stage_and_publish(write, out_dir, stem, final_dir, final_tar, verify)
    log.info("release %s written to %s", stem, final_dir)
    return ReleaseResult(
        bundle_dir=final_dir,
        tarball=final_tar,
        tarball_sha256=sha256_file(final_tar),
        manifest=manifest,
        files=[f["path"] for f in manifest["files"]] + [mf.MANIFEST_NAME],
    )


def _stage_and_publish(
    write: Callable[[Path], dict[str, Any]], out_dir: Path, stem: str, final_dir: Path, final_tar: Path,
    verify: bool,
) -> dict[str, Any]:  # fmt: skip
    """Write the bundle in a staging folder named after this process, verify, publish; always clean up."""
    staging = Path(tempfile.mkdtemp(prefix=f".{stem}.{os.getpid()}.", suffix=STAGING_SUFFIX, dir=out_dir))
    try:
        bundle = staging / stem
        bundle.mkdir()
        manifest = write(bundle)
        normalise_modes(bundle)
        staged_tar = staging / final_tar.name
        write_tarball(bundle, staged_tar)
        if verify:
            verify_bundle(bundle)
        _publish(bundle, staged_tar, final_dir, final_tar)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


# ------------------------------------------------------------------------------------------ leftovers


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While writing, SIGTERM raises SystemExit so `finally` blocks remove the staging folder.

    The previous handler is restored afterwards. Signal handlers can only be set in the main thread;
    elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def unwind(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def remove_stale_staging(out_dir: Path) -> list[Path]:
    """Remove `.NAME-VERSION.PID.*.partial` folders in `out_dir` whose writing process is gone.

    A staging folder of a live process (this one or another) is kept. Returns the folders removed.
    """
    removed = []
    for path in sorted(Path(out_dir).glob(f".*{STAGING_SUFFIX}")):
        match = _STAGING_RE.match(path.name)
        if not match or not path.is_dir() or path.is_symlink() or _process_alive(int(match["pid"])):
            continue
        log.warning("removing %s: left behind by process %s, which is gone", path, match["pid"])
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # exists but belongs to someone else, or cannot tell: keep
        return True
    return True


# ------------------------------------------------------------------------------------------ validation


def check_name_version(name: str, version: str) -> None:
    """The whole name and version match their rules (fullmatch: no trailing newline slips past '$')."""
    if not NAME_RE.fullmatch(name or ""):
        raise ReleaseError(f"release name {name!r} is invalid: use letters, digits, '.', '_' and '-'")
    if not VERSION_RE.fullmatch(version or ""):
        raise ReleaseError(
            f"release version {version!r} is invalid: use MAJOR.MINOR.PATCH, e.g. 1.2.3 or 1.2.3-rc1"
        )


def _validate_inputs(inputs: ReleaseInputs) -> None:
    check_name_version(inputs.name, inputs.version)
    if not isinstance(inputs.example_inputs, tuple) or not all(
        isinstance(t, torch.Tensor) for t in inputs.example_inputs
    ):
        raise ReleaseError(
            "example_inputs must be a tuple of torch.Tensor (the slim module's positional inputs)"
        )
    source = inputs.reference.get("source_sha256")
    if not isinstance(source, str) or not re.fullmatch(r"[0-9a-f]{64}", source):
        raise ReleaseError(
            f"reference['source_sha256'] is {source!r}: "
            "give the lowercase hex sha256 of the source model file"
        )
    for role, path in inputs.model_files.items():
        _validate_model_file(role, Path(path), inputs.parity)
    bundle_file_names(inputs.model_files)
    mf.split_latency(inputs.latency)


def _validate_model_file(role: str, path: Path, parity: dict[str, dict[str, float]]) -> None:
    if not ROLE_RE.fullmatch(role) or role in RESERVED_ROLES:
        reserved = ", ".join(sorted(RESERVED_ROLES))
        raise ReleaseError(f"model_files role {role!r} is invalid: use [A-Za-z0-9._-] and none of {reserved}")
    if not path.is_file():
        raise ReleaseError(f"model_files[{role!r}]: {path} is not a file")
    fmt = format_of(path)
    if fmt in RUNNABLE_FORMATS and "tolerance" not in parity.get(role, {}):
        raise ReleaseError(
            f"model_files[{role!r}] ({path}): parity[{role!r}]['tolerance'] is missing; give the largest "
            "absolute difference from the slim PyTorch model that verify may accept"
        )


def copy_model_file(role: str, source: Path, dest: Path) -> None:
    """Copy a model file; an ONNX model with external data is stored with its tensors inlined."""
    if format_of(source) == "onnx" and _onnx_has_external_data(source):
        import onnx

        model = onnx.load(str(source))  # loads the external tensors from beside the file
        if model.ByteSize() >= _PROTOBUF_LIMIT:
            raise ReleaseError(
                f"model_files[{role!r}] ({source}) keeps tensors in external data and is too large (>2 GiB) "
                "to inline into one .onnx file; bundles carry one file per model"
            )
        onnx.save(model, str(dest))
        return
    shutil.copyfile(source, dest)


def _onnx_has_external_data(path: Path) -> bool:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def check_out_dir(out_dir: Path) -> None:
    """Raise ReleaseError if the release folder (or a folder above it) is an existing file."""
    blocker = file_in_the_way(Path(out_dir))
    if blocker is not None:
        raise ReleaseError(
            f"release folder {out_dir}: {blocker} is a file, not a folder; give release.out / --out a folder"
        )
    problem = write_problem(Path(out_dir))
    if problem:
        raise ReleaseError(f"release folder {out_dir}: {problem}; give release.out / --out a writable folder")


def check_new_version(out_dir: Path, name: str, version: str) -> None:
    """Raise ReleaseError now if the folder is a file or NAME-VERSION already exists in `out_dir`.

    Both are checked again at publish time.
    """
    check_name_version(name, version)
    check_out_dir(out_dir)
    stem = bundle_stem(name, version)
    _refuse_existing(Path(out_dir) / stem, Path(out_dir) / f"{stem}.tar.gz")


def _refuse_existing(*paths: Path) -> None:
    for path in paths:
        if path.exists() or path.is_symlink():
            raise ReleaseError(
                f"{path} already exists: a released version is never overwritten; bump the version "
                "or remove the old release yourself"
            )


# ------------------------------------------------------------------------------------------ bundle


def _write_bundle(inputs: ReleaseInputs, bundle: Path) -> dict[str, Any]:
    module = inputs.slim_module
    was_training = module.training
    eval_mode(module)  # a module from a loaded .pt2 refuses .eval()/.train() and is already in eval form
    try:
        outputs = _reference_outputs(module, inputs.example_inputs)
        pt2_parity = _write_pt2(module, inputs.example_inputs, outputs, bundle / PT2_NAME)
        _write_safetensors(module, bundle / WEIGHTS_NAME)
    finally:
        if was_training and not module.training:  # eval_mode switched it: switch back
            module.train(True)
    arrays = {f"in{i}": t.detach().cpu().numpy() for i, t in enumerate(inputs.example_inputs)}
    arrays.update({f"out{i}": o for i, o in enumerate(outputs)})
    (bundle / REFERENCE_NAME).write_bytes(npz_bytes(arrays))

    roles = {PT2_NAME: "pt2", WEIGHTS_NAME: "safetensors", REFERENCE_NAME: "reference-io"}
    for role, rel in bundle_file_names(inputs.model_files).items():
        copy_model_file(role, Path(inputs.model_files[role]), bundle / rel)
        roles[rel] = role

    parity = {"pt2": pt2_parity, **to_jsonable(inputs.parity)}
    manifest = _manifest(inputs, bundle, roles, parity, len(inputs.example_inputs), outputs)
    mf.validate_manifest(manifest, where=f"{bundle / mf.MANIFEST_NAME} (being written)")
    (bundle / CARD_NAME).write_text(render_model_card(manifest, inputs.model_card_notes), encoding="utf-8")
    (bundle / REPORT_NAME).write_text(render_report(manifest, inputs.extra_plots), encoding="utf-8")
    roles.update({CARD_NAME: "model-card", REPORT_NAME: "report"})
    manifest["files"] = file_entries(bundle, roles)
    mf.validate_manifest(manifest, where=f"{bundle / mf.MANIFEST_NAME} (being written)")
    (bundle / mf.MANIFEST_NAME).write_text(dump_json(manifest), encoding="utf-8")
    return manifest


def _reference_outputs(module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    with torch.no_grad():
        result = module(*example_inputs)
    return flatten_outputs(result, "slim_module")


def _write_pt2(
    module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], outputs: list[np.ndarray], path: Path
) -> dict[str, float]:
    """Export and save the slim module; return its parity against the eager outputs."""
    try:
        program = torch.export.export(module, example_inputs, strict=False)
    except Exception as exc:
        raise ReleaseError(f"{path.name}: torch.export could not trace the slim module: {exc}") from exc
    strip_process_metadata(program)
    torch.export.save(program, str(path))
    with torch.no_grad():
        exported = flatten_outputs(program.module()(*example_inputs), path.name)
    diff = max_diffs(exported, outputs, path.name)
    return {**diff, "tolerance": REL_BOUNDS["fp32"] * finite_scale(outputs)}


# Node metadata that differs between processes or checkouts (object ids in provenance, source paths).
PROCESS_METADATA = ("from_node", "stack_trace")


def strip_process_metadata(program: torch.export.ExportedProgram) -> None:
    """Drop node metadata holding object ids and file paths: the saved .pt2 is the same in every process."""
    for module in program.graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                for key in PROCESS_METADATA:
                    node.meta.pop(key, None)


def max_diffs(actual: list[np.ndarray], expected: list[np.ndarray], where: str) -> dict[str, float]:
    """Largest absolute and relative differences over all outputs, from `slimship.compare.compare`.

    max_rel_diff is max_abs_diff / max(1, max|finite expected|); a NaN/Inf out of place makes both
    inf (written to the manifest as null). ReleaseError on an output count or shape mismatch.
    """
    if len(actual) != len(expected):
        raise ReleaseError(f"{where}: returns {len(actual)} outputs, the reference has {len(expected)}")
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        if np.shape(a) != np.shape(e):
            raise ReleaseError(
                f"{where}: output {i} has shape {list(np.shape(a))}, the reference has {list(np.shape(e))}"
            )
    check = compare(expected, actual, REL_BOUNDS["fp32"])
    return {"max_abs_diff": check.max_abs_diff, "max_rel_diff": check.max_rel_diff}


def _write_safetensors(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save

    # Clone so tied/shared tensors save under every key (keys stay those of state_dict).
    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    path.write_bytes(save(state, metadata={"format": "pt"}))


def _tensor_specs(
    reference: dict[str, Any], kind: str, arrays: list[tuple[list[int], str]]
) -> list[dict[str, Any]]:
    """Input/output specs: the given ones completed with shapes/dtypes of the example tensors."""
    given = reference.get(kind)
    if given is None:
        names = reference.get(f"{kind[:-1]}_names") or [f"{kind[:-1]}_{i}" for i in range(len(arrays))]
        given = [{"name": n} for n in names]
    if len(given) != len(arrays):
        raise ReleaseError(
            f"reference[{kind!r}] lists {len(given)} {kind}, the slim module has {len(arrays)}: "
            "make them agree"
        )
    specs = []
    for spec, (shape, dtype) in zip(given, arrays):
        spec = {"name": spec} if isinstance(spec, str) else dict(spec)
        spec.setdefault("shape", shape)
        spec.setdefault("dtype", dtype)
        specs.append(spec)
    return specs


def _manifest(
    inputs: ReleaseInputs,
    bundle: Path,
    roles: dict[str, str],
    parity: dict[str, Any],
    n_inputs: int,
    outputs: list[np.ndarray],
) -> dict[str, Any]:
    ref = to_jsonable(inputs.reference)
    in_arrays = [(list(t.shape), str(t.dtype).removeprefix("torch.")) for t in inputs.example_inputs]
    out_arrays = [(list(o.shape), str(o.dtype)) for o in outputs]
    model = {k: v for k, v in ref.items() if k not in ("inputs", "outputs", "input_names", "output_names")}
    model["inputs"] = _tensor_specs(ref, "inputs", in_arrays)
    model["outputs"] = _tensor_specs(ref, "outputs", out_arrays)
    manifest = {
        "schema_version": mf.SCHEMA_VERSION,
        "name": inputs.name,
        "version": inputs.version,
        "created_by": f"slimship {__version__}",
        "files": file_entries(bundle, roles),
        "model": model,
        "reference_io": {
            "path": REFERENCE_NAME,
            "inputs": [f"in{i}" for i in range(n_inputs)],
            "outputs": [f"out{i}" for i in range(len(outputs))],
        },
        "slimming": to_jsonable(inputs.slimming),
        "parity": parity,
        "accuracy": to_jsonable(inputs.accuracy),
        "latency": mf.split_latency(to_jsonable(inputs.latency)),
        "versions": mf.package_versions(),
        "config": to_jsonable(inputs.config),
    }
    if inputs.gates is not None:
        manifest["gates"] = to_jsonable(inputs.gates)
    if inputs.calibration is not None:
        manifest["calibration"] = to_jsonable(inputs.calibration)
    if inputs.targets is not None:
        manifest["targets"] = to_jsonable(inputs.targets)
    return mf.finite_or_none(manifest)


def file_entries(bundle: Path, roles: dict[str, str]) -> list[dict[str, Any]]:
    """The manifest's `files`: path, sha256, bytes, role and format of each file in `roles`, sorted."""
    return [
        {
            "path": rel,
            "sha256": sha256_file(bundle / rel),
            "bytes": (bundle / rel).stat().st_size,
            "role": roles[rel],
            "format": format_of(Path(rel)),
        }
        for rel in sorted(roles)
    ]


# ------------------------------------------------------------------------------------------ tarball


# ------------------------------------------------------------------------------------------ publish


def _publish(bundle: Path, staged_tar: Path, final_dir: Path, final_tar: Path) -> None:
    """Move the staged bundle and tarball into place without replacing anything (rolled back on failure)."""
    _refuse_existing(final_dir, final_tar)
    os.rename(bundle, final_dir)
    try:
        _move_no_replace(staged_tar, final_tar)
    except BaseException:
        os.rename(final_dir, bundle)
        raise


def _move_no_replace(source: Path, dest: Path) -> None:
    try:
        os.link(source, dest)  # atomic, and fails if dest exists: never replaces
    except FileExistsError:
        raise ReleaseError(
            f"{dest} appeared while the release was being written; nothing was published"
        ) from None
    except OSError:  # a filesystem without hard links
        _refuse_existing(dest)
        os.replace(source, dest)
