"""Token ids from the command line and from token files (bounded, no pickles)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from slimship.errors import ConfigError

MAX_TOKEN_FILE_BYTES = 64 << 20
MAX_SEQUENCES = 256


def parse_ids(text: str, option: str = "--prompt-ids") -> list[int]:
    """'1,2,3' (commas and/or spaces) -> [1, 2, 3]; ConfigError naming the option otherwise."""
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    if not parts or not all(p.isdigit() for p in parts):
        raise ConfigError(f"{option} {text!r}: expected token ids such as 1,2,3")
    return [int(p) for p in parts]


def _rows(array: np.ndarray, path: Path) -> list[list[int]]:
    if array.dtype.kind not in "iu":
        raise ConfigError(f"--calibration {path}: token ids must be integers, got dtype {array.dtype}")
    if array.ndim == 1:
        return [array.tolist()]
    if array.ndim == 2:
        return [row.tolist() for row in array]
    raise ConfigError(f"--calibration {path}: expected a 1-D or 2-D array of token ids, got {array.ndim}-D")


def load_token_file(path: str | Path, vocab_size: int, max_len: int) -> tuple[tuple[int, ...], ...]:
    """Token sequences from .npy / .npz (the array `tokens`, else the first; rows are sequences) or a .txt
    with one sequence of ids per line; each cut to `max_len` tokens, at most MAX_SEQUENCES of them."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--calibration {path}: no such file")
    if path.stat().st_size > MAX_TOKEN_FILE_BYTES:
        raise ConfigError(f"--calibration {path}: larger than {MAX_TOKEN_FILE_BYTES >> 20} MiB")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            rows = _rows(np.load(path, allow_pickle=False), path)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                if not data.files:
                    raise ConfigError(f"--calibration {path}: holds no arrays")
                rows = _rows(data["tokens"] if "tokens" in data.files else data[data.files[0]], path)
        elif suffix == ".txt":
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            rows = [parse_ids(line, f"--calibration {path} line") for line in lines]
        else:
            raise ConfigError(f"--calibration {path}: expected a .npy, .npz or .txt of token ids")
    except (ValueError, OSError) as exc:
        raise ConfigError(f"--calibration {path}: not a readable token file ({exc})") from None
    sequences = tuple(tuple(int(t) for t in row[:max_len]) for row in rows[:MAX_SEQUENCES] if len(row) >= 2)
    if not sequences:
        raise ConfigError(f"--calibration {path}: no sequence of 2 or more tokens")
    bad = sorted({t for row in sequences for t in row if not 0 <= t < vocab_size})
    if bad:
        raise ConfigError(
            f"--calibration {path}: token ids {bad[:5]} outside the vocabulary [0, {vocab_size})"
        )
    return sequences
