"""Config validation: typed sections, key paths in errors, bounded YAML, the committed JSON Schema."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import yaml

from slimship.cli import main
from slimship.errors import ConfigError
from slimship.pipeline.config import (
    PipelineConfig,
    config_json_schema,
    gates_from_options,
    load_config,
    merge,
    resolve,
    validate,
)
from slimship.runtimes.targets import load_targets

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "configs" / "example.yaml"
BASE = {"model": {"factory": "slimship.models:lenet5", "input_shape": [1, 8, 8]}}


def test_example_config_is_valid_and_typed() -> None:
    config = load_config(EXAMPLE)
    assert isinstance(config, PipelineConfig)
    assert config.compress.method == "hesso" and config.compress.options.target == 0.5
    assert config.compress.options.model_dump(exclude_unset=True) == {"target": 0.5, "epochs": 4}
    assert callable(resolve(config.model.factory, "model.factory"))
    assert config.bench.runs == 30 and config.slim.merge is True
    assert [t.name for t in config.target_profiles()] == ["mobile-1t"]
    assert config.gates.max_accuracy_drop == 1.0 and config.gates.min_speedup is None


def test_defaults_fill_missing_sections(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = validate(BASE)
    assert config.export.formats == ["onnx", "tflite-fp32"]
    assert config.release.out == "artifacts" and config.bench.runs == 50
    assert config.gates.max_accuracy_drop == 1.0 and config.gates.min_agreement == 0.9
    assert config.train is None and config.compress is None
    assert not (tmp_path / "artifacts").exists()  # validation creates nothing


def test_an_int_is_accepted_where_a_float_is_expected() -> None:
    config = validate(merge(BASE, {"train": {"lr": 1}, "gates": {"min_speedup": 2}}))
    assert config.train.lr == 1.0 and config.gates.min_speedup == 2.0


REJECTED = [
    ({"seed": True}, "'seed' is True; expected a non-negative integer"),
    ({"release": {"name": "a" * 300}}, "'release.name' is 'aaaa"),
    ({"release": {"name": "-rf"}}, "'release.name' is '-rf'; expected letters, digits"),
    ({"release": {"out": "a\x00b"}}, "'release.out' is 'a\\x00b'; a path may not hold control characters"),
    ({"targets": ["host", "host"]}, "'host' appears twice"),
    ({"bench": {"runs": True}}, "'bench.runs' is True; expected an integer >= 1"),
    ({"release": {"version": "1.0"}}, "'release.version' is '1.0'; expected MAJOR.MINOR.PATCH"),
    ({"release": {"name": "my model"}}, "'release.name' is 'my model'; expected letters, digits"),
    ({"targets": ["mobile-1t", "pixel9"]}, "'targets' is ['mobile-1t', 'pixel9']; unknown 'pixel9'; known: "),
    ({"model": {"kwargs": {"sed": 0}}}, "unknown key 'model.kwargs.sed'; slimship.models:lenet5 takes: seed"),
    (
        {"data": {"factory": "slimship.data:digits_loaders", "kwargs": {"batchsize": 8}}},
        "unknown key 'data.kwargs.batchsize'; slimship.data:digits_loaders takes: batch_size, seed",
    ),
    (
        {"compress": {"method": "csgd", "options": {"centripedal": 0.1}}},
        "unknown key 'compress.options.centripedal'; allowed here: centripetal,",
    ),
    ({"compress": {"method": "hesso", "options": {"target": "half"}}}, "'compress.options.target' is 'half'"),
    ({"compress": {"method": "hesso", "options": {"epochs": 2.5}}}, "'compress.options.epochs' is 2.5"),
    ({"compress": {"method": "hakd", "options": {"widths": [0.5, "x"]}}}, "'compress.options.widths'"),
    ({"compress": {"method": "obd"}}, "'compress.method' is 'obd'; allowed: adc, csgd"),
    ({"compress": {"options": {}}}, "missing required key 'compress.method'"),
    (
        {"export": {"formats": ["onnx", "coreml"]}},
        "'export.formats' is ['onnx', 'coreml']; expected a non-empty",
    ),
    ({"bench": {"runz": 3}}, "unknown key 'bench.runz'; allowed here: profile, runs, warmup"),
    ({"slim": {"channel_multiple": 0}}, "'slim.channel_multiple' is 0"),
    ({"model": {"factory": "nocolon"}}, "'model.factory' is 'nocolon'"),
    ({"model": {"factory": "no_such_mod:fn"}}, "'model.factory': cannot import module 'no_such_mod'"),
    (
        {"gates": {"min_agreement": 1.5}},
        "'gates.min_agreement' is 1.5; expected the smallest top-1 agreement",
    ),
    (
        {"gates": {"max_latency_ms": {"pixel9": 3}}},
        "'gates.max_latency_ms.pixel9' names no configured target",
    ),
    ({"gates": {"max_accuracy_drop": True}}, "'gates.max_accuracy_drop' is True"),
]


@pytest.mark.parametrize(("extra", "message"), REJECTED, ids=[m.split(";")[0][:40] for _, m in REJECTED])
def test_errors_name_the_key_path(extra, message) -> None:
    with pytest.raises(ConfigError) as info:
        validate(merge(BASE, extra))
    assert message in str(info.value)


def test_every_problem_is_listed_in_one_error() -> None:
    with pytest.raises(ConfigError) as info:
        validate(merge(BASE, {"seed": True, "bench": {"runs": True}, "zzz": 1}))
    text = str(info.value)
    assert (
        "3 problems" in text and "'seed'" in text and "'bench.runs'" in text and "unknown key 'zzz'" in text
    )


def test_missing_model_and_top_level() -> None:
    with pytest.raises(ConfigError, match=r"missing required key 'model'"):
        validate({})
    with pytest.raises(ConfigError, match=r"missing required key 'model.factory'"):
        validate({"model": {"input_shape": [1]}})
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        validate([1, 2])


@pytest.mark.parametrize("kind", ["file", "under-file"])
def test_release_out_must_be_a_writable_directory(tmp_path, kind) -> None:
    blocker = tmp_path / "out.txt"
    blocker.write_text("not a directory")
    out = blocker if kind == "file" else blocker / "sub"
    with pytest.raises(ConfigError, match=r"'release.out' is .*out.txt.*expected a directory"):
        validate(merge(BASE, {"release": {"out": str(out)}}))
    assert blocker.read_text() == "not a directory"


def test_cli_config_error_fails_before_any_training(tmp_path, capsys) -> None:
    """Each rejected value stops `slimship run` with exit 2 before the first stage prints."""
    raw = yaml.safe_load(EXAMPLE.read_text())
    for extra, message in [REJECTED[0], REJECTED[2], REJECTED[4], REJECTED[5], REJECTED[8]]:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(merge(raw, extra)))
        start = time.perf_counter()
        assert main(["run", str(path), "--out", str(tmp_path / "artifacts")]) == 2
        captured = capsys.readouterr()
        assert message in captured.err and "train dense model" not in captured.out
        assert time.perf_counter() - start < 20
    assert not (tmp_path / "artifacts").exists()


def test_cli_gate_option_is_checked_like_the_config(tmp_path, capsys) -> None:
    assert main(["run", str(EXAMPLE), "--min-agreement", "2", "--out", str(tmp_path)]) == 2
    assert "'gates.min_agreement' is 2.0" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"'--min-speedup' is -1"):
        gates_from_options({"min_speedup": -1})


# ----------------------------------------------------------------------------------------- bounded YAML

BOMB = "\n".join(
    ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)]
)


def test_alias_bomb_config_fails_fast(tmp_path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(
        "model: {factory: 'slimship.models:lenet5', input_shape: [1, 8, 8]}\nx:\n  "
        + BOMB.replace("\n", "\n  ")
    )
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"bomb.yaml: the document expands to more than"):
        load_config(path)
    assert time.perf_counter() - start < 0.5


def test_alias_bomb_targets_file_fails_fast(tmp_path) -> None:
    path = tmp_path / "targets.yaml"
    path.write_text("targets:\n  t1: {threads: 1}\nlaughs:\n  " + BOMB.replace("\n", "\n  "))
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"targets.yaml: the document expands to more than"):
        load_targets(path)
    assert time.perf_counter() - start < 0.5
    config = merge(BASE, {"targets_file": str(path), "targets": ["t1"]})
    with pytest.raises(ConfigError, match=r"'targets_file': .*targets.yaml: the document expands"):
        validate(config)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model:\n  factory: slimship.models:lenet5\n  input_shape: &b [1, *b]\n", "recursive document"),
        ("seed: 1\nseed: 2\n", "key 'seed' appears twice"),
    ],
)
def test_recursive_aliases_and_repeated_keys_are_refused(tmp_path, text, message) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=message):
        load_config(path)
    assert time.perf_counter() - start < 1.0


def test_a_few_aliases_are_fine(tmp_path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("model: &m {factory: 'slimship.models:lenet5', input_shape: [1, 8, 8]}\nx: [*m, *m]\n")
    with pytest.raises(ConfigError, match=r"unknown key 'x'"):  # parsed; x is then refused as a key
        load_config(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "model: !!python/object:os.system {}\n",
            "tag 'tag:yaml.org,2002:python/object:os.system' is not allowed",
        ),
        ("model: !custom {factory: a}\n", "tag '!custom' is not allowed"),
        ("model: [unclosed\n", "not valid YAML"),
    ],
)
def test_non_plain_yaml_is_refused(tmp_path, text, message) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(path)


def test_oversized_and_missing_files(tmp_path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 200_000)
    with pytest.raises(ConfigError, match=r"big.yaml: larger than 1024 KiB"):
        load_config(big)
    with pytest.raises(ConfigError, match=r"no such config file"):
        load_config(tmp_path / "missing.yaml")


# ----------------------------------------------------------------------------------------- JSON Schema


def test_committed_json_schema_matches_the_model() -> None:
    committed = json.loads((ROOT / "configs" / "slimship.schema.json").read_text())
    assert committed == json.loads(json.dumps(config_json_schema())), (
        "configs/slimship.schema.json is stale: regenerate it with `slimship config-schema --out FILE`"
    )


def test_config_schema_command_validates_the_example(tmp_path) -> None:
    import jsonschema

    out = tmp_path / "schema.json"
    assert main(["config-schema", "--out", str(out)]) == 0
    schema = json.loads(out.read_text())
    example = yaml.safe_load(EXAMPLE.read_text())
    jsonschema.validate(example, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(merge(example, {"compress": {"options": {"target": "half"}}}), schema)


def test_demo_config_is_valid_and_takes_overrides(tmp_path) -> None:
    from slimship.pipeline.demo import demo_config

    config = demo_config({"release": {"out": str(tmp_path)}, "gates": {"min_speedup": 1.1}})
    assert config.release.out == str(tmp_path) and config.release.name == "digits-cnn"
    assert config.gates.min_speedup == 1.1 and config.gates.max_accuracy_drop == 1.0
    assert config.compress.options.model_dump(exclude_unset=True) == {"target": 0.6, "epochs": 8, "lr": 0.02}


@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_train_device_accepts_what_this_machine_has(device: str) -> None:
    config = validate(merge(BASE, {"train": {"device": device}, "targets": ["host"]}))
    assert config.device == device and config.train.device == device
    assert validate(merge(BASE, {"targets": ["host"]})).device == "auto"  # no train section: auto


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without cuda")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_train_device_cuda_without_cuda_is_a_config_error_listing_devices(device: str) -> None:
    with pytest.raises(ConfigError) as caught:
        validate(merge(BASE, {"train": {"device": device}, "targets": ["host"]}))
    assert f"'train.device' is '{device}'; this machine has no {device} (available: cpu" in str(caught.value)


def test_train_device_unknown_name_says_what_is_expected() -> None:
    expected = r"'train.device' is 'gpu'; expected auto, cpu, cuda, cuda:N or mps"
    with pytest.raises(ConfigError, match=expected):
        validate(merge(BASE, {"train": {"device": "gpu"}}))
