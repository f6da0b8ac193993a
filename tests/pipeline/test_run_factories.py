"""`slimship run` with the user's own factory modules: beside the config, from another folder; the input
shape checked with one trace before any training; int8 calibration data recorded."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from slimship.cli import main
from slimship.errors import STOPPED_EXIT, ConfigError
from slimship.pipeline.calibration import RANDOM_CALIBRATION, calibration, from_data
from slimship.pipeline.config import load_config

FACTORY = textwrap.dedent(
    """
    from pathlib import Path

    import torch

    MARKER = Path(__file__).with_name("data-factory-called")


    class Tiny(torch.nn.Module):
        def __init__(self, width: int = 4) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, width, 3, padding=1)
            self.fc = torch.nn.Linear(width, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


    def model(width: int = 4):
        torch.manual_seed(0)
        return Tiny(width)


    def loaders(n: int = 32):
        MARKER.write_text("called")
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
        batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, n, 8)]
        return batches, batches


    def generator(n: int = 32):
        batches, test = loaders(n)
        return iter(batches), test


    class Stream(torch.utils.data.IterableDataset):
        def __init__(self, batches):
            self.batches = batches

        def __iter__(self):
            return iter(self.batches)


    def stream(n: int = 32):
        batches, test = loaders(n)
        return torch.utils.data.DataLoader(Stream(batches), batch_size=None), test


    def flaky(n: int = 32):
        raise ValueError("cannot read the data shard")


    CALLS = []


    def second_call_fails(width: int = 4):
        CALLS.append(width)  # the config check builds the model once; the run builds it again
        if len(CALLS) > 1:
            raise RuntimeError("out of licences")
        return model(width)
    """
)


def _project(tmp_path: Path, module: str, **changes) -> Path:
    """A folder with `module`.py (the factories) and config.yaml naming them; returns the config path."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / f"{module}.py").write_text(FACTORY)
    config = {
        "model": {"factory": f"{module}:model", "input_shape": [1, 8, 8], "kwargs": {"width": 4}},
        "data": {"factory": f"{module}:loaders", "kwargs": {"n": 32}},
        "export": {"formats": ["onnx"]},
        "targets": ["host"],
        "bench": {"runs": 3, "warmup": 0},
        "release": {"name": "tiny", "version": "0.1.0", "out": str(tmp_path / "out")},
        **changes,
    }
    path = folder / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def test_factory_beside_the_config_runs_from_another_folder(tmp_path, monkeypatch, capsys):
    config = _project(tmp_path, "myfactory_run")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path_before = list(sys.path)
    assert main(["run", str(config)]) == 0, capsys.readouterr().err
    assert sys.path == path_before  # the config folder was on sys.path only for the import
    bundle = tmp_path / "out" / "tiny-0.1.0"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert "model.onnx" in {f["path"] for f in manifest["files"]}
    assert manifest["config"]["model"]["factory"] == "myfactory_run:model"
    assert "calibration" not in manifest  # no int8 file, nothing calibrated
    assert manifest["targets"]["host"]["transport"] == "local"


def test_missing_factory_module_names_where_it_looked(tmp_path):
    config = _project(tmp_path, "myfactory_missing")
    (config.parent / "myfactory_missing.py").unlink()
    with pytest.raises(
        ConfigError, match=r"'model.factory': cannot import module 'myfactory_missing' \(looked in"
    ):
        load_config(config)


def test_wrong_factory_kwarg_is_a_config_error_naming_the_key(tmp_path):
    config = _project(tmp_path, "myfactory_kwarg")
    text = json.loads(config.read_text())
    text["data"]["kwargs"] = {"n": 32, "batch": 4}
    config.write_text(json.dumps(text))
    with pytest.raises(
        ConfigError, match=r"unknown key 'data.kwargs.batch'; myfactory_kwarg:loaders takes: n"
    ):
        load_config(config)


def test_batch_dim_in_input_shape_is_refused_before_any_training(tmp_path, capsys):
    config = _project(tmp_path, "myfactory_batch", train={"epochs": 5, "lr": 0.01})
    text = json.loads(config.read_text())
    text["model"]["input_shape"] = [1, 1, 8, 8]
    config.write_text(json.dumps(text))
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert "slimship: error:" in err
    assert (
        "'model.input_shape': [1, 1, 8, 8] looks like it includes the batch dim; give the shape without it"
        in err
    )
    assert "e.g. [1, 8, 8]" in err and "control flow" not in err
    assert not (config.parent / "data-factory-called").exists()  # no data loaded, no training started
    assert not (tmp_path / "out").exists()


def test_input_shape_that_does_not_fit_the_model_is_named(tmp_path):
    config = _project(tmp_path, "myfactory_shape")
    text = json.loads(config.read_text())
    text["model"]["input_shape"] = [3, 8, 8]
    config.write_text(json.dumps(text))
    with pytest.raises(ConfigError, match=r"'model.input_shape' is \[3, 8, 8\]: one forward pass on a batch"):
        load_config(config)


