"""The method registry: every merge method registers itself here with one decorator.

Two kinds of method exist:

* ``tensorwise``: a pure function of the K input tensors (and the base tensor) for one
  parameter. The engine streams these from safetensors one key at a time, so memory stays
  near one model plus the output (mergekit's idea, without its task graph).
* ``model``: needs whole models, activation statistics or training (alignment, RegMean,
  Fisher, gated). It receives a :class:`~hf_vitmerge.methods.base.MergeContext`.

The function's signature *is* the parameter schema (mergekit's ``easy_define`` idea): every
keyword-only parameter becomes a field of a pydantic model, typed by its annotation (or, when
it has none, by its default's type), with ranges and choices from ``Annotated[...]`` metadata::

    @merge_method("ties", reference="https://arxiv.org/abs/2306.01708")
    def ties(tensors, base: torch.Tensor, *,
             density: Annotated[float, Field(gt=0, le=1), Grid(0.1, 0.2, 0.3)] = 0.2, **_): ...

A tensorwise method whose ``base`` argument has no default needs a base model. ``Grid``
declares the values tried when a config sets the parameter to ``auto`` (any float parameter
with a grid, or a non-zero default to build one from, may be ``auto``; see
:mod:`hf_vitmerge.autotune`). Configs are validated against the schema before any model is
loaded, with a message naming the method and the parameter, and so are the conditions a
method puts on the whole merge (:class:`Setting`: how many models, whether a base model is
given) and whether calibration data is needed: ``needs_data`` may be a rule of the parameters (a gated merge
that reuses a trained router reads no images), and a ``check`` hook states rules that involve
several parameters or the setting. A ``resolve`` hook turns parameters left ``None`` (whose
default depends on other parameters or on the setting) into the values the merge uses, so
that the model card, ``merge_config.yaml`` and bench results record what really ran.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, create_model

from ..errors import ConfigError

_REGISTRY: dict[str, MethodSpec] = {}
_LOADED = False


def _load_all() -> None:
    """Import every method module of this package once, so that its decorator registers it.

    A call-time scan of the folder (a module added to ``methods/`` registers itself), so no
    module of the package imports the registry's users at import time.
    """
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name not in ("registry", "base") and not info.name.startswith("_"):
            importlib.import_module(f"{__package__}.{info.name}")


AUTO = "auto"
# Keyword arguments the merge engine passes to every tensorwise method (not user parameters):
# the canonical key, its ParamInfo from the architecture adapter, and a seeded generator.
ENGINE_ARGUMENTS = frozenset({"key", "param", "generator"})


class Grid:
    """``Annotated`` marker: the values an ``auto`` float parameter is chosen from."""

    def __init__(self, *values: float):
        if not values:
            raise ValueError("Grid needs at least one value")
        self.values = tuple(float(v) for v in values)

    def __repr__(self) -> str:
        return f"Grid{self.values}"


@dataclass(frozen=True)
class Setting:
    """What a merge is given besides the method's parameters (known before any model loads;
    ``num_layers`` only once the models are read). Calibration data is checked by the config,
    from :meth:`MethodSpec.requires_data`."""

    num_models: int
    has_base: bool
    num_layers: int | None = None


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable
    kind: str  # "tensorwise" | "model"
    needs_base: bool
    needs_data: bool  # whether the method can read calibration data (see ``requires_data``)
    reference: str
    defaults: dict = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    schema: type[BaseModel] | None = None  # pydantic model of the keyword parameters
    data_rule: Callable[[dict], bool] | None = None  # params -> needs data (default: needs_data)
    check: Callable[[dict, Setting], None] | None = None  # raises ValueError naming the parameter
    resolve: Callable[[dict, Setting], dict] | None = None  # values for parameters left None

    def __post_init__(self) -> None:
        if self.schema is None:  # built by hand: type each parameter by its default
            fields = {k: (_default_type(v), v) for k, v in self.defaults.items()}
            object.__setattr__(self, "schema", _model(self.name, fields))

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.fn) or ""
        return doc.splitlines()[0] if doc else ""

    def float_parameters(self) -> list[str]:
        """Parameters whose type admits a float (those that may be ``auto``)."""
        return [n for n, f in self.schema.model_fields.items() if _admits_float(f.annotation)]

    def auto_grid(self, name: str) -> tuple[float, ...]:
        """The values tried for an ``auto`` parameter: its declared ``Grid``, else a few
        multiples of its default, kept inside its declared range."""
        metadata = _metadata(self.schema.model_fields[name])
        for meta in metadata:
            if isinstance(meta, Grid):
                return meta.values
        default = self.defaults.get(name)
        if isinstance(default, bool) or not isinstance(default, (int, float)) or default == 0:
            raise ConfigError(
                f"parameter {name!r} of method {self.name!r} declares no grid for `auto` and has no "
                "non-zero numeric default to build one from; give it a number"
            )
        values = [float(f"{default * m:.6g}") for m in (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)]
        return tuple(v for v in values if _in_range(v, metadata))

    def validate_params(self, params: dict | None, *, allow_auto: bool = True) -> dict:
        """Defaults updated by ``params``, checked against the schema.

        Raises :class:`~hf_vitmerge.errors.ConfigError` (a ``ValueError``) naming the method and
        the parameter: unknown keys (with the list of valid ones), wrong types, values out of
        range or not among the choices. Float parameters with a grid may be ``"auto"`` (kept as
        the string; resolved when the merge runs).
        """
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            valid = ", ".join(sorted(self.defaults)) or "(none)"
            raise ConfigError(
                f"unknown parameter(s) {unknown} for method {self.name!r}; valid parameters: {valid}"
            )
        floats = set(self.float_parameters())
        autos = {k for k, v in params.items() if isinstance(v, str) and v.strip().lower() == AUTO}
        # a string parameter may list "auto" among its own choices (gated's static_method)
        autos -= {k for k in autos if k not in floats and _admits_auto_string(self.schema.model_fields[k])}
        if autos and not allow_auto:
            raise ConfigError(f"method {self.name!r}: parameter(s) {sorted(autos)} cannot be `auto` here")
        for key in sorted(autos - floats):
            raise ConfigError(
                f"parameter {key!r} of method {self.name!r} cannot be `auto`: only float parameters "
                f"can ({', '.join(sorted(floats)) or 'this method has none'})"
            )
        for key in sorted(autos):
            self.auto_grid(key)  # no grid to choose from: an error now, not after loading
        concrete = {k: v for k, v in params.items() if k not in autos}
        try:
            model = self.schema.model_validate(concrete)
        except ValidationError as err:
            raise ConfigError(_format_param_error(self.name, err, concrete)) from None
        merged = {k: getattr(model, k) for k in self.defaults}
        merged.update({k: AUTO for k in autos})
        return merged

    def requires_data(self, params: dict) -> bool:
        """Whether a merge with these (validated) parameters reads calibration data."""
        return self.data_rule(params) if self.data_rule is not None else self.needs_data

    def check_setting(self, params: dict | None, setting: Setting) -> list[str]:
        """What is wrong with running this method, with ``params`` (validated; ``None`` when they
        are not, which skips the checks that read them), in ``setting``: one message per problem
        (empty when it can run). Missing calibration data is the config's to report (it names
        the models): see :meth:`requires_data`."""
        problems = []
        if self.needs_base and not setting.has_base:
            problems.append(
                f"base_model: method {self.name!r} works on task vectors and needs `base_model` "
                "(the pre-trained model the inputs were fine-tuned from)"
            )
        if self.check is not None and params is not None:
            try:
                self.check(params, setting)
            except ValueError as err:
                problems.append(f"parameters: {err}")
        return problems

    def resolved(self, params: dict, setting: Setting) -> dict:
        """``params`` with the parameters left ``None`` (or a choice ``auto``) that the method's
        ``resolve`` hook determines replaced by the values the merge uses."""
        if self.resolve is None:
            return dict(params)
        updates = self.resolve(params, setting)
        return {**params, **{k: v for k, v in updates.items() if params.get(k) in (None, AUTO)}}

    def describe(self) -> list[dict]:
        """One row per parameter: name, type, default, constraints (for docs and ``--help``)."""
        rows = []
        for name, info in self.schema.model_fields.items():
            constraints = [_constraint(m) for m in _metadata(info)]
            rows.append(
                {
                    "name": name,
                    "type": _type_name(info.annotation),
                    "default": self.defaults.get(name),
                    "constraints": ", ".join(constraints),
                }
            )
        return rows


def _metadata(info) -> list:
    """A field's constraints and markers, including those inside ``Annotated[...] | None``."""
    out = list(info.metadata)
    for arg in typing.get_args(info.annotation):
        out += list(getattr(arg, "__metadata__", ()))
    return out


