"""Write a (slim) transformers model as a checkpoint folder in the layout of its source folder.

The folder is written into a hidden staging folder beside `out`, loaded back and checked against the
outputs the model gave before it was written, then renamed into place: whole or nothing, and an
existing `out` is never overwritten.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from slimship.errors import ConfigError, ModelFileError, first_line
from slimship.hf.folder import SLIM_FORMAT, SLIM_KEY, CheckpointFolder, write_checksums
from slimship.hf.load import dense_shapes, quiet_progress
from slimship.hf.sizes import layer_sizes

SINGLE_FILE_LIMIT = "10000GB"  # a single-file source is written as a single file


def check_new_folder(out: Path, option: str = "--out") -> Path:
    """Refuse an output folder that exists, or whose parent is not an existing folder."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise ConfigError(f"{option} {out}: already exists; remove it or choose another {option}")
    if not out.parent.is_dir():
        what = "is a file" if out.parent.exists() else "does not exist"
        raise ConfigError(f"{option} {out}: its folder {out.parent} {what}; create the folder first")
    return out


def slim_entry(model: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `slimship` entry of config.json: every tensor whose shape differs from what the config
    builds, and the per-layer sizes (heads, KV heads, MLP width)."""
    dense = dense_shapes(model)
    shapes = {
        name: list(t.shape)
        for name, t in model.state_dict().items()
        if name in dense and list(t.shape) != dense[name]
    }
    return {"format": SLIM_FORMAT, "shapes": shapes, "layers": layer_sizes(model), **(extra or {})}


def write_folder(
    model: Any,
    source: CheckpointFolder,
    out: Path,
    *,
    extra: dict[str, Any] | None = None,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Save `model` to the new folder `out` like `source`: config.json (with the `slimship` entry),
    safetensors (sharded with an index when `source` is), `source`'s other files copied as they are,
    and `SHA256SUMS`. `check(staging)` runs on the written folder before it is renamed into place."""
    out = check_new_folder(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        setattr(model.config, SLIM_KEY, slim_entry(model, extra))
        keep_tied(model)
        _save(model, source, staging)
        for name in source.other_files:  # tokenizer, generation config, README ... as they are
            shutil.copy2(source.path / name, staging / name)
        write_checksums(staging)
        if check is not None:
            check(staging)
        if out.exists() or out.is_symlink():  # appeared while writing: never replaced
            raise ConfigError(f"--out {out}: appeared while the slim folder was written; nothing replaced")
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def keep_tied(model: Any) -> bool:
    """Tie the output embedding back to the input one when the config ties them and their tensors are
    equal (slimming gives each its own tensor): one storage, written once, as save_pretrained does."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is None or outputs is None or outputs.weight is inputs.weight:
        return outputs is not None and inputs is not None
    a, b = inputs.weight, outputs.weight
    if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
        return False
    outputs.weight = inputs.weight
    return True


def _save(model: Any, source: CheckpointFolder, folder: Path) -> None:
    shard: int | str = SINGLE_FILE_LIMIT
    if source.sharded:  # about as many shards as the source
        total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        shard = max(1, -(-total // len(source.weight_files)))
    try:
        with quiet_progress():
            model.save_pretrained(str(folder), safe_serialization=True, max_shard_size=shard)
    except OSError as exc:
        raise ModelFileError(f"{folder}: could not write the slim folder ({first_line(exc)})") from exc
