"""`bench --task text-generation`: each file's memory figure does not depend on the files beside it or their
order, and every figure is labelled with the run's target."""

from __future__ import annotations

import json
import subprocess
import sys


def _bench(*argv: str) -> dict:
    """The CLI in a fresh process (this one's runtimes are warm from the export)."""
    run = subprocess.run(
        [sys.executable, "-m", "slimship", "bench", "--task", "text-generation", *argv, "--prompt-len", "6",
         "--new-tokens", "4", "--runs", "2", "--warmup", "1", "--target", "mobile-1t", "--json", "-"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_decode_memory_is_per_file_whatever_the_order_and_labelled_with_the_target(tiny_onnx: dict):
    dense, slim = tiny_onnx["dense_onnx"], tiny_onnx["onnx"]  # the session's exports (conftest.py)
    dense_first = _bench(str(slim), "--dense", str(dense))
    slim_first = _bench(str(slim), str(dense))
    assert [m["model"] for m in dense_first["measurements"]] == [str(dense), str(slim)]
    assert [m["model"] for m in slim_first["measurements"]] == [str(slim), str(dense)]
    for path in (dense, slim):
        kb = [next(m["rss_kb"] for m in r["measurements"] if m["model"] == str(path))
              for r in (dense_first, slim_first)]  # fmt: skip
        assert None not in kb and min(kb) > 0, kb
        # measured first, a file used to carry the runtime's start-up (about 12 MB of onnxruntime) alone
        assert abs(kb[0] - kb[1]) <= 2048 + 0.1 * max(kb), (path.name, kb)
    for result in (dense_first, slim_first):
        assert result["target"] == "mobile-1t"
    (speedup,) = dense_first["decode_speedups"]
    assert speedup["target"] == "mobile-1t" and dense_first["prefill_speedups"][0]["target"] == "mobile-1t"
