"""Build hostile .pt2 files for the loader tests: each would create `marker` if torch's loader opened it."""

from __future__ import annotations

import io
import json
import operator
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch


class _Touch:
    """Unpickles by calling open(marker, 'w'): a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class Payload:
    """Unpickles to `value` after creating `marker`, so a loader that unpickles it still works."""

    def __init__(self, marker: Path, value: object) -> None:
        self.marker, self.value = marker, value

    def __reduce__(self):
        return (operator.getitem, ((_Touch(self.marker), self.value), 1))


def pickled(value: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def rewrite(src: Path, dst: Path, edit: Callable[[dict[str, bytes]], None]) -> Path:
    """Copy a .pt2 with `edit` applied to its members (names below the archive root)."""
    with zipfile.ZipFile(src) as archive:
        root = archive.namelist()[0].split("/", 1)[0]
        members = {n.split("/", 1)[1]: archive.read(n) for n in archive.namelist()}
    edit(members)
    with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(f"{root}/{name}", data)
    return dst


def edit_json(members: dict[str, bytes], name: str, change: Callable[[dict], None]) -> None:
    doc = json.loads(members[name])
    change(doc)
    members[name] = json.dumps(doc).encode()


def hostile_sample_inputs(src: Path, dst: Path, marker: Path, example: tuple) -> Path:
    """(a) the stored sample inputs unpickle through open(marker)."""

    def edit(members: dict[str, bytes]) -> None:
        members["data/sample_inputs/model.pt"] = pickled(Payload(marker, (example, {})))

    return rewrite(src, dst, edit)


def hostile_weight(src: Path, dst: Path, marker: Path) -> Path:
    """(b) the first weight is stored as a pickle that runs open(marker) and returns the real tensor."""

    def edit(members: dict[str, bytes]) -> None:
        config = json.loads(members["data/weights/model_weights_config.json"])
        meta = next(iter(config["config"].values()))
        weight = torch.nn.Parameter(_weight(members, meta))
        meta["use_pickle"] = True
        members[f"data/weights/{meta['path_name']}"] = pickled(Payload(marker, weight))
        members["data/weights/model_weights_config.json"] = json.dumps(config).encode()

    return rewrite(src, dst, edit)


def _weight(members: dict[str, bytes], meta: dict) -> torch.Tensor:
    raw = bytearray(members[f"data/weights/{meta['path_name']}"])
    sizes = [s["as_int"] for s in meta["tensor_meta"]["sizes"]]
    return (
        torch.frombuffer(raw, dtype=torch.float32)[: int(torch.tensor(sizes).prod())].reshape(sizes).clone()
    )


def hostile_expression(src: Path, dst: Path, marker: Path) -> Path:
    """(c) a symbolic size whose expression string calls open(marker) when sympify evaluates it."""

    def change(doc: dict) -> None:
        values = doc["graph_module"]["graph"]["tensor_values"]
        for meta in values.values():
            for size in meta["sizes"]:
                if "as_expr" in size:
                    expr = size["as_expr"]["expr_str"]
                    call = f"__import__('builtins').open({str(marker)!r}, 'w')"
                    size["as_expr"]["expr_str"] = f"({expr}) if {call} else 0"
                    return
        raise AssertionError("the program has no symbolic size to tamper with")

    return rewrite(src, dst, lambda members: edit_json(members, "models/model.json", change))


def hostile_target(src: Path, dst: Path, command: str) -> Path:
    """A node whose operator target resolves to os.system through torch's module attributes."""

    def change(doc: dict) -> None:
        node = doc["graph_module"]["graph"]["nodes"][0]
        node["target"] = "torch.serialization.os.system"
        node["inputs"] = [{"name": "command", "arg": {"as_string": command}, "kind": 1}]

    return rewrite(src, dst, lambda members: edit_json(members, "models/model.json", change))
