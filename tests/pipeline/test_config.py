"""Config validation: defaults, key paths in errors, the shipped example."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimship.errors import ConfigError
from slimship.pipeline.config import load_config, resolve, validate

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "example.yaml"


def test_example_config_is_valid_and_resolvable() -> None:
    config = load_config(EXAMPLE)
    assert config["compress"]["method"] == "hesso"
    assert callable(resolve(config["model"]["factory"], "model.factory"))
    assert callable(resolve(config["data"]["factory"], "data.factory"))
    assert config["bench"]["runs"] == 30 and config["slim"]["merge"] is True


def test_defaults_fill_missing_sections() -> None:
    config = validate({"model": {"factory": "a.b:c", "input_shape": [3, 8, 8]}})
    assert config["export"]["formats"] == ["onnx", "tflite-fp32"]
    assert config["release"]["out"] == "artifacts"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"model": {"input_shape": [1, 8, 8]}}, "missing required key 'model.factory'"),
        ({"model": {"factory": "nocolon", "input_shape": [1]}}, "'model.factory' is 'nocolon'"),
        ({"model": {"factory": "a:b", "input_shape": [0, 8]}}, "'model.input_shape'"),
        (
            {"model": {"factory": "a:b", "input_shape": [1]}, "export": {"formats": ["coreml"]}},
            "'export.formats'",
        ),
        ({"model": {"factory": "a:b", "input_shape": [1]}, "bench": {"runz": 3}}, "unknown key 'bench.runz'"),
        (
            {"model": {"factory": "a:b", "input_shape": [1]}, "release": {"version": "v1"}},
            "'release.version'",
        ),
        ([1, 2], "top level must be a mapping"),
        (
            {"model": {"factory": "a:b", "input_shape": [1]}, "compress": {"method": "obd"}},
            "'compress.method' is 'obd'; allowed: adc, csgd",
        ),
        (
            {
                "model": {"factory": "a:b", "input_shape": [1]},
                "compress": {"method": "csgd", "options": {"epochs": 3, "centripedal": 0.1}},
            },
            "unknown key 'compress.options.centripedal' for method 'csgd'; allowed: centripetal",
        ),
    ],
)
def test_errors_name_the_key_path(raw, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        validate(raw)


def test_unknown_key_lists_allowed_keys() -> None:
    with pytest.raises(ConfigError, match=r"allowed here: .*runs.*warmup"):
        validate({"model": {"factory": "a:b", "input_shape": [1]}, "bench": {"rnus": 1}})


def test_resolve_names_the_key(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"'data.factory': cannot import module 'no_such_mod'"):
        resolve("no_such_mod:fn", "data.factory")
    with pytest.raises(ConfigError, match=r"has no callable 'nope'"):
        resolve("slimship.data:nope", "data.factory")


def test_broken_yaml_names_the_file(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"no such config file"):
        load_config(tmp_path / "missing.yaml")
