"""Merge config validation: every error names the key."""

from __future__ import annotations

import pytest

from hf_vitmerge.config import ConfigError, load_config

BASE = {"method": "average", "models": [{"model": "a"}, {"model": "b"}]}


def test_minimal_and_defaults():
    cfg = load_config({**BASE, "models": ["a", "b"]})
    assert [m.model for m in cfg.models] == ["a", "b"]
    assert cfg.heads == "auto" and cfg.seed == 0 and cfg.calibration.samples_per_task == 256


@pytest.mark.parametrize(
    "patch,match",
    [
        ({"metod": "average"}, "metod: unknown key"),
        ({"method": "frobnicate"}, "unknown merge method 'frobnicate'"),
        ({"seed": "zero"}, "seed"),
        ({"heads": "many"}, "heads"),
        ({"models": []}, "models"),
        ({"method": "task_arithmetic"}, "base_model: method 'task_arithmetic'"),
        ({"parameters": {"bogus": 1}}, r"unknown parameter\(s\) \['bogus'\]"),
        ({"calibration": {"samples_per_task": 0}}, "calibration.samples_per_task"),
        ({"models": [{"model": "a", "revison": "x"}]}, "models.0.revison: unknown key"),
    ],
)
def test_errors_name_the_key(patch, match):
    with pytest.raises(ConfigError, match=match):
        load_config({**BASE, **patch})


def test_parameter_types():
    with pytest.raises(ConfigError, match="scaling.*valid number"):
        load_config(
            {**BASE, "method": "task_arithmetic", "base_model": "b", "parameters": {"scaling": "big"}}
        )
    cfg = load_config({**BASE, "method": "task_arithmetic", "base_model": "b", "parameters": {"scaling": 1}})
    assert cfg.parameters == {"scaling": 1}


def test_missing_base_and_bad_parameter_are_reported_together():
    with pytest.raises(ConfigError) as info:
        load_config({**BASE, "method": "ties", "parameters": {"density": "lots"}})
    message = str(info.value)
    assert "base_model: method 'ties'" in message
    assert "parameter 'density' of method 'ties' got 'lots'" in message


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_round_trip_yaml(tmp_path):
    cfg = load_config({**BASE, "parameters": {"weights": [1, 2]}, "seed": 3})
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
