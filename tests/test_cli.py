"""The `slimship` command end to end: stage subcommands, errors, and a full `run` (slow)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from slimship import zero_random_groups
from slimship.cli import main
from tests import pt2_tamper as tamper

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "example.yaml"


def _saved_program(tmp_path: Path) -> tuple[Path, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()
    x = torch.randn(2, 1, 8, 8)
    zero_random_groups(model, x, fraction=0.5, seed=0)
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (x,), strict=False), path)
    return path, model, x


def test_slim_subcommand_writes_a_smaller_equivalent_program(tmp_path, capsys) -> None:
    path, model, x = _saved_program(tmp_path)
    out = tmp_path / "slim.pt2"
    assert main(["slim", str(path), "--out", str(out), "--json", "-"]) == 0
    slim_module = torch.export.load(out).module()
    assert sum(p.numel() for p in slim_module.parameters()) < sum(p.numel() for p in model.parameters())
    assert torch.allclose(slim_module(x), model(x), atol=1e-5)
    report = json.loads(capsys.readouterr().out)  # stdout holds only the JSON
    assert report["out"] == str(out) and report["summary"]["flops_after"] < report["summary"]["flops_before"]
    assert main(["slim", str(path), "--out", str(tmp_path / "again.pt2")]) == 0  # without --json: short
    human = capsys.readouterr().out
    assert "params:" in human and "flops_ratio" not in human and len(human.splitlines()) < 10
    before = out.read_bytes()
    assert main(["slim", str(path), "--out", str(out)]) == 2  # never overwritten
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before


def _kept_channels(program: Path) -> list[int]:
    module = torch.export.load(program).module()
    return [int(v.shape[0]) for k, v in module.state_dict().items() if k.endswith("weight") and v.dim() == 4]


def test_slim_subcommand_rounds_kept_channels_up_to_the_multiple(tmp_path, capsys) -> None:
    path, model, x = _saved_program(tmp_path)
    plain, aligned = tmp_path / "plain.pt2", tmp_path / "aligned.pt2"
    assert main(["slim", str(path), "--out", str(plain)]) == 0
    assert main(["slim", str(path), "--out", str(aligned), "--channel-multiple", "6"]) == 0
    assert _kept_channels(plain) == [8, 8]  # half of each 16-channel conv zeroed
    assert _kept_channels(aligned) == [12, 12]
    assert torch.allclose(torch.export.load(aligned).module()(x), model(x), atol=1e-5)
    assert main(["slim", str(path), "--out", str(tmp_path / "zero.pt2"), "--channel-multiple", "0"]) == 2
    assert "--channel-multiple is '0'" in capsys.readouterr().err


def test_slim_subcommand_measures_the_multiple_on_a_target(tmp_path, capsys) -> None:
    path, model, x = _saved_program(tmp_path)
    out = tmp_path / "auto.pt2"
    assert main(["slim", str(path), "--out", str(out), "--channel-multiple", "auto", "--target", "host"]) == 0
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if ln.startswith("note: channel alignment"))
    assert "conv:" in line and "linear:" in line  # the op kinds the model contains, each measured
    chosen = line.rsplit("-> ", 1)[1]
    kept = _kept_channels(out)
    assert (chosen == "none" and kept == [8, 8]) or all(k % int(chosen) == 0 or k == 16 for k in kept)
    assert torch.allclose(torch.export.load(out).module()(x), model(x), atol=1e-5)


def test_corrupt_model_file_gives_a_clear_error(tmp_path, capsys) -> None:
    bad = tmp_path / "broken.pt2"
    bad.write_bytes(b"not a zip archive")
    assert main(["slim", str(bad), "--out", str(tmp_path / "x.pt2")]) == 2
    err = capsys.readouterr().err
    assert "broken.pt2" in err and "not a readable torch.export program" in err
    assert main(["slim", str(tmp_path / "missing.pt2"), "--out", str(tmp_path / "x.pt2")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_config_error_exits_2_with_the_key_path(tmp_path, capsys) -> None:
    config = yaml.safe_load(CONFIG.read_text())
    config["export"]["formats"] = ["onnx", "coreml"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 2
    assert "'export.formats'" in capsys.readouterr().err


def test_auto_alignment_on_an_emulated_first_target_is_refused_before_any_work(tmp_path, capsys) -> None:
    config = yaml.safe_load(CONFIG.read_text())
    config["slim"]["channel_multiple"] = "auto"
    config["targets"] = ["arm64-emu-litert", "mobile-1t"]
    path = tmp_path / "auto.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "'slim.channel_multiple'" in err and "arm64-emu-litert" in err and "emulated" in err
    # a user target from targets_file is resolved and refused the same way, before any training
    (tmp_path / "targets.yaml").write_text(yaml.safe_dump({"targets": {"board-emu": {"emulated": True}}}))
    config["targets_file"] = str(tmp_path / "targets.yaml")
    config["targets"] = ["board-emu"]
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 2
    captured = capsys.readouterr()
    assert "'board-emu' is emulated" in captured.err and "train dense model" not in captured.out
    config["slim"]["channel_multiple"] = 0
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 2
    assert "'slim.channel_multiple' is 0" in capsys.readouterr().err


def test_run_with_auto_alignment_records_the_measured_multiple(tmp_path) -> None:
    config = yaml.safe_load(CONFIG.read_text())
    config["train"]["epochs"] = 1
    config["compress"]["options"] = {"target": 0.5, "epochs": 2}
    config["slim"]["channel_multiple"] = "auto"
    config["export"]["formats"] = ["onnx"]
    config["targets"] = ["host"]
    _, bundle, manifest = _run_config(config, tmp_path)
    slimming = manifest["slimming"]
    alignment = slimming["alignment"]
    assert alignment["target"] == "host" and alignment["runtime"] == "onnxruntime"
    assert set(alignment["per_kind"]) == {"conv", "linear"}  # LeNet-5's op kinds, each swept
    multiple = slimming["channel_multiple"]
    assert multiple == alignment["multiple"]
    whole = alignment["whole_model"]  # the proposed multiples are tried on the whole model
    assert (whole is None) == (not alignment["candidates"])
    if whole is not None:
        tried = {int(m): v["speedup"] for m, v in whole["aligned"].items()}
        assert set(tried) == set(alignment["candidates"]) and whole["exact_p50_ms"] > 0
        fastest = max(tried, key=tried.get)
        assert multiple == (fastest if tried[fastest] >= 1.0 else None)
        assert whole["kept"] == (f"aligned-{multiple}" if multiple else "exact")
    else:
        assert multiple is None
    kept = [(v["channels_before"], v["channels_kept"]) for v in slimming["per_layer"].values()]
    assert any(k < b for b, k in kept) and slimming["flops_after"] < slimming["flops_before"]
    card = (bundle / "MODEL_CARD.md").read_text()
    assert "target `host` (onnxruntime)" in card
    if multiple:
        assert all(k % multiple == 0 or k == b for b, k in kept)
        assert f"multiples of {multiple}" in card
    assert main(["verify", str(bundle)]) == 0


def _run_config(config: dict, tmp_path: Path) -> tuple[Path, Path, dict]:
    """`slimship run` on `config` (short bench, release under tmp_path): config path, bundle, manifest."""
    config["bench"] = {"runs": 3, "warmup": 1}
    config["release"]["out"] = str(tmp_path / "artifacts")
    # these short trainings test stages, not accuracy: the gates are off (tests/pipeline/test_gates.py)
    config["gates"] = {"max_accuracy_drop": None, "min_agreement": None}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 0
    bundle = tmp_path / "artifacts" / f"{config['release']['name']}-{config['release']['version']}"
    return path, bundle, json.loads((bundle / "manifest.json").read_text())


def test_run_with_lorita_factorizes_in_the_slim_stage(tmp_path) -> None:
    config = yaml.safe_load(CONFIG.read_text())
    config["model"] = {"factory": "slimship.models:digits_mlp", "kwargs": {}, "input_shape": [1, 8, 8]}
    config["train"] = None
    config["compress"] = {"method": "lorita", "options": {"epochs": 2, "energy": 0.6, "min_saving": 0.25}}
    config["export"]["formats"] = ["onnx"]
    _, bundle, manifest = _run_config(config, tmp_path)
    assert manifest["slimming"]["flops_after"] < manifest["slimming"]["flops_before"]
    assert manifest["slimming"]["params_after"] < manifest["slimming"]["params_before"]
    assert main(["verify", str(bundle)]) == 0


def test_run_with_adc_reports_its_search(tmp_path) -> None:
    config = yaml.safe_load(CONFIG.read_text())
    config["train"]["epochs"] = 1
    options = {"episodes": 4, "warmup_episodes": 2, "target_flops_kept": 0.5, "finetune_epochs": 1}
    config["compress"] = {"method": "adc", "options": options}
    config["export"]["formats"] = ["onnx"]
    _, bundle, manifest = _run_config(config, tmp_path)
    assert manifest["slimming"]["flops_after"] < manifest["slimming"]["flops_before"]
    page = (bundle / "report.html").read_text()
    assert 'id="plot-extra-adc-search-reward"' in page and 'id="plot-extra-adc-policy"' in page


@pytest.mark.slow
def test_run_config_writes_a_verified_release(tmp_path, capsys) -> None:
    config = yaml.safe_load(CONFIG.read_text())
    config["train"]["epochs"] = 1
    config["compress"]["options"] = {"target": 0.5, "epochs": 2}
    path, bundle, manifest = _run_config(config, tmp_path)
    names = {f["path"] for f in manifest["files"]}
    assert any(n.endswith(".onnx") for n in names) and any(n.endswith(".tflite") for n in names)
    assert manifest["slimming"]["flops_after"] < manifest["slimming"]["flops_before"]
    assert main(["verify", str(bundle)]) == 0
    # the same version again is refused and the existing bundle is untouched
    before = (bundle / "manifest.json").read_bytes()
    assert main(["run", str(path)]) == 2
    assert "exists" in capsys.readouterr().err
    assert (bundle / "manifest.json").read_bytes() == before


@pytest.mark.slow
def test_arm64_emulated_rows_are_labelled_and_kept_apart(tmp_path, capsys) -> None:
    config = yaml.safe_load((CONFIG.parent / "arm64-emu.yaml").read_text())
    config["train"]["epochs"] = 1
    config["compress"]["options"] = {"target": 0.5, "epochs": 2}
    config["bench"] = {"runs": 3, "warmup": 1}
    config["release"]["out"] = str(tmp_path / "artifacts")
    config["gates"] = {"max_accuracy_drop": None, "min_agreement": None}  # a short training: stages only
    path = tmp_path / "arm.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "emulated ARM64: parity only" in out
    manifest = json.loads((tmp_path / "artifacts" / "lenet5-arm64-0.1.0" / "manifest.json").read_text())
    text = json.dumps(manifest)
    for runtime in ("litert", "tflite-runtime", "onnxruntime"):
        assert f"@arm64-emu-{runtime}" in text
    assert not any("arm64" in key for key in manifest["latency"]["device"])  # never as a device timing
    assert sum("arm64" in key for key in manifest["latency"]["emulated"]) == 3
    for key, entry in manifest["accuracy"].items():
        if "arm64" in key:
            assert entry["max_abs_diff"] < 1e-4


# ------------------------------------------------------------------ .pt2 files from disk (safe loading)


def _saved_dynamic_program(tmp_path: Path) -> tuple[Path, nn.Module]:
    """A zero-grouped CNN exported with a dynamic batch (1..64) and saved to disk."""
    path, model, x = _saved_program(tmp_path)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},), strict=False)
    torch.export.save(program, path)
    return path, model


def test_slim_and_export_keep_the_dynamic_batch_of_a_pt2_from_disk(tmp_path, capsys) -> None:
    path, model = _saved_dynamic_program(tmp_path)
    slim_path = tmp_path / "slim.pt2"
    assert main(["slim", str(path), "--out", str(slim_path)]) == 0
    assert "example inputs from the graph" in capsys.readouterr().err
    slim_module = torch.export.load(slim_path).module()
    assert sum(p.numel() for p in slim_module.parameters()) < sum(p.numel() for p in model.parameters())
    for batch in (1, 5):  # the dynamic batch survives slimming
        x = torch.randn(batch, 1, 8, 8)
        assert torch.allclose(slim_module(x), model(x), atol=1e-5)
    assert main(["export", str(slim_path), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    assert (tmp_path / "onnx" / "slim.onnx").is_file()  # release and verify: see the swapped-model test


HOSTILE = {
    "sample-inputs": lambda src, dst, marker: tamper.hostile_sample_inputs(
        src, dst, marker, (torch.randn(2, 1, 8, 8),)
    ),
    "weight": tamper.hostile_weight,
    "expression": tamper.hostile_expression,
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_pt2_is_refused_by_every_command_without_running_code(tmp_path, capsys, kind) -> None:
    path, _ = _saved_dynamic_program(tmp_path)
    marker = tmp_path / "pwned"
    hostile = HOSTILE[kind](path, tmp_path / "hostile.pt2", marker)
    commands = {
        "slim": ["--out", str(tmp_path / "slim.pt2")],
        "export": ["--format", "onnx", "--out", str(tmp_path / "exported")],
        "release": ["--name", "x", "--version", "1.0.0", "--out", str(tmp_path / "artifacts")],
    }
    for command, extra in commands.items():
        assert main([command, str(hostile), *extra]) == 2, command
        err = capsys.readouterr().err
        assert err.startswith("slimship: error:") and "hostile.pt2" in err
        assert kind == "expression" or "--allow-pickle" in err
        assert not marker.exists(), command
    assert not (tmp_path / "slim.pt2").exists() and not (tmp_path / "artifacts").exists()


def test_allow_pickle_opts_in_to_the_stored_sample_inputs(tmp_path, capsys) -> None:
    path, model = _saved_dynamic_program(tmp_path)
    marker = tmp_path / "pwned"
    stored = torch.randn(3, 1, 8, 8)
    hostile = tamper.hostile_sample_inputs(path, tmp_path / "trusted.pt2", marker, (stored,))
    out = tmp_path / "slim.pt2"
    assert main(["slim", str(hostile), "--out", str(out), "--allow-pickle"]) == 0
    assert marker.exists()  # the user consented: torch's loader unpickled the sample inputs
    assert "synthesized" not in capsys.readouterr().err
    assert torch.allclose(torch.export.load(out).module()(stored), model(stored), atol=1e-5)


def _swap_model(bundle: Path, replacement: Path) -> None:
    """Replace the bundle's model.pt2 and recompute its manifest checksum, as an attacker would."""
    from slimship._util import sha256_file

    target = bundle / "model.pt2"
    target.write_bytes(replacement.read_bytes())
    manifest = json.loads((bundle / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["path"] == "model.pt2":
            entry["sha256"], entry["bytes"] = sha256_file(target), target.stat().st_size
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def test_release_from_disk_verifies_and_verify_never_runs_code_from_a_swapped_model(tmp_path, capsys) -> None:
    path, _ = _saved_dynamic_program(tmp_path)
    out = tmp_path / "artifacts"
    assert main(["release", str(path), "--name", "cnn", "--version", "1.0.0", "--out", str(out)]) == 0
    bundle = out / "cnn-1.0.0"
    capsys.readouterr()
    assert main(["verify", str(out / "cnn-1.0.0.tar.gz")]) == 0  # the release of a .pt2 from disk verifies
    report = json.loads(capsys.readouterr().out)
    assert report["parity"]["pt2"]["ok"] and report["parity"]["onnx"]["ok"] and report["parity_skipped"] == {}
    released = tmp_path / "released.pt2"
    released.write_bytes((bundle / "model.pt2").read_bytes())
    marker = tmp_path / "pwned"

    _swap_model(
        bundle, tamper.hostile_sample_inputs(released, tmp_path / "a.pt2", marker, (torch.ones(2, 1, 8, 8),))
    )
    assert main(["verify", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert "model.pt2" in err and "sample inputs would import" in err
    assert not marker.exists()

    _swap_model(bundle, tamper.hostile_weight(released, tmp_path / "b.pt2", marker))
    assert main(["verify", str(bundle)]) == 0  # everything else still checked; the pt2 parity is skipped
    report = json.loads(capsys.readouterr().out)
    assert "pt2" not in report["parity"] and "onnx" in report["parity"]
    assert "model.pt2 needs unpickling" in report["parity_skipped"]["pt2"]
    assert not marker.exists()


def test_batch_zero_example_is_refused(tmp_path, capsys) -> None:
    path = tmp_path / "empty.pt2"
    _, model, _ = _saved_program(tmp_path)
    torch.export.save(torch.export.export(model, (torch.randn(0, 1, 8, 8),), strict=False), path)
    assert main(["export", str(path), "--out", str(tmp_path / "x")]) == 2
    assert "batch 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_release_is_byte_identical_across_processes(tmp_path) -> None:
    path, _ = _saved_dynamic_program(tmp_path)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    digests = []
    for run in ("one", "two"):
        out = tmp_path / run
        code = "import sys; from slimship.cli import main; sys.exit(main(sys.argv[1:]))"
        args = ["release", str(path), "--name", "cnn", "--version", "1.0.0", "--out", str(out)]
        done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        digests.append(hashlib.sha256((out / "cnn-1.0.0.tar.gz").read_bytes()).hexdigest())
    print(f"release tarball sha256 in two processes: {digests}")
    assert digests[0] == digests[1], f"tarball sha256 differs across processes: {digests}"


# ------------------------------------------------------------------------------------------ new-user CLI


def tiny_factory() -> nn.Module:
    """A factory for --model (tests.test_cli:tiny_factory): 3x12x12 input, 4 classes."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)
    )


@pytest.mark.slow
def test_executorch_export_bench_profile_and_no_overwrite(tmp_path, capsys) -> None:
    """Issue #17's path: export both ExecuTorch formats (int8 without --calibration: random batches, said and
    recorded), bench the .pte files against the dense .pt2 with a per-layer profile, never overwrite."""
    path, _, _ = _saved_program(tmp_path)
    slim_path, out = tmp_path / "slim.pt2", tmp_path / "d"
    assert main(["slim", str(path), "--out", str(slim_path)]) == 0
    capsys.readouterr()
    args = ["export", str(slim_path), "--format", "executorch-fp32", "executorch-int8", "--out", str(out)]
    assert main([*args, "--json", "-"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert "no --calibration given" in captured.err and "random inputs" in report["calibration"]["source"]
    listed = sorted(p.name for p in out.iterdir())
    assert listed == ["slim.fp32.pte", "slim.int8.pte", "slimship-exports.json"]
    assert all(row["parity"]["passed"] for row in report["formats"])
    before = (out / "slim.fp32.pte").read_bytes()
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert (out / "slim.fp32.pte").read_bytes() == before
    bench = ["bench", str(out / "slim.fp32.pte"), "--dense", str(path), "--target", "mobile-1t"]
    assert main([*bench, "--runs", "5", "--profile", "--json", "-"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = [row for profile in result["profiles"] for row in profile["rows"]]
    assert any(row["layer"].startswith("Convolution") for row in rows), result["profiles"]


def test_export_calibrates_int8_on_the_given_samples_and_records_them(tmp_path, capsys) -> None:
    import numpy as np

    path, _model, _x = _saved_program(tmp_path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, in0=np.random.default_rng(0).standard_normal((6, 1, 8, 8)).astype(np.float32))
    out = tmp_path / "exported"
    args = ["export", str(path), "--format", "tflite-int8", "--calibration", str(calib), "--out", str(out)]
    assert main([*args, "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["calibration"] == {"samples": 6, "source": str(calib)}
    (row,) = report["formats"]
    assert row["calibration_batches"] == 3  # the program's static batch is 2: 3 batches of 2 samples
    assert Path(row["path"]) == out / "model.int8.tflite"
    assert (out / "model.int8.tflite").is_file() and report["seconds"]["export tflite-int8"] > 0


def test_export_and_slim_take_a_factory_with_weights(tmp_path, capsys) -> None:
    from safetensors.torch import save_file

    reference = tiny_factory()
    with torch.no_grad():
        reference[0].weight.mul_(3.0)  # differs from what the factory builds: the weights must be applied
    weights = {"safetensors": tmp_path / "w.safetensors", "pt": tmp_path / "w.pt"}
    save_file(reference.state_dict(), weights["safetensors"])
    torch.save(reference.state_dict(), weights["pt"])
    x = torch.randn(1, 3, 12, 12)
    for kind, file in weights.items():
        out = tmp_path / kind
        args = [
            "export",
            "--model",
            "tests.test_cli:tiny_factory",
            "--weights",
            str(file),
            "--input-shape",
            "3",
            "12",
            "12",
            "--format",
            "onnx",
            "--out",
            str(out),
        ]
        assert main(args) == 0, capsys.readouterr().err
        import onnxruntime as ort

        session = ort.InferenceSession(str(out / "tiny_factory.onnx"))
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert torch.allclose(torch.from_numpy(got), reference(x), atol=1e-5)
    slim_out = tmp_path / "slim.pt2"
    assert (
        main(
            [
                "slim",
                "--model",
                "tests.test_cli:tiny_factory",
                "--input-shape",
                "3",
                "12",
                "12",
                "--out",
                str(slim_out),
            ]
        )
        == 0
    )
    assert torch.allclose(torch.export.load(slim_out).module()(x), tiny_factory()(x), atol=1e-5)


def test_a_model_given_twice_or_not_at_all_is_refused(tmp_path, capsys) -> None:
    path, _, _ = _saved_program(tmp_path)
    assert (
        main(["slim", str(path), "--model", "tests.test_cli:tiny_factory", "--out", str(tmp_path / "s")]) == 2
    )
    assert "not both" in capsys.readouterr().err
    assert main(["slim", "--out", str(tmp_path / "s.pt2")]) == 2
    assert "no model given" in capsys.readouterr().err
    assert main(["slim", "--model", "tests.test_cli:tiny_factory", "--out", str(tmp_path / "s.pt2")]) == 2
    assert "give --input-shape" in capsys.readouterr().err
    assert not list(tmp_path.glob("s*"))


def test_bench_reads_input_shapes_from_the_model_file(tmp_path, capsys) -> None:
    from slimship.exporters import export_onnx

    model = tiny_factory().eval()
    path = tmp_path / "m.onnx"
    export_onnx(model, (torch.randn(2, 3, 12, 12),), path)  # dynamic batch
    assert main(["bench", str(path), "--runs", "2", "--warmup", "0", "--json", "-"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert len(result["measurements"]) == 1
    assert "input [1, 3, 12, 12] float32" in captured.err  # shape from the file, dynamic batch -> 1
    assert "batch is dynamic" in captured.err
    # an override the file's fixed dims cannot take is refused before running, naming the file
    assert main(["bench", str(path), "--runs", "1", "--warmup", "0", "--input-shape", "3", "10", "10"]) == 2
    err = capsys.readouterr().err
    assert f"slimship: error: random inputs of --input-shape / {path}" in err and "[1, 3, 10, 10]" in err


def test_tables_are_not_cut_when_stdout_is_not_a_terminal(tmp_path) -> None:
    from slimship.exporters import export_onnx

    path = tmp_path / ("a-rather-long-model-file-name-that-would-not-fit-in-eighty-columns" * 2 + ".onnx")
    export_onnx(tiny_factory().eval(), (torch.randn(2, 3, 12, 12),), path)
    run = subprocess.run(
        [sys.executable, "-m", "slimship", "bench", str(path), "--runs", "1", "--warmup", "0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert path.name in run.stdout and "…" not in run.stdout
    assert "Created TensorFlow Lite" not in run.stderr and "Failed to load" not in run.stderr


def test_targets_lists_builtin_and_user_targets(tmp_path, capsys) -> None:
    targets = tmp_path / "targets.yaml"
    targets.write_text("targets:\n  board: {base: mobile-1t, description: my board}\n")
    assert main(["targets", "--targets-file", str(targets), "--json", "-"]) == 0
    listed = {t["name"]: t for t in json.loads(capsys.readouterr().out)}
    from slimship.runtimes.targets import BUILTIN_TARGETS

    assert set(BUILTIN_TARGETS) < set(listed)
    assert listed["board"]["threads"] == 1 and listed["board"]["affinity"] == [0]
    assert listed["board"]["from"] == str(targets) and listed["board"]["description"] == "my board"
    assert main(["targets"]) == 0
    assert "arm64-emu-litert" in capsys.readouterr().out


def _option_help(text: str, option: str) -> str:
    """The help block of `option` in `--help` text (its line and the indented lines below it)."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith(option))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("-")), len(lines))
    return " ".join(ln.strip() for ln in lines[start:end])


def test_every_option_has_help_with_its_default_and_every_command_an_example(monkeypatch) -> None:
    from slimship.cli import build_parser

    monkeypatch.setenv("COLUMNS", "10000")  # one line per option

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in commands.items():
        assert sub.epilog and sub.epilog.startswith("example:\n  slimship " + name), name
        text = sub.format_help()
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"
                if action.default not in (None, False, argparse.SUPPRESS):
                    line = _option_help(text, action.option_strings[-1])
                    assert f"(default: {action.default})" in line, f"{name} {action.option_strings}"
        assert "--json" in text


def test_console_drops_third_party_logs_and_native_log_lines_but_keeps_ours(capsys) -> None:
    import io
    import logging

    from slimship._console import _DropNativeLogLines, setup_logging

    setup_logging(verbose=False)
    try:
        logging.getLogger("torchao").warning("Failed to load _C.so")
        logging.warning("Your model is converted in training mode")  # litert-torch logs on the root logger
        logging.getLogger("slimship.exporters").warning("static batch of 1 instead")
        err = capsys.readouterr().err
        assert "Failed to load" not in err and "training mode" not in err and "static batch of 1" in err
        setup_logging(verbose=True)
        logging.getLogger("torchao").error("Failed to load _C.so")
        logging.warning("Your model is converted in training mode")
        err = capsys.readouterr().err
        assert "Failed to load" in err and "training mode" in err
    finally:
        setup_logging(verbose=False)
    target = io.StringIO()
    stream = _DropNativeLogLines(target, native_fd=2)
    for piece in [
        "[",
        "cpuinfo_utils.cpp",
        ":",
        "71",
        "] ",
        "Reading file",
        "\n",
        "✓ export (1 s)\n",
        "\r⠋ spin",
    ]:
        stream.write(piece)
        stream.flush()  # bindings flush after every piece
    assert target.getvalue() == "✓ export (1 s)\n\r⠋ spin"


def test_input_specs_are_read_from_every_kind_of_model_file(tmp_path) -> None:
    from slimship.exporters.executorch_export import executorch_available, export_executorch
    from slimship.sources import input_specs, random_inputs

    path, _ = _saved_dynamic_program(tmp_path)
    (spec,) = input_specs(path)
    assert isinstance(spec.shape[0], str) and spec.shape[1:] == [1, 8, 8] and spec.dtype == "float32"
    arrays, notes = random_inputs([spec])
    assert arrays[0].shape == (1, 1, 8, 8) and "batch is dynamic" in notes[0]
    if not executorch_available():
        pytest.skip("executorch not installed")
    pte = tmp_path / "m.pte"
    export_executorch(tiny_factory().eval(), (torch.randn(2, 3, 12, 12),), pte)
    (spec,) = input_specs(pte)
    assert spec.shape[0].startswith("batch<=") and spec.shape[1:] == [3, 12, 12] and spec.dtype == "float32"


def test_run_with_json_to_stdout_prints_only_the_json(tmp_path, capsys) -> None:
    config = {
        "model": {"factory": "tests.runtimes.test_zero_flops:reshape_only", "input_shape": [1, 4, 4]},
        "export": {"formats": ["onnx"]},
        "targets": ["host"],
        "bench": {"runs": 3, "warmup": 1},
        "release": {"name": "flat", "version": "0.1.0", "out": str(tmp_path / "out")},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path), "--json", "-"]) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # the summary table went to stderr
    assert Path(result["release_dir"]) == tmp_path / "out" / "flat-0.1.0" and "FLOPs" in captured.err
