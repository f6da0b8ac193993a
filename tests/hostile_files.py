"""The smallest files that declare more than they hold (huge shapes, bombs, deep nesting, garbage): one
builder per class of hostile input (tests/test_hostile_inputs.py, benchmarks/hostile_memory.py)."""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tests.pt2_tamper import edit_json, rewrite

# ------------------------------------------------------------------------------------------ ONNX


def onnx_identity(path: Path, dims: list[int], elem_type: int = 1) -> Path:
    """An ONNX model of one Identity node whose input is declared `dims` of ONNX element type `elem_type`."""
    import onnx
    from onnx import helper

    x = helper.make_tensor_value_info("x", elem_type, dims)
    y = helper.make_tensor_value_info("y", elem_type, dims)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def onnx_external(path: Path, location: str) -> Path:
    """An ONNX model whose one initializer lives in external data at `location` (which is not written)."""
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [4], [0.0] * 4)
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


# ------------------------------------------------------------------------------------------ .npz


def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    text = repr({"descr": dtype, "fortran_order": False, "shape": shape}).encode()
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text


def npz_declaring(path: Path, shape: tuple[int, ...], dtype: str = "<f4", data: bytes = b"") -> Path:
    """An .npz whose in0.npy header declares `shape` but holds only `data` (256 bytes for 2^40 rows)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("in0.npy", _npy_header(dtype, shape) + data)
    return path


def npz_bomb(path: Path, nbytes: int) -> Path:
    """An .npz of one float32 array of zeros, `nbytes` long once inflated (deflate: about 1000x smaller)."""
    header = _npy_header("<f4", (nbytes // 4,))
    chunk = bytes(1 << 20)
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive,
        archive.open("in0.npy", "w", force_zip64=True) as member,
    ):
        member.write(header)
        for _ in range(nbytes // len(chunk)):
            member.write(chunk)
    return path


def npz_values(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


# ------------------------------------------------------------------------------------------ .pt2


class Tiny(torch.nn.Module):
    """Linear + ReLU, and a constant built by aten.full from scalar sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lin(x).relu(), torch.full((4, 4), 1.0)


def tiny_pt2(path: Path) -> Path:
    torch.manual_seed(0)
    program = torch.export.export(Tiny().eval(), (torch.randn(2, 4),), strict=False)
    torch.export.save(program, str(path))
    return path


def _graph(doc: dict) -> dict:
    return doc["graph_module"]["graph"]


def pt2_input_shape(src: Path, dst: Path, shape: list[int]) -> Path:
    """The input `x` declared `shape` in the graph's metadata."""

    def change(doc: dict) -> None:
        meta = _graph(doc)["tensor_values"]["x"]
        meta["sizes"] = [{"as_int": n} for n in shape]
        strides, step = [], 1
        for n in reversed(shape):
            strides.insert(0, {"as_int": step})
            step *= n
        meta["strides"] = strides

    return rewrite(src, dst, lambda members: edit_json(members, "models/model.json", change))


def pt2_full(src: Path, dst: Path, size: list[int]) -> Path:
    """The allowlisted aten.full node asked for `size` (its declared output metadata left small)."""

    def change(doc: dict) -> None:
        node = next(n for n in _graph(doc)["nodes"] if n["target"] == "torch.ops.aten.full.default")
        node["inputs"][0]["arg"] = {"as_ints": size}

    return rewrite(src, dst, lambda members: edit_json(members, "models/model.json", change))


def pt2_weight(
    src: Path, dst: Path, fqn: str, sizes: list[int], strides: list[int], path_name: str = ""
) -> Path:
    """The stored weight `fqn` declared with other sizes / strides (or another member path)."""

    def change(doc: dict) -> None:
        meta = doc["config"][fqn]
        meta["tensor_meta"]["sizes"] = [{"as_int": n} for n in sizes]
        meta["tensor_meta"]["strides"] = [{"as_int": n} for n in strides]
        if path_name:
            meta["path_name"] = path_name

    return rewrite(src, dst, lambda m: edit_json(m, "data/weights/model_weights_config.json", change))


def pt2_duplicate_weight(src: Path, dst: Path) -> Path:
    """Two weight entries point at one state-dict key (the config is written as raw JSON text)."""

    def edit(members: dict[str, bytes]) -> None:
        config = json.loads(members["data/weights/model_weights_config.json"])["config"]
        first = next(iter(config))
        body = ", ".join(f"{json.dumps(first)}: {json.dumps(meta)}" for meta in config.values())
        members["data/weights/model_weights_config.json"] = f'{{"config": {{{body}}}}}'.encode()

    return rewrite(src, dst, edit)


def pt2_nested(src: Path, dst: Path, depth: int) -> Path:
    """model.json with `depth` nested brackets in a node's metadata."""

    def edit(members: dict[str, bytes]) -> None:
        text = members["models/model.json"].decode()
        deep = "[" * depth + "]" * depth
        members["models/model.json"] = text.replace(
            '"metadata": {', f'"deep": {deep}, "metadata": {{', 1
        ).encode()

    return rewrite(src, dst, edit)


