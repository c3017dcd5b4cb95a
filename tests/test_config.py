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


# ------------------------------------------------------------------------------ before any model loads
# Models "a" and "b" do not exist: each of these errors must come from the config alone.
WITH_BASE = {**BASE, "base_model": "c"}
WITH_DATA = {
    **BASE,
    "models": [{"model": "a", "data": {"path": "d0"}}, {"model": "b", "data": {"path": "d1"}}],
}


@pytest.mark.parametrize(
    "config,match",
    [
        (
            {**WITH_DATA, "method": "regmean", "parameters": {"alpha": 2.0}},
            "'alpha' of method 'regmean'.*less than or equal to 1",
        ),
        ({**WITH_DATA, "method": "mudsc", "parameters": {"lam": -0.5}}, "'lam' of method 'mudsc'"),
        (
            {**WITH_DATA, "method": "mudsc", "parameters": {"solver": "greedy"}},
            "'solver'.*'zip' or 'hungarian'",
        ),
        (
            {**WITH_DATA, "method": "fisher", "parameters": {"fisher_labels": "x"}},
            "'fisher_labels'.*'sampled' or 'empirical'",
        ),
        ({**WITH_DATA, "method": "gated", "parameters": {"m": -1}}, "'m' of method 'gated'"),
        ({**WITH_DATA, "method": "gated", "parameters": {"granularity": "sample"}}, "'granularity'"),
        ({**WITH_DATA, "method": "gated", "parameters": {"static_method": "gated"}}, "cannot be 'gated'"),
        (
            {**WITH_DATA, "method": "gated", "parameters": {"static_method": "frob"}},
            "unknown merge method 'frob'",
        ),
        (
            {**WITH_DATA, "method": "gated", "parameters": {"static_method": "ties"}},
            "static method 'ties' needs `base_model`",
        ),
        (
            {
                **WITH_DATA,
                "method": "gated",
                "parameters": {"static_method": "ties", "static_parameters": {"density": 2}},
                "base_model": "c",
            },
            "'density' of method 'ties'",
        ),
        (
            {**WITH_DATA, "method": "gated", "parameters": {"similarity_on": "task_vectors"}},
            "task_vectors` needs `base_model`",
        ),
        (
            {**WITH_BASE, "method": "emr", "models": WITH_DATA["models"], "parameters": {"gate_kind": "mlp"}},
            "'gate_kind'",
        ),
        ({**BASE, "method": "weight_matching", "parameters": {"max_sweeps": 0}}, "'max_sweeps'"),
        (
            {**WITH_BASE, "method": "dare", "parameters": {"density": 0.5}},
            "`density` only applies to `combine: ties`",
        ),
        ({**WITH_BASE, "method": "consensus", "parameters": {"k": 3}}, "only 2 tasks can agree"),
        ({**BASE, "parameters": {"weights": [1, 2, 3]}}, "3 entries for 2 models"),
        ({**BASE, "parameters": {"weights": [0, 0]}}, "all zero"),
        (
            {**WITH_DATA, "method": "zipit", "parameters": {"stop_block": "auto"}},
            "'stop_block' of method 'zipit' declares no grid",
        ),
        (
            {**WITH_BASE, "method": "tsv", "parameters": {"keep": "auto"}},
            "'keep' of method 'tsv' declares no grid",
        ),
        ({**BASE, "method": "regmean"}, r"needed by method 'regmean'.*no `data:` entry: 'a', 'b'"),
        (
            {**WITH_BASE, "method": "task_arithmetic", "parameters": {"scaling": "auto"}},
            "needed by `auto` parameters",
        ),
        ({**BASE, "heal": {"steps": 2}}, "needed by heal"),
        ({**BASE, "method": "gated"}, "needed by method 'gated'"),
        (
            {**BASE, "method": "gated", "parameters": {"gate": "r", "static_method": "regmean"}},
            "needed by method 'gated'",
        ),
    ],
)
def test_method_rules_are_checked_before_loading(config, match):
    """Ranges, choices, rules across parameters, base model and calibration data: all found by
    ``load_config``, never after the models were read (INTERFACES.md section 3)."""
    with pytest.raises(ConfigError, match=match):
        load_config(config)


def test_valid_settings_pass_the_same_checks():
    load_config({**WITH_DATA, "method": "zipit", "parameters": {"alpha": "auto", "beta": "auto"}})
    load_config({**WITH_BASE, "method": "dare", "parameters": {"combine": "ties", "density": 0.5}})
    load_config({**BASE, "parameters": {"weights": [1, 0]}})
    # a reused router reads no images (nor does the static method auto picks)
    load_config({**BASE, "method": "gated", "parameters": {"gate": "router"}})
    load_config({**WITH_BASE, "method": "emr", "parameters": {"gate": "router"}})
    load_config({**WITH_BASE, "method": "consensus", "parameters": {"k": 2}})


def test_resolved_parameters_fill_what_was_left_unset():
    from hf_vitmerge.methods import get_method
    from hf_vitmerge.methods.registry import Setting

    setting = Setting(num_models=2, has_base=False, num_layers=12)
    zipit = get_method("zipit")
    assert zipit.resolved(zipit.validate_params({}), setting) == {
        **zipit.validate_params({}),
        "alpha": 0.7,
        "beta": 0.5,
    }
    partial = zipit.resolved(zipit.validate_params({"stop_block": 2, "beta": 0.0}), setting)
    assert (partial["alpha"], partial["beta"]) == (0.5, 0.0)  # a given value is kept
    gated = get_method("gated").resolved(get_method("gated").validate_params({"m": None}), setting)
    assert (gated["m"], gated["router_layers"], gated["static_method"]) == (5, 3, "average")
    with_base = Setting(num_models=2, has_base=True)
    dare = get_method("dare")
    assert dare.resolved(dare.validate_params({"combine": "ties"}), with_base)["scaling"] == 1.0
