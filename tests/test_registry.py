"""Typed parameter schemas: derived from method signatures, checked before any model loads."""

from __future__ import annotations

from typing import Annotated

import pytest
import torch
from pydantic import Field

from hf_vitmerge.cli import main
from hf_vitmerge.config import ConfigError, load_config
from hf_vitmerge.methods import get_method, registry
from hf_vitmerge.methods.registry import Grid, merge_method


@pytest.mark.parametrize(
    "method, params, bad",
    [
        ("average", {"weights": 5}, "weights"),
        ("average", {"weights": [1.0, -1.0]}, "weights"),
        ("zipit", {"stop_block": "half"}, "stop_block"),
        ("ties", {"density": "lots"}, "density"),
        ("ties", {"density": 1.5}, "density"),
        ("dare", {"combine": "mean"}, "combine"),
        ("regmean", {"normalize_gram": "yes"}, "normalize_gram"),
        ("consensus", {"k": -1}, "k"),
        ("task_arithmetic", {"scaling": True}, "scaling"),
    ],
)
def test_bad_parameter_is_named(method, params, bad):
    with pytest.raises(ValueError, match=rf"parameter '{bad}' of method '{method}'"):
        get_method(method).validate_params(params)


@pytest.mark.parametrize(
    "method, params",
    [("average", "weights: 5"), ("zipit", "stop_block: half"), ("ties", "density: lots")],
)
def test_cli_names_the_parameter_not_the_missing_model(tmp_path, capsys, method, params):
    config = tmp_path / "merge.yaml"
    config.write_text(
        f"method: {method}\nbase_model: {tmp_path}/no-base\nmodels:\n"
        f"  - model: {tmp_path}/no-a\n  - model: {tmp_path}/no-b\nparameters:\n  {params}\n"
    )
    assert main(["merge", str(config), "--out", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    name = params.split(":")[0]
    assert f"parameter '{name}' of method '{method}'" in err
    assert "no-a" not in err and not (tmp_path / "out").exists()


def test_good_values_are_typed_and_defaults_filled():
    assert get_method("ties").validate_params({"density": 1}) == {"density": 1.0, "scaling": 1.0}
    assert get_method("zipit").validate_params({"stop_block": 0.5})["stop_block"] == 0.5
    assert get_method("zipit").validate_params({"stop_block": 3})["stop_block"] == 3


def test_auto_only_for_float_parameters():
    assert get_method("task_arithmetic").validate_params({"scaling": "auto"}) == {"scaling": "auto"}
    with pytest.raises(ValueError, match="'k' of method 'consensus' cannot be `auto`"):
        get_method("consensus").validate_params({"k": "auto"})
    with pytest.raises(ConfigError, match="cannot be `auto`"):
        load_config(
            {
                "method": "per_group",
                "models": ["a", "b"],
                "groups": {"mlp": {"method": "average", "parameters": {}}},
                "base_model": "b",
            }
            | {"groups": {"mlp": {"method": "task_arithmetic", "parameters": {"scaling": "auto"}}}}
        )


def test_auto_grid_declared_or_derived_within_range():
    assert get_method("task_arithmetic").auto_grid("scaling")[0] == 0.1
    derived = get_method("regmean").auto_grid("ridge")  # no Grid: multiples of the default
    assert 1e-6 in derived and all(v > 0 for v in derived)


@pytest.fixture
def scratch_registry():
    """Methods registered by a test are removed afterwards."""
    before = dict(registry._REGISTRY)
    try:
        yield
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(before)


def test_plain_default_method_gets_a_schema_and_signature_derives_needs_base(scratch_registry):
    @merge_method("_test_plain_defaults")
    def plain(tensors, base=None, *, alpha=0.5, steps=3, flag=True, name="x", **_):
        return tensors[0]

    spec = plain.method_spec
    assert spec.needs_base is False
    assert spec.validate_params({"alpha": 1}) == {"alpha": 1.0, "steps": 3, "flag": True, "name": "x"}
    for bad in ({"alpha": "big"}, {"steps": 2.5}, {"flag": "no"}, {"name": 3}, {"other": 1}):
        with pytest.raises(ValueError, match="_test_plain_defaults"):
            spec.validate_params(bad)

    @merge_method("_test_typed_base")
    def typed(
        tensors: list[torch.Tensor],
        base: torch.Tensor,
        *,
        lam: Annotated[float, Field(ge=0, le=2), Grid(0.5, 1.0)] = 1.0,
        key: str = "",
        **_,
    ):
        return base

    spec = typed.method_spec
    assert spec.needs_base is True  # a base argument without a default
    assert list(spec.defaults) == ["lam"]  # engine arguments (key, param, generator) are not parameters
    assert spec.auto_grid("lam") == (0.5, 1.0)
    with pytest.raises(ValueError, match="'lam'"):
        spec.validate_params({"lam": 3})