def pt2_many_nodes(src: Path, dst: Path, count: int) -> Path:
    """`count` relu nodes chained between the linear and the relu (a valid program, just long)."""

    def change(doc: dict) -> None:
        graph = _graph(doc)
        nodes = graph["nodes"]
        relu = next(i for i, n in enumerate(nodes) if n["name"] == "relu")
        meta = graph["tensor_values"]["linear"]
        chain, last = [], "linear"
        for i in range(count):
            name = f"r{i}"
            arg = {"name": "self", "arg": {"as_tensor": {"name": last}}, "kind": 1}
            out = [{"as_tensor": {"name": name}}]
            node = {"target": "torch.ops.aten.relu.default", "name": name, "metadata": {}, "inputs": [arg]}
            chain.append({**node, "outputs": out, "is_hop_single_tensor_return": None})
            graph["tensor_values"][name] = meta
            last = name
        nodes[relu]["inputs"][0]["arg"]["as_tensor"]["name"] = last
        nodes[relu:relu] = chain

    return rewrite(src, dst, lambda members: edit_json(members, "models/model.json", change))


# ------------------------------------------------------------------------------------------ other


def garbage(path: Path, size: int = 1024, seed: int = 0) -> Path:
    """`size` pseudo-random bytes (seeded) behind a plausible file name."""
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def with_nan(shape: tuple[int, ...]) -> np.ndarray:
    """Random float32 samples with one NaN at [3, 1]."""
    array = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    array[3, 1] = np.nan
    return array


def text(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def link(path: Path, target: Path) -> Path:
    path.symlink_to(target)
    return path


def example_config(path: Path, out: str) -> Path:
    """configs/example.yaml with another release.out."""
    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "example.yaml").read_text())
    config["release"]["out"] = out
    path.write_text(yaml.safe_dump(config))
    return path


def tiny_bundle(out: Path) -> Path:
    """A release bundle of a one-layer model (no exports), written by write_release."""
    from slimship.pipeline.release import ReleaseInputs, write_release

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    inputs = ReleaseInputs(
        name="tiny", version="0.1.0", slim_module=model, example_inputs=(torch.randn(1, 4),), model_files={},
        reference={"source_sha256": "0" * 64}, slimming={}, parity={}, accuracy={}, latency={}, config={},
    )  # fmt: skip
    return write_release(inputs, out).bundle_dir


def edited_bundle(bundle: Path, dst: Path, old: str, new: str) -> Path:
    """A copy of `bundle` whose manifest.json text has `old` replaced by `new` (once; it must be there)."""
    import shutil

    shutil.copytree(bundle, dst)
    manifest = dst / "manifest.json"
    body = manifest.read_text()
    assert old in body, old
    manifest.write_text(body.replace(old, new, 1))
    return dst


def bundle_with_file(bundle: Path, dst: Path, name: str, make: Callable[[Path], Path]) -> Path:
    """A copy of `bundle` whose file `name` is replaced by `make(path)`, its manifest entry (sha256, bytes)
    updated so the checksums still agree: only what the file declares is hostile."""
    import hashlib
    import shutil

    shutil.copytree(bundle, dst)
    target = dst / name
    target.unlink()
    make(target)
    manifest = json.loads((dst / "manifest.json").read_text())
    entry = next(f for f in manifest["files"] if f["path"] == name)
    entry["sha256"] = hashlib.sha256(target.read_bytes()).hexdigest()
    entry["bytes"] = target.stat().st_size
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return dst


# ------------------------------------------------------------------------------------------ child runs


@dataclass
class Outcome:
    """How a `python -m slimship` child ended: exit status, stderr, peak RSS (MiB, from wait4), seconds."""

    exit: int
    stderr: str
    peak_mib: float
    seconds: float

    def message(self) -> str:
        """The last `slimship:` line of stderr (or its tail)."""
        lines = [line for line in self.stderr.splitlines() if line.startswith("slimship:")]
        return lines[-1] if lines else self.stderr.strip()[-200:]


def run_slimship(argv: list[str], cwd: Path, stderr: Path, code: Path, cap: int, timeout: float) -> Outcome:
    """`python -m slimship argv` in `cwd` with `code` on PYTHONPATH, its address space capped at `cap` bytes
    (a regression fails the run, not the machine) and killed after `timeout` seconds."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    env = {**os.environ, "PYTHONPATH": str(code)}
    start = time.monotonic()
    with open(stderr, "wb") as sink:
        child = subprocess.Popen([sys.executable, "-m", "slimship", *argv], cwd=cwd, env=env,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=sink,
                                 preexec_fn=limit)  # fmt: skip
        timer = threading.Timer(timeout, child.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(child.pid, 0)
        finally:
            timer.cancel()
    child.returncode = os.waitstatus_to_exitcode(status)
    return Outcome(child.returncode, stderr.read_text(errors="replace"), usage.ru_maxrss / 1024,
                   time.monotonic() - start)  # fmt: skip
