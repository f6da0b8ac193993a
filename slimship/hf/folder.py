"""A Hugging Face checkpoint folder, checked before anything is loaded from it.

A folder holds `config.json` and its weights: `model.safetensors`, or shards named by
`model.safetensors.index.json`. Only safetensors headers are read here (lazily, with `safe_open`); pickle
weights (`pytorch_model.bin`, `*.pt`, ...) are refused unless the caller opts in. A slim folder also holds
its per-tensor shapes under the `slimship` key of `config.json` and a `SHA256SUMS` file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimship.errors import ModelFileError, first_line
from slimship.hf.claims import check_claims
from slimship.pt2_checks import OPT_IN, parse_json

CONFIG = "config.json"
SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
CHECKSUMS = "SHA256SUMS"
SLIM_KEY = "slimship"  # config.json key holding the slim shapes and per-layer sizes
SLIM_FORMAT = 1
MAX_JSON_BYTES = 64 << 20  # config.json, an index or SHA256SUMS beyond this is not a checkpoint's
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class CheckpointFolder:
    """What a checkpoint folder holds, read from its small files and safetensors headers only."""

    path: Path
    config: dict[str, Any]
    weight_files: list[str]  # file names in `path`, in index order
    index: str | None  # the index file's name when sharded
    pickled: bool  # the weights are pickle files (read only when the caller opted in)
    shapes: dict[str, list[int]] = field(default_factory=dict)  # checkpoint key -> shape (safetensors)
    other_files: list[str] = field(default_factory=list)  # tokenizer, generation config, README, ...

    @property
    def slim(self) -> dict[str, Any] | None:
        """The `slimship` entry of config.json (shapes and per-layer sizes of a slim folder), or None."""
        entry = self.config.get(SLIM_KEY)
        return entry if isinstance(entry, dict) else None

    @property
    def sharded(self) -> bool:
        return self.index is not None

    def weight_bytes(self) -> int:
        return sum((self.path / name).stat().st_size for name in self.weight_files)


def is_checkpoint_folder(path: Any) -> bool:
    """True for a folder (the only kind of model path that is a directory)."""
    return path is not None and Path(path).is_dir()


def read_json(path: Path, what: str) -> Any:
    """A small JSON file, with ModelFileError naming it when it is missing, too large or not JSON."""
    if not path.is_file():
        raise ModelFileError(f"{path}: no {what} in the checkpoint folder")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ModelFileError(f"{path}: {path.stat().st_size} bytes is too large for {what}")
    return parse_json(path.read_bytes(), f"{path} ({what})", unique_keys=False)


def read_folder(path: str | Path, *, allow_pickle: bool = False) -> CheckpointFolder:
    """Check a checkpoint folder: config.json, the weight files (index, shards, safetensors headers).

    Raises ModelFileError naming the missing or broken file; pickle weights without `allow_pickle`.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ModelFileError(f"{folder}: not a folder (a checkpoint folder holds config.json and weights)")
    config = read_json(folder / CONFIG, "config.json")
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelFileError(f"{folder / CONFIG}: no 'model_type' key; not a transformers config.json")
    if config.get("auto_map"):
        raise ModelFileError(
            f"{folder / CONFIG}: 'auto_map' names custom model code; slimship loads only architectures "
            "transformers ships (it never runs code from a checkpoint folder)"
        )
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    weights, index, pickled = _weight_files(folder, names, allow_pickle)
    ckpt = CheckpointFolder(folder, config, weights, index, pickled)
    if not pickled:
        ckpt.shapes = _safetensors_shapes(folder, weights, index)
        check_claims(folder / CONFIG, config, ckpt.shapes, slim=SLIM_KEY in config)
    ckpt.other_files = [n for n in names if n not in {CONFIG, CHECKSUMS, index, *weights} and _extra(n)]
    _check_slim_entry(ckpt)
    return ckpt


def _extra(name: str) -> bool:
    """Files copied into a slim folder as they are: not weights, not hidden."""
    weights = (".safetensors", *PICKLE_SUFFIXES)
    return not name.startswith(".") and not name.endswith(weights) and name not in (SAFE_INDEX, PICKLE_INDEX)


def _weight_files(folder: Path, names: list[str], allow_pickle: bool) -> tuple[list[str], str | None, bool]:
    if SAFE_INDEX in names:
        return _index_files(folder, SAFE_INDEX), SAFE_INDEX, False
    if SAFE_SINGLE in names:
        return [SAFE_SINGLE], None, False
    stray = [n for n in names if n.endswith(".safetensors")]
    if stray:
        raise ModelFileError(
            f"{folder}: {', '.join(stray[:3])} without {SAFE_INDEX}; transformers reads {SAFE_SINGLE} or "
            f"shards named by {SAFE_INDEX}"
        )
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES) or n == PICKLE_INDEX]
    if not pickles:
        raise ModelFileError(f"{folder}: no weights ({SAFE_SINGLE}, or shards named by {SAFE_INDEX})")
    if not allow_pickle:
        raise ModelFileError(
            f"{folder / pickles[0]}: pickle weights can run code when loaded; convert the folder to "
            f"safetensors (save_pretrained(safe_serialization=True)) or {OPT_IN}"
        )
    if PICKLE_INDEX in names:
        return _index_files(folder, PICKLE_INDEX), PICKLE_INDEX, True
    if PICKLE_SINGLE in names:
        return [PICKLE_SINGLE], None, True
    raise ModelFileError(f"{folder}: {', '.join(pickles[:3])}: transformers reads {PICKLE_SINGLE} only")


