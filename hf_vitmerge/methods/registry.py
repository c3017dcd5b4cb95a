"""The method registry: every merge method registers itself here with one decorator.

Two kinds of method exist:

* ``tensorwise``: a pure function of the K input tensors (and the base tensor) for one
  parameter. The engine streams these from safetensors one key at a time, so memory stays
  near one model plus the output (mergekit's idea, without its task graph).
* ``model``: needs whole models, activation statistics or training (alignment, RegMean,
  Fisher, gated). It receives a :class:`~hf_vitmerge.methods.base.MergeContext`.

The function's keyword parameters with defaults *are* the parameter schema: unknown keys
in a config are rejected with the list of valid ones.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable
    kind: str  # "tensorwise" | "model"
    needs_base: bool
    needs_data: bool
    reference: str
    defaults: dict = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.fn) or ""
        return doc.splitlines()[0] if doc else ""

    def validate_params(self, params: dict | None) -> dict:
        """Defaults updated by ``params``; unknown keys raise ``ValueError`` naming them."""
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            valid = ", ".join(sorted(self.defaults)) or "(none)"
            raise ValueError(
                f"unknown parameter(s) {unknown} for method {self.name!r}; valid parameters: {valid}"
            )
        merged = dict(self.defaults)
        for key, value in params.items():
            default = self.defaults[key]
            if isinstance(default, bool) and not isinstance(value, bool):
                raise ValueError(
                    f"parameter {key!r} of method {self.name!r} must be true/false, got {value!r}"
                )
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(
                        f"parameter {key!r} of method {self.name!r} must be a number, got {value!r}"
                    )
                value = type(default)(value) if isinstance(default, float) else value
            merged[key] = value
        return merged


def merge_method(
    name: str,
    *,
    kind: str = "tensorwise",
    needs_base: bool = False,
    needs_data: bool = False,
    reference: str = "",
    aliases: tuple[str, ...] = (),
):
    """Register a merge method. Keyword-only parameters with defaults form its schema."""
    if kind not in ("tensorwise", "model"):
        raise ValueError(f"kind must be 'tensorwise' or 'model', got {kind!r}")

    def wrap(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        defaults = {
            p.name: p.default
            for p in sig.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
        }
        spec = MethodSpec(name, fn, kind, needs_base, needs_data, reference, defaults, aliases)
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
        raise ValueError(
            f"unknown merge method {name!r}; available: {', '.join(available_methods())}"
        ) from None


def available_methods() -> list[str]:
    _load_all()
    return sorted({spec.name for spec in _REGISTRY.values()})
