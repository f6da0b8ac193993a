"""Hostile inputs, one row per class: the smallest file that triggers it, generated here, run through
`python -m slimship` in a child process: exit 2, a `slimship: error:` line naming the cause, within 60 s and
2 GiB of peak memory (ru_maxrss of the child, read with wait4), and nothing left behind in its folder."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import hostile_files as hf

ROOT = Path(__file__).resolve().parents[1]
PEAK_LIMIT_MIB = 2048
SECONDS = 60
CAP = 6 << 30  # address-space cap of the child: a regression fails the test instead of the machine
BENCH = ["bench", "--runs", "1", "--warmup", "0"]


def run_slimship(argv: list[str], cwd: Path, stderr: Path) -> hf.Outcome:
    return hf.run_slimship(argv, cwd, stderr, ROOT, CAP, SECONDS * 2)


@dataclass
class Case:
    build: Callable[[Path, dict[str, Path]], list[str]]  # writes the hostile file(s) into a folder: argv
    message: str  # regex the `slimship: error:` line must match


def _onnx(dims: list[int], elem_type: int = 1) -> Callable[[Path, dict[str, Path]], list[str]]:
    return lambda d, base: [*BENCH, str(hf.onnx_identity(d / "m.onnx", dims, elem_type))]


def _npz_case(make: Callable[[Path], Path], *options: str) -> Callable[[Path, dict[str, Path]], list[str]]:
    return lambda d, base: [*options, *BENCH, str(base["onnx"]), "--inputs", str(make(d / "in.npz"))]


def _pt2_case(
    make: Callable[[Path, Path], Path], *options: str
) -> Callable[[Path, dict[str, Path]], list[str]]:
    return lambda d, base: [*options, "slim", str(make(base["pt2"], d / "m.pt2")), "--out", str(d / "o.pt2")]


BUDGET = "over the (memory|--max-memory) budget"
FEED = "which slimship cannot feed"
CASES = {
    # 1. sizes a file declares, checked against the budget before anything is allocated
    "onnx-input-8TiB": Case(
        _onnx([1, 2**20, 2**20]),
        rf"m\.onnx: input 'x' \(float32\) of shape \[1, 1048576, 1048576\] would take 4\.0 TiB.*{BUDGET}",
    ),
    "onnx-input-2.4GiB-budget-1GiB": Case(
        lambda d, base: ["--max-memory", "1GiB", *_onnx([1, 20000, 32768])(d, base)],
        r"m\.onnx: input 'x' \(float32\) of shape \[1, 20000, 32768\] would take 2\.4 GiB.*--max-memory",
    ),
    "npz-header-2^40-rows": Case(
        _npz_case(lambda p: hf.npz_declaring(p, (2**40, 4), data=bytes(256))),
        rf"in\.npz: array 'in0' \(float32\) of shape \[1099511627776, 4\] would take 16\.0 TiB.*{BUDGET}",
    ),
    "npz-deflate-bomb": Case(  # 64 MiB of zeros in a 65 KB file, refused (16 MiB budget) before inflating
        _npz_case(lambda p: hf.npz_bomb(p, 64 << 20), "--max-memory", "16MiB"),
        r"in\.npz: array 'in0' \(float32\) of shape \[16777216\] would take 64\.0 MiB.*--max-memory budget",
    ),
    "pt2-input-[40000,40000]": Case(
        _pt2_case(lambda s, d: hf.pt2_input_shape(s, d, [40000, 40000])),
        rf"m\.pt2: models/model\.json: tensor 'x' of shape \[40000, 40000\] would take 6\.0 GiB.*{BUDGET}",
    ),
    "pt2-aten.full-[40000,40000]": Case(  # the node's metadata still says [4, 4]: caught on fake tensors
        _pt2_case(lambda s, d: hf.pt2_full(s, d, [40000, 40000]), "--max-memory", "1GiB"),
        r"m\.pt2: node 'full' \(aten\.full\.default\) of shape \[40000, 40000\] would take 6\.0 GiB",
    ),
    "pt2-weight-stride-0": Case(
        _pt2_case(lambda s, d: hf.pt2_weight(s, d, "lin.weight", [187500000, 4], [0, 1])),
        r"'data/weights/weight_0' \(lin\.weight\): refusing sizes \[187500000, 4\] with strides \[0, 1\]",
    ),
    # 2. parsers that cannot recurse or run away; native loaders that cannot take the process down
    "pt2-100k-nested-brackets": Case(
        _pt2_case(lambda s, d: hf.pt2_nested(s, d, 100_000)),
        r"m\.pt2: member 'models/model\.json': nests deeper",
    ),
    "pt2-25k-nodes": Case(
        _pt2_case(lambda s, d: hf.pt2_many_nodes(s, d, 25_000)),
        r"m\.pt2: models/model\.json: the program has 25003 graph nodes, over the 20000",
    ),
    "pte-1KB-garbage": Case(
        lambda d, base: [*BENCH, str(hf.garbage(d / "m.pte"))],
        r"the executorch runtime crashed loading \S*m\.pte \(signal 6, SIGABRT\)",
    ),
    # 5. messages that name the cause
    "onnx-input-undefined-type": Case(
        _onnx([1, 4], 0), rf"m\.onnx: input 'x' has element type undefined, {FEED}"
    ),
    "onnx-input-bfloat16": Case(_onnx([1, 4], 16), rf"m\.onnx: input 'x' has element type bfloat16, {FEED}"),
    "onnx-input-string": Case(_onnx([1, 4], 8), rf"m\.onnx: input 'x' has element type string, {FEED}"),
    "pt2-weight-path-outside": Case(
        _pt2_case(lambda s, d: hf.pt2_weight(s, d, "lin.weight", [4, 4], [4, 1], "../../etc/passwd")),
        r"model_weights_config\.json \(lin\.weight\): refusing path '\.\./\.\./etc/passwd': not a plain",
    ),
    "onnx-external-data-missing": Case(
        lambda d, base: [*BENCH, str(hf.onnx_external(d / "m.onnx", "weights.bin"))],
        r"m\.onnx: initializer 'w' keeps its data in 'weights\.bin', which is missing",
    ),
    "onnx-external-data-outside": Case(
        lambda d, base: [*BENCH, str(hf.onnx_external(d / "m.onnx", "../../etc/passwd"))],
        r"m\.onnx: initializer 'w' keeps its data in '\.\./\.\./etc/passwd', which is not a relative",
    ),
    "calibration-nan": Case(
        lambda d, base: [
            "export",
            str(base["pt2"]),
            "--format",
            "tflite-int8",
            "--out",
            str(d / "x"),
            "--calibration",
            str(hf.npz_values(d / "c.npz", in0=hf.with_nan((8, 4)))),
        ],
        r"c\.npz: in0 holds 1 NaN or Inf value\(s\) \(the first at index \[3, 1\]\); int8 calibration",
    ),
    "verify-nan-tolerance": Case(
        lambda d, base: [
            "verify",
            str(hf.edited_bundle(base["bundle"], d / "b", '"tolerance": 0.0001', '"tolerance": NaN')),
        ],
        r"b/manifest\.json: holds NaN where a figure belongs",
    ),
    "verify-reference-io-bomb": Case(  # checksums agree; the array inside declares 64 MiB, 16 MiB allowed
        lambda d, base: [
            "--max-memory",
            "16MiB",
            "verify",
            str(
                hf.bundle_with_file(
                    base["bundle"], d / "b", "reference_io.npz", lambda p: hf.npz_bomb(p, 64 << 20)
                )
            ),
        ],
        r"b/reference_io\.npz: array 'in0' \(float32\) of shape \[16777216\] would take 64\.0 MiB",
    ),
    "verify-1e999-tolerance": Case(  # a valid JSON number that Python reads as inf
        lambda d, base: [
            "verify",
            str(hf.edited_bundle(base["bundle"], d / "b", '"tolerance": 0.0001', '"tolerance": 1e999')),
        ],
        r"b/manifest\.json: holds 1e999 where a figure belongs",
    ),
    "verify-name-with-newline": Case(
        lambda d, base: [
            "verify",
            str(hf.edited_bundle(base["bundle"], d / "b", '"name": "tiny"', '"name": "tiny\\n"')),
        ],
        r"b/manifest\.json: does not match the manifest schema.*",
    ),
    # 3. whole strings and sane limits
    "release-name-newline": Case(
        lambda d, base: [
            "release",
            str(base["pt2"]),
            "--name",
            "abc\n",
            "--version",
            "1.0.0",
            "--out",
            str(d),
        ],
        r"release name 'abc\\n' is invalid",
    ),
    "release-version-newline": Case(
        lambda d, base: [
            "release",
            str(base["pt2"]),
            "--name",
            "abc",
            "--version",
            "1.0.0\n",
            "--out",
            str(d),
        ],
        r"release version '1\.0\.0\\n' is invalid",
    ),
    "targets-run-timeout-nan": Case(
        lambda d, base: [
            "targets",
            "--targets-file",
            str(hf.text(d / "t.yaml", "targets:\n  t: {run_timeout: .nan}\n")),
        ],
        r"t\.yaml: targets\.t\.run_timeout: expected finite seconds",
    ),
    # 4. up-front checks that try what the run will do
    "release-out-dangling-symlink": Case(
        lambda d, base: [
            "release",
            str(base["pt2"]),
            "--name",
            "a",
            "--version",
            "1.0.0",
            "--out",
            str(hf.link(d / "l", d / "gone")),
        ],
        r"release folder \S*l: \S*l is a symlink to \S*gone, which does not exist",
    ),
    "release-out-proc": Case(
        lambda d, base: ["release", str(base["pt2"]), "--name", "a", "--version", "1.0.0", "--out", "/proc"],
        r"release folder /proc: nothing can be written in /proc",
    ),
    "run-release-out-proc": Case(
        lambda d, base: ["run", str(hf.example_config(d / "c.yaml", out="/proc"))],
        r"c\.yaml: 'release\.out' is '/proc'; nothing can be written in /proc",
    ),
    "pt2-duplicate-parameter": Case(
        _pt2_case(hf.pt2_duplicate_weight),
        r"m\.pt2: member 'data/weights/model_weights_config\.json': the key 'lin\.weight' appears twice",
    ),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("base")
    return {
        "onnx": hf.onnx_identity(root / "ok.onnx", [1, 4]),
        "pt2": hf.tiny_pt2(root / "tiny.pt2"),
        "bundle": hf.tiny_bundle(root / "releases"),
    }


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_file_is_refused_within_bounds(name: str, base: dict[str, Path], tmp_path: Path) -> None:
    case = CASES[name]
    work = tmp_path / "work"
    work.mkdir()
    argv = case.build(work, base)
    before = _listing(work)
    outcome = run_slimship(argv, work, tmp_path / "stderr.txt")
    errors = [line for line in outcome.stderr.splitlines() if line.startswith("slimship: error:")]
    assert outcome.exit == 2, outcome.stderr[-2000:]
    assert errors and re.search(case.message, errors[-1]), outcome.stderr[-2000:]
    assert "Traceback" not in outcome.stderr
    assert outcome.peak_mib < PEAK_LIMIT_MIB, f"peak {outcome.peak_mib:.0f} MiB"
    assert outcome.seconds < SECONDS, f"{outcome.seconds:.1f} s"
    assert _listing(work) == before  # nothing written, nothing left behind


def test_the_model_card_escapes_file_names() -> None:
    from slimship.pipeline.model_card import md_text

    assert md_text("<script>alert(1)</script>_x.npz") == "&lt;script&gt;alert(1)&lt;/script&gt;\\_x.npz"


def test_a_size_is_parsed_whole() -> None:
    from slimship.budget import parse_size

    assert parse_size("4GiB") == 4 << 30 and parse_size("512M") == 512 << 20 and parse_size("1000") == 1000
    for bad in ("4GiB\n", "-1", "0", "1e99GiB", "four"):
        with pytest.raises(ValueError):
            parse_size(bad)
