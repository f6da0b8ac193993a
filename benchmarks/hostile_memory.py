"""Peak memory, time and outcome of `python -m slimship` on the worst hostile input of each class.

    PYTHONPATH=. python benchmarks/hostile_memory.py [--code ROOT] [--cap-gib 4] [--only NAME ...]

Each case builds its file (tests/hostile_files.py) and runs the command in a child process whose address
space is capped (`--cap-gib`, so a regression cannot take the machine down) with `--code ROOT` first on its
PYTHONPATH (e.g. a checkout of main for the figures before a fix). Prints one row per case: exit status,
peak RSS of the child (ru_maxrss from wait4), seconds, and the first `slimship:` line of stderr.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import hostile_files as hf  # noqa: E402


def cases(tmp: Path) -> dict[str, tuple[Callable[[], None], list[str]]]:
    onnx = tmp / "ok.onnx"
    pt2 = tmp / "tiny.pt2"
    prepare_base = [lambda: hf.onnx_identity(onnx, [1, 4]), lambda: hf.tiny_pt2(pt2)]
    for step in prepare_base:
        step()
    bench = ["bench", "--runs", "1", "--warmup", "0"]
    slim = ["slim", "--out", str(tmp / "out.pt2")]
    return {
        "onnx input [1,20000,32768]": (
            lambda: hf.onnx_identity(tmp / "a.onnx", [1, 20000, 32768]),
            [*bench, "a.onnx"],
        ),
        "onnx input [1,2^20,2^20]": (
            lambda: hf.onnx_identity(tmp / "b.onnx", [1, 2**20, 2**20]),
            [*bench, "b.onnx"],
        ),
        "npz deflate bomb 1 GiB": (
            lambda: hf.npz_bomb(tmp / "bomb.npz", 1 << 30),
            [*bench, "ok.onnx", "--inputs", "bomb.npz"],
        ),
        "npz header 2^40 rows": (
            lambda: hf.npz_declaring(tmp / "rows.npz", (2**40, 4), data=bytes(256)),
            [*bench, "ok.onnx", "--inputs", "rows.npz"],
        ),
        "pt2 input [40000,40000]": (
            lambda: hf.pt2_input_shape(pt2, tmp / "c.pt2", [40000, 40000]),
            [*slim, "c.pt2"],
        ),
        "pt2 aten.full [40000,40000]": (
            lambda: hf.pt2_full(pt2, tmp / "d.pt2", [40000, 40000]),
            [*slim, "d.pt2"],
        ),
        "pt2 weight stride 0 [187500000,4]": (
            lambda: hf.pt2_weight(pt2, tmp / "e.pt2", "lin.weight", [187500000, 4], [0, 1]),
            [*slim, "e.pt2"],
        ),
        "pt2 100k nested brackets": (lambda: hf.pt2_nested(pt2, tmp / "f.pt2", 100_000), [*slim, "f.pt2"]),
        "pt2 200k relu nodes": (lambda: hf.pt2_many_nodes(pt2, tmp / "g.pt2", 200_000), [*slim, "g.pt2"]),
        "1 KB garbage .pte": (lambda: hf.garbage(tmp / "h.pte"), [*bench, "h.pte"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--code", type=Path, default=ROOT, help="source tree the child imports slimship from")
    parser.add_argument("--cap-gib", type=float, default=4.0, help="address-space cap of each child")
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--only", nargs="*", default=None, help="substrings of the case names to run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        table = cases(tmp)
        print(f"code: {args.code}  cap: {args.cap_gib} GiB")
        print(f"{'case':36} {'exit':>4} {'peak MiB':>9} {'s':>6}  message")
        for case, (build, argv) in table.items():
            if args.only and not any(o in case for o in args.only):
                continue
            build()
            cap = int(args.cap_gib * (1 << 30))
            row = hf.run_slimship(argv, tmp, tmp / "stderr.txt", args.code, cap, args.timeout)
            print(f"{case:36} {row.exit:>4} {row.peak_mib:>9.0f} {row.seconds:>6.1f}  {row.message()[:160]}")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
