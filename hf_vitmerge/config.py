"""The merge configuration (YAML or Python), validated with pydantic.

Every error names the offending key, so a typo in a YAML file fails before any model is
loaded. The same object is embedded in the model card of the merged model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DataConfig(_Strict):
    """A task's data: calibration (and evaluation, when a test split is given)."""

    path: str = Field(description="Hub dataset id, `save_to_disk` folder, or image folder")
    split: str | None = Field(
        None, description="split used for calibration (default: train, else the only one)"
    )
    test_split: str | None = Field(None, description="split used for evaluation, if any")
    image_column: str | None = Field(None, description="image column; detected when unambiguous")
    label_column: str | None = Field(None, description="label column; detected when unambiguous")
    revision: str | None = Field(None, description="dataset revision for Hub datasets")


class ModelEntry(_Strict):
    model: str = Field(description="Hub id or local folder")
    revision: str | None = Field(None, description="branch, tag or commit; resolved to a commit SHA")
    task: str | None = Field(None, description="the task's name in the merged model")
    data: DataConfig | None = None
    weight: float | None = Field(None, description="per-model weight for weighted methods")


class CalibrationConfig(_Strict):
    samples_per_task: int = Field(256, gt=0, description="calibration images per task")
    batch_size: int = Field(32, gt=0)
    cache_dir: str | None = Field(None, description="where activation statistics are cached")
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"


class HealConfig(_Strict):
    """A short distillation of the inputs' ensemble into the merged model (``heal:``)."""

    steps: int = Field(300, gt=0, description="optimisation steps")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate (linear decay, 10% warm-up)")
    samples_per_task: int = Field(512, gt=0, description="calibration images per task")
    batch_size: int = Field(32, gt=0)


class GroupRecipe(_Strict):
    method: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class MergeConfig(_Strict):
    """One merge, as written in a YAML file (see INTERFACES.md section 3)."""

    method: str = Field(description="merge method name (see `hf-vitmerge merge --help`)")
    base_model: str | None = Field(None, description="Hub id or folder of the shared pre-trained model")
    base_revision: str | None = None
    models: list[ModelEntry] = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    groups: dict[str, GroupRecipe] | None = Field(
        None, description="per-layer-group recipes: embeddings, attention, mlp, norm, head"
    )
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    heads: Literal["auto", "shared", "union", "multi"] = "auto"
    heal: HealConfig | None = Field(
        None, description="optional: distil the inputs' ensemble into the merged model (training)"
    )
    seed: int = 0
    device: str = "cpu"
    evaluation_suite: str | None = Field(None, description="suite.json to evaluate the merged model on")

    @field_validator("models", mode="before")
    @classmethod
    def _models_as_entries(cls, value):
        if isinstance(value, list):
            return [{"model": v} if isinstance(v, (str, os.PathLike)) else v for v in value]
        return value

    @field_validator("models", mode="after")
    @classmethod
    def _at_least_two_distinct(cls, models: list[ModelEntry]) -> list[ModelEntry]:
        if len(models) < 2:
            given = f"only {models[0].model!r}" if models else "none"
            raise ValueError(f"a merge needs at least two models, got {given}; list every model to merge")
        seen: dict[tuple, str] = {}
        for entry in models:
            key = (_model_key(entry.model), entry.revision or "main")
            if key in seen:
                raise ValueError(
                    f"model {entry.model!r} is listed twice (also as {seen[key]!r}); merging a model with "
                    "itself changes nothing: list each model once"
                )
            seen[key] = entry.model
        return models

    @model_validator(mode="after")
    def _check_method(self) -> MergeConfig:
        from .methods import available_methods, get_method

        names = [self.method] + [g.method for g in (self.groups or {}).values()]
        for name in names:
            if name not in available_methods() and name != "per_group":
                raise ValueError(
                    f"method: unknown merge method {name!r}; available: {', '.join(available_methods())}"
                )
        if self.groups:
            from .arch import KINDS

            bad = sorted(set(self.groups) - set(KINDS))
            if bad:
                raise ValueError(f"groups: unknown group(s) {bad}; valid groups: {', '.join(KINDS)}")
        from .methods.registry import AUTO, Setting

        problems = []  # reported together, so one run names every bad key
        without_data = [e.model for e in self.models if e.data is None]
        setting = Setting(len(self.models), has_base=bool(self.base_model))
        recipes = [] if self.method == "per_group" else [("parameters", self.method, self.parameters, True)]
        recipes += [(f"groups.{g}", r.method, r.parameters, False) for g, r in (self.groups or {}).items()]
        readers = []  # what reads calibration data
        for where, name, parameters, allow_auto in recipes:
            spec = get_method(name)
            try:
                params = spec.validate_params(parameters, allow_auto=allow_auto)
            except (ValueError, TypeError) as err:
                problems.append(f"{where}: {err}")
                problems += spec.check_setting(None, setting)
                continue
            problems += spec.check_setting(params, setting)
            if spec.requires_data(params):
                readers.append(f"method {name!r}")
            if any(params[k] == AUTO for k in spec.float_parameters()):
                readers.append("`auto` parameters")
        if self.heal is not None:
            readers.append("heal")
        if readers and without_data:
            problems.append(
                f"models: calibration data (each task's images) is needed by "
                f"{' and '.join(dict.fromkeys(readers))}, but these models have no `data:` entry: "
                f"{', '.join(map(repr, without_data))}; give every model one"
            )
        if problems:
            raise ValueError("; ".join(dict.fromkeys(problems)))
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_none=True, exclude_defaults=False), sort_keys=False)


def _model_key(ref: str) -> str:
    """Local folders by their resolved path (``./a`` and ``a/`` are one model), Hub ids as given."""
    local = Path(ref).expanduser()
    return str(local.resolve()) if local.exists() else ref.rstrip("/")


def _format_error(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see INTERFACES.md section 3 for the schema)"
        lines.append(f"  {loc}: {msg}")
    return f"invalid merge config {origin}:\n" + "\n".join(lines)


def load_config(config: str | os.PathLike | dict | MergeConfig) -> MergeConfig:
    """Parse and validate a config from a YAML path, a dict or a ``MergeConfig``.

    Relative paths in a YAML file stay relative to the current directory (as the user typed
    them on the command line), matching how the examples are run from the repo root.
    """
    if isinstance(config, MergeConfig):
        return config
    origin = "(dict)"
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        origin = str(path)
        if not path.is_file():
            raise ConfigError(f"merge config {path} does not exist")
        try:
            config = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"merge config {path} is not valid YAML: {err}") from err
        if not isinstance(config, dict):
            raise ConfigError(
                f"merge config {path} must be a YAML mapping with at least `method` and `models`"
            )
    try:
        return MergeConfig.model_validate(config)
    except ValidationError as err:
        raise ConfigError(_format_error(err, origin)) from None