def _index_files(folder: Path, index: str) -> list[str]:
    """The shard files an index names (plain names in the folder, all present), in first-use order."""
    data = read_json(folder / index, "weight index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelFileError(f"{folder / index}: no 'weight_map' of tensor name -> shard file")
    files: list[str] = []
    for key, name in weight_map.items():
        if not isinstance(name, str) or not _PLAIN_NAME.match(name):
            raise ModelFileError(
                f"{folder / index}: tensor {key!r} maps to {name!r}, not a file in the folder"
            )
        if name not in files:
            files.append(name)
    missing = [n for n in files if not (folder / n).is_file()]
    if missing:
        raise ModelFileError(f"{folder / index}: names {', '.join(missing[:3])}, missing from the folder")
    return files


def _safetensors_shapes(folder: Path, files: list[str], index: str | None) -> dict[str, list[int]]:
    """Tensor name -> shape from each file's header (no tensor data read); checks the index agrees."""
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    where: dict[str, str] = {}
    for name in files:
        try:
            with safe_open(str(folder / name), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                    shapes[key] = list(handle.get_slice(key).get_shape())
                    where[key] = name
        except Exception as exc:  # safetensors raises its own error types for a bad header
            raise ModelFileError(
                f"{folder / name}: not a readable safetensors file ({first_line(exc)})"
            ) from None
    if index is not None:
        weight_map = read_json(folder / index, "weight index")["weight_map"]
        wrong = [k for k, f in weight_map.items() if where.get(k) != f]
        if wrong:
            raise ModelFileError(
                f"{folder / index}: tensor {wrong[0]!r} is not in {weight_map[wrong[0]]} "
                f"({len(wrong)} entries disagree with the shards)"
            )
    return shapes


def _check_slim_entry(ckpt: CheckpointFolder) -> None:
    """A slim folder's stored shapes must be the shapes its weight files hold."""
    entry = ckpt.slim
    if entry is None:
        if SLIM_KEY in ckpt.config:
            raise ModelFileError(f"{ckpt.path / CONFIG}: '{SLIM_KEY}' is not an object")
        return
    shapes = entry.get("shapes")
    if entry.get("format") != SLIM_FORMAT or not isinstance(shapes, dict):
        raise ModelFileError(
            f"{ckpt.path / CONFIG}: '{SLIM_KEY}' is not a format-{SLIM_FORMAT} entry with 'shapes'; "
            "written by another slimship version?"
        )
    for name, shape in shapes.items():
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ModelFileError(f"{ckpt.path / CONFIG}: {SLIM_KEY}.shapes[{name!r}] is not a list of sizes")
        stored = ckpt.shapes.get(name)
        if ckpt.shapes and stored is not None and stored != shape:
            raise ModelFileError(
                f"{ckpt.path}: tensor {name!r} is {stored} in the weights but {shape} in "
                f"{CONFIG} '{SLIM_KEY}.shapes'"
            )


# ------------------------------------------------------------------------------------------ checksums


def write_checksums(folder: Path) -> Path:
    """`SHA256SUMS` of every file in `folder` (the `sha256sum -c` format)."""
    from slimship._util import sha256_file

    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != CHECKSUMS)
    text = "".join(f"{sha256_file(folder / n)}  {n}\n" for n in names)
    (folder / CHECKSUMS).write_text(text, encoding="utf-8")
    return folder / CHECKSUMS


def verify_checksums(folder: Path) -> int:
    """Check the files `SHA256SUMS` lists (none when absent); return how many were checked."""
    from slimship._util import sha256_file

    path = folder / CHECKSUMS
    if not path.is_file():
        return 0
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ModelFileError(f"{path}: too large for a checksum list")
    checked = 0
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        digest, _, name = line.partition("  ")
        if not re.fullmatch(r"[0-9a-f]{64}", digest) or not _PLAIN_NAME.match(name):
            raise ModelFileError(f"{path}: line {number} is not '<sha256>  <file name>'")
        if not (folder / name).is_file():
            raise ModelFileError(f"{folder / name}: listed in {CHECKSUMS} but missing")
        if sha256_file(folder / name) != digest:
            raise ModelFileError(f"{folder / name}: sha256 differs from {CHECKSUMS} (corrupt or changed)")
        checked += 1
    return checked


def folder_digest(ckpt: CheckpointFolder) -> str:
    """One sha256 for a folder: of its config, weight and other files' names and digests."""
    import hashlib

    from slimship._util import sha256_file

    names = sorted({CONFIG, *ckpt.weight_files, *([ckpt.index] if ckpt.index else []), *ckpt.other_files})
    text = "".join(f"{sha256_file(ckpt.path / n)}  {n}\n" for n in names)
    return hashlib.sha256(text.encode()).hexdigest()