def _admits_auto_string(field) -> bool:
    """Whether a non-float field accepts the string ``"auto"`` as an ordinary value."""
    try:
        TypeAdapter(field.annotation).validate_python(AUTO)
    except ValidationError:
        return False
    return True


def _admits_float(annotation) -> bool:
    """``float``, ``Annotated[float, ...]`` or a union holding one (not ``list[float]``)."""
    if annotation is float:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _admits_float(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return any(_admits_float(a) for a in typing.get_args(annotation))
    return False


def _constraint(meta) -> str:
    """``>= 0``, ``< 1``, ``grid 0.1, 0.2`` for one piece of field metadata."""
    if isinstance(meta, Grid):
        return "auto grid " + ", ".join(f"{v:g}" for v in meta.values)
    for cls, sign in (
        (annotated_types.Gt, ">"),
        (annotated_types.Ge, ">="),
        (annotated_types.Lt, "<"),
        (annotated_types.Le, "<="),
    ):
        if isinstance(meta, cls):
            return f"{sign} {getattr(meta, cls.__name__.lower())}"
    inner = getattr(meta, "metadata", None)
    return ", ".join(_constraint(m) for m in inner) if inner else repr(meta)


def _in_range(value: float, metadata) -> bool:
    checks = {
        annotated_types.Gt: lambda m: value > m.gt,
        annotated_types.Ge: lambda m: value >= m.ge,
        annotated_types.Lt: lambda m: value < m.lt,
        annotated_types.Le: lambda m: value <= m.le,
    }
    return all(checks[type(m)](m) for m in metadata if type(m) in checks)


def _type_name(annotation) -> str:
    """``float``, ``int | float | None``, ``list[float] | None``, ``'a' | 'b'`` (constraints left out)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_type_name(a) for a in args)}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _format_param_error(method: str, err: ValidationError, given: dict) -> str:
    """One line per bad parameter: its name, the method, what it got and what it needs."""
    problems: dict[str, list[str]] = {}
    for e in err.errors():
        key = str(e["loc"][0]) if e["loc"] else "(parameters)"
        msg = e["msg"][0].lower() + e["msg"][1:]
        if msg not in problems.setdefault(key, []):
            problems[key].append(msg)
    lines = []
    for key, msgs in problems.items():
        got = f" got {given[key]!r}:" if key in given else ":"
        lines.append(f"parameter {key!r} of method {method!r}{got} " + ", or ".join(msgs))
    return "\n".join(lines)


def _default_type(default) -> Any:
    """The type of a parameter that has no annotation, from its default (None: anything)."""
    if default is None or default is inspect.Parameter.empty:
        return Any
    if isinstance(default, bool):
        return bool
    if isinstance(default, float):
        return float
    return type(default)


def _annotation(fn: Callable, param: inspect.Parameter):
    """The evaluated annotation of ``param`` (string annotations resolved in ``fn``'s module),
    or ``None`` when it is missing or cannot be resolved."""
    ann = param.annotation
    if ann is inspect.Parameter.empty:
        return None
    if isinstance(ann, str):
        namespace = {**vars(typing), **fn.__globals__}
        try:
            ann = eval(ann, namespace)  # noqa: S307 (the method module's own annotation text)
        except Exception:
            return None
    if ann is float:
        return float  # strict float accepts ints, rejects bools and strings
    return ann


def parameter_schema(fn: Callable, name: str) -> tuple[type[BaseModel], dict]:
    """The pydantic model of ``fn``'s keyword-only parameters, and their defaults."""
    fields, defaults = {}, {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.name in ENGINE_ARGUMENTS:
            continue
        ann = _annotation(fn, p)
        if ann is None:
            ann = _default_type(p.default)
        default = ... if p.default is inspect.Parameter.empty else p.default
        fields[p.name] = (ann, default)
        defaults[p.name] = None if default is ... else default
    return _model(name, fields), defaults


def _model(name: str, fields: dict) -> type[BaseModel]:
    return create_model(
        f"{name.title().replace('_', '')}Parameters",
        __config__=ConfigDict(extra="forbid", strict=True, arbitrary_types_allowed=True),
        **fields,
    )


def _signature_needs_base(fn: Callable, kind: str) -> bool:
    """mergekit's rule: a tensorwise method whose ``base`` argument has no default needs a base."""
    if kind != "tensorwise":
        return False
    param = inspect.signature(fn).parameters.get("base")
    return param is not None and param.default is inspect.Parameter.empty


def merge_method(
    name: str,
    *,
    kind: str = "tensorwise",
    needs_base: bool | None = None,
    needs_data: bool | Callable[[dict], bool] = False,
    reference: str = "",
    aliases: tuple[str, ...] = (),
    check: Callable[[dict, Setting], None] | None = None,
    resolve: Callable[[dict, Setting], dict] | None = None,
):
    """Register a merge method; its keyword-only parameters form its typed schema.

    ``needs_base`` defaults to what the signature says (a tensorwise ``base`` argument without
    a default); an explicit value wins. ``needs_data``: a bool, or a rule of the validated
    parameters. ``check(params, setting)`` raises ``ValueError`` for a combination the schema
    cannot express; ``resolve(params, setting)`` gives the values of parameters left ``None``
    (see the module docstring).
    """
    if kind not in ("tensorwise", "model"):
        raise ValueError(f"kind must be 'tensorwise' or 'model', got {kind!r}")

    def wrap(fn: Callable) -> Callable:
        schema, defaults = parameter_schema(fn, name)
        base = _signature_needs_base(fn, kind) if needs_base is None else needs_base
        rule = needs_data if callable(needs_data) else None
        spec = MethodSpec(
            name, fn, kind, base, bool(needs_data), reference, defaults, aliases, schema, rule, check, resolve
        )
        for n in (name, *aliases):
            if n in _REGISTRY and _REGISTRY[n].fn is not fn:
                raise ValueError(f"merge method {n!r} is registered twice")
            _REGISTRY[n] = spec
        fn.method_spec = spec
        return fn

    return wrap


def get_method(name: str) -> MethodSpec:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown merge method {name!r}; available: {', '.join(available_methods())}"
        ) from None


def available_methods() -> list[str]:
    _load_all()
    return sorted({spec.name for spec in _REGISTRY.values()})
