"""Custom ``PreTrainedModel`` classes for merged ViTs, registered with the Auto classes."""

from __future__ import annotations

import contextlib

from transformers import AutoConfig, AutoModelForImageClassification

from .multihead import ViTMultiHeadConfig, ViTMultiHeadForImageClassification

__all__ = ["ViTMultiHeadConfig", "ViTMultiHeadForImageClassification", "register"]

_CUSTOM = [(ViTMultiHeadConfig, ViTMultiHeadForImageClassification)]


def register(config_cls, model_cls) -> None:
    """Register a custom merged-model class with the Auto classes (in this process) and for
    ``auto_map`` (so ``save_pretrained`` copies its code into the folder)."""
    try:
        AutoConfig.register(config_cls.model_type, config_cls)
    except ValueError:
        pass  # already registered in this process
    with contextlib.suppress(ValueError):
        AutoModelForImageClassification.register(config_cls, model_cls)
    config_cls.register_for_auto_class()
    model_cls.register_for_auto_class("AutoModelForImageClassification")


for _config_cls, _model_cls in _CUSTOM:
    register(_config_cls, _model_cls)
