"""Token ids from the command line and token files: what is read, and what is refused (naming the file)."""

from __future__ import annotations

import numpy as np
import pytest

from slimship.decoder.tokens import MAX_SEQUENCES, load_token_file, parse_ids
from slimship.errors import ConfigError


def test_parse_ids():
    assert parse_ids("1,2,3") == [1, 2, 3]
    assert parse_ids(" 4 5,6 ") == [4, 5, 6]
    for bad in ("", "1,x", "-1,2", "1.5"):
        with pytest.raises(ConfigError, match="--prompt-ids"):
            parse_ids(bad)


def test_token_files(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(10, dtype=np.int64))
    assert load_token_file(tmp_path / "a.npy", 20, 6) == ((0, 1, 2, 3, 4, 5),)
    np.savez(tmp_path / "b.npz", other=np.zeros((2, 2), np.int32), tokens=np.array([[1, 2, 3], [4, 5, 6]]))
    assert load_token_file(tmp_path / "b.npz", 20, 8) == ((1, 2, 3), (4, 5, 6))
    (tmp_path / "c.txt").write_text("1,2,3\n\n7 8\n")
    assert load_token_file(tmp_path / "c.txt", 20, 8) == ((1, 2, 3), (7, 8))
    np.save(tmp_path / "many.npy", np.ones((MAX_SEQUENCES + 5, 3), np.int64))
    assert len(load_token_file(tmp_path / "many.npy", 20, 8)) == MAX_SEQUENCES


@pytest.mark.parametrize(
    ("name", "write", "message"),
    [
        ("missing.npy", None, "no such file"),
        ("f.npy", lambda p: np.save(p, np.ones(4, np.float32)), "must be integers"),
        ("big.npy", lambda p: np.save(p, np.array([1, 99])), r"outside the vocabulary \[0, 20\)"),
        (
            "obj.npy",
            lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True),
            "not a readable",
        ),
        ("short.txt", lambda p: p.write_text("5\n"), "no sequence of 2 or more"),
        ("bad.txt", lambda p: p.write_text("1,2,x\n"), "line"),
        ("x.csv", lambda p: p.write_text("1,2"), "expected a .npy, .npz or .txt"),
        ("cube.npy", lambda p: np.save(p, np.ones((2, 2, 2), np.int64)), "1-D or 2-D"),
    ],
)
def test_bad_token_files_name_the_file(tmp_path, name, write, message):
    path = tmp_path / name
    if write:
        write(path)
    with pytest.raises(ConfigError, match=message) as info:
        load_token_file(path, 20, 8)
    assert str(path) in str(info.value)
