"""Merge methods, one per file, registered with :func:`merge_method`."""

from __future__ import annotations

from .registry import MethodSpec, available_methods, get_method, merge_method

__all__ = ["MethodSpec", "available_methods", "get_method", "merge_method"]
