"""Merge methods, one per file, registered with :func:`merge_method`."""

from __future__ import annotations

import importlib
import pkgutil

from .registry import MethodSpec, available_methods, get_method, merge_method

__all__ = ["MethodSpec", "available_methods", "get_method", "merge_method"]

_LOADED = False


def _load_all() -> None:
    """Import every method module once so that its decorator registers it."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for info in pkgutil.iter_modules(__path__):
        if info.name != "registry" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