#: a factory that fails the run -> what `slimship: error:` says (never an internal error, never an option
#: the user did not set)
FACTORY_FAILURES = {
    "data:generator": "'data.factory' returned train data of type list_iterator (a generator or iterator), "
    "which can be read only once",
    "data:stream": "'data.factory' returned train data of type DataLoader (a DataLoader over an "
    "IterableDataset), which has no len()",
    "data:flaky": "'data.factory' myfactory_fail_flaky:flaky raised ValueError with data.kwargs {'n': 32}: "
    "cannot read the data shard",
    "model:second_call_fails": "'model.factory' myfactory_fail_second_call_fails:second_call_fails raised "
    "RuntimeError with model.kwargs {'width': 4}: out of licences",
}


@pytest.mark.parametrize("case", FACTORY_FAILURES)
def test_a_failing_or_single_pass_factory_is_a_config_error_before_training(case, tmp_path, capsys):
    section, fn = case.split(":")
    module = f"myfactory_fail_{fn}"
    config = _project(tmp_path, module, train={"epochs": 2, "lr": 0.01})
    text = json.loads(config.read_text())
    text[section]["factory"] = f"{module}:{fn}"
    config.write_text(json.dumps(text))
    assert main(["run", str(config)]) == 2
    out, err = capsys.readouterr()
    assert f"slimship: error: {FACTORY_FAILURES[case]}" in err, err
    assert "internal error" not in err and "lr_schedule" not in err and "total_steps" not in err
    assert "train dense model" not in out + err and not (tmp_path / "out").exists()


def test_calibration_comes_from_the_train_split_and_is_counted():
    train = [(torch.randn(8, 1, 4, 4), torch.zeros(8)) for _ in range(10)]
    test = [(torch.randn(5, 1, 4, 4), torch.zeros(5))]
    data = from_data(train, test, "my.mod:loaders", limit=20)
    batches, record = data.batches, data.to_dict()
    assert len(batches) == 20 and all(b[0].shape == (1, 1, 4, 4) for b in batches)
    assert torch.equal(batches[9][0][0], train[1][0][1])
    assert record == {
        "samples": 20,
        "source": "data.factory my.mod:loaders: first 20 samples of the train split",
    }
    data = from_data(None, test, "my.mod:loaders", limit=20)
    batches, record = data.batches, data.to_dict()
    assert len(batches) == 5 and record["samples"] == 5 and "test split" in record["source"]
    assert from_data(None, None, None) is None


def test_one_calibration_fallback_random_batches_said_and_recorded(capsys):
    """Without samples an int8 format calibrates on RANDOM_CALIBRATION seeded random batches (run and CLI
    alike), said on stderr and recorded; no int8 format: nothing calibrated, nothing recorded."""
    example = (torch.randn(1, 1, 4, 4),)
    calib = calibration(
        ["onnx", "tflite-int8"], example, None, "no data factory given", "give a data factory"
    )
    assert len(calib.batches) == RANDOM_CALIBRATION and calib.batches[0][0].shape == (1, 1, 4, 4)
    assert not torch.equal(calib.batches[0][0], calib.batches[1][0]) and calib.real_batches() is None
    assert calib.to_dict() == {
        "samples": RANDOM_CALIBRATION,
        "source": f"{RANDOM_CALIBRATION} batches of random inputs (no data factory given)",
    }
    assert "note: tflite-int8 calibrated on 32 batches of random inputs" in capsys.readouterr().err
    assert calibration(["onnx"], example, None, "-", "-").to_dict() is None
    given = from_data([(torch.randn(3, 1, 4, 4), torch.zeros(3))], None, "m:f")
    assert calibration(["onnx"], example, given, "-", "-").to_dict() is None  # recorded only for int8
    assert calibration(["tflite-int8"], example, given, "-", "-") is given


def test_a_run_stopped_by_stop_after_releases_nothing_and_the_resumed_run_releases(tmp_path, capsys):
    checkpoint = tmp_path / "ck.pt"
    options = {
        "target": 0.5,
        "epochs": 2,
        "warmup_epochs": 0,
        "pruning_epochs": 1,
        "periods": 4,
        "checkpoint": str(checkpoint),
    }
    config = _project(
        tmp_path, "myfactory_stop", compress={"method": "hesso", "options": {**options, "stop_after": 1}}
    )
    assert main(["run", str(config), "--json", str(tmp_path / "stopped.json")]) == STOPPED_EXIT
    err = capsys.readouterr().err
    stopped = json.loads((tmp_path / "stopped.json").read_text())
    assert stopped["exit_code"] == STOPPED_EXIT and not stopped["released"]
    assert "stop_after=1" in stopped["stopped"]
    assert (
        "slimship: stopped: compress (hesso) stopped after epoch 1 of 2 (stop_after=1); nothing released; "
        "raise or remove compress.options.stop_after and run the same command again to resume from "
        f"{checkpoint}"
    ) in err
    assert checkpoint.is_file() and not (tmp_path / "out").exists()

    text = json.loads(config.read_text())
    text["compress"]["options"] = options  # stop_after removed: the run resumes at epoch 2 and releases
    config.write_text(json.dumps(text))
    assert main(["run", str(config), "--json", str(tmp_path / "run.json")]) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "run.json").read_text())["summary"]
    assert summary["compress"]["completed"] is True
    assert (tmp_path / "out" / "tiny-0.1.0" / "manifest.json").is_file()
