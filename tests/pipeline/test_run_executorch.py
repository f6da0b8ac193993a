"""The pipeline on the format registry: ExecuTorch formats from the config through export, bench (with a
per-layer profile), release and verify's re-run of each .pte with its own precision's bound."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from slimship import zero_random_groups
from slimship.cli import main
from slimship.compare import REL_BOUNDS
from slimship.errors import ConfigError, TargetError
from slimship.exporters.registry import FORMATS
from slimship.models import lenet5
from slimship.pipeline.bench import runs_on
from slimship.pipeline.config import validate
from slimship.pipeline.gates import QUANTISED_FORMATS
from slimship.pipeline.verify import executorch_precision, verify_bundle
from slimship.runtimes.targets import get_target


def half_zeroed_lenet() -> torch.nn.Module:
    """LeNet-5 with half of its channel groups zeroed, so slimming removes them."""
    model = lenet5(seed=0).eval()
    zero_random_groups(model, (torch.randn(2, 1, 8, 8),), fraction=0.5, seed=0)
    return model


@pytest.mark.slow  # ~80 s of CPU: three exports of dense and slim, the profile, verify
def test_executorch_formats_run_through_export_bench_profile_release_and_verify(tmp_path, capsys) -> None:
    pytest.importorskip("executorch.runtime")
    config = {
        "model": {"factory": f"{__name__}:half_zeroed_lenet", "input_shape": [1, 8, 8]},
        "export": {"formats": ["onnx", "executorch-fp32", "executorch-int8"]},
        "targets": ["mobile-1t"],
        "bench": {"runs": 3, "warmup": 1, "profile": True},
        "gates": {"max_accuracy_drop": None, "min_agreement": None},
        "release": {"name": "lenet-et", "version": "0.1.0", "out": str(tmp_path / "artifacts")},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 0
    bundle = tmp_path / "artifacts" / "lenet-et-0.1.0"
    manifest = json.loads((bundle / "manifest.json").read_text())
    pte = {f["role"]: f for f in manifest["files"] if f["path"].endswith(".pte")}
    assert set(pte) == {"executorch-fp32", "executorch-int8"}
    assert {f["format"] for f in pte.values()} == {"executorch"}
    checks = verify_bundle(bundle).parity
    assert checks["executorch-fp32"].ok and checks["executorch-fp32"].precision == "fp32"
    assert checks["executorch-int8"].ok and checks["executorch-int8"].rel_bound == REL_BOUNDS["int8"]
    page = (bundle / "report.html").read_text()
    assert 'id="plot-extra-per-layer-profile-mobile-1t-onnx"' in page
    assert 'id="plot-extra-per-layer-profile-mobile-1t-executorch-fp32"' in page


def test_a_pte_precision_comes_from_its_role_or_name_else_the_strict_bound() -> None:
    assert executorch_precision(Path("models/executorch-int8.pte")) == "int8"
    assert executorch_precision(Path("models/executorch-fp32.pte")) == "fp32"
    assert executorch_precision(Path("slim.int8.pte")) == "int8"
    assert executorch_precision(Path("models/whatever.pte")) == "fp32"  # unknown: fp32, the tightest


def test_config_takes_every_registry_format_and_align_runtime() -> None:
    base = {"model": {"factory": "slimship.models:lenet5", "input_shape": [1, 8, 8]}}
    one_pass = [name for name, record in FORMATS.items() if record.task is None]
    config = validate(base | {"export": {"formats": one_pass}, "slim": {"align_runtime": "executorch"},
                              "bench": {"profile": True}})  # fmt: skip
    assert config.export.formats == one_pass and config.bench.profile
    with pytest.raises(ConfigError, match="executorch-fp32"):  # the message lists the registry's names
        validate(base | {"export": {"formats": ["coreml"]}})
    with pytest.raises(ConfigError, match="executorch-8da4w"):  # a decoder's KV-cache format: not a run's
        validate(base | {"export": {"formats": ["executorch-8da4w"]}})


def test_quantised_gate_and_bench_filter_read_the_registry() -> None:
    assert "executorch-int8" in QUANTISED_FORMATS and "executorch-fp32" not in QUANTISED_FORMATS
    int8, local = get_target("edge-int8"), get_target("mobile-1t")  # edge-int8: LiteRT, int8
    assert [f for f in FORMATS if runs_on(int8, f)] == ["tflite-int8"]
    assert [f for f in FORMATS if runs_on(local, f)] == list(FORMATS)
    assert [f for f in FORMATS if runs_on(local.with_overrides(runtime="executorch"), f)] == [
        "executorch-fp32", "executorch-int8", "executorch-8da4w",
    ]  # fmt: skip


def test_executorch_on_the_emulated_arm64_target_is_refused_with_the_reason() -> None:
    target = get_target("arm64-emu-litert").with_overrides(runtime="executorch")
    with pytest.raises(TargetError, match="ExecuTorch is not provisioned on the emulated ARM64 target"):
        runs_on(target, "executorch-fp32")
    assert not any(runs_on(get_target("arm64-emu-litert"), f) for f in ("onnx", "executorch-fp32"))
