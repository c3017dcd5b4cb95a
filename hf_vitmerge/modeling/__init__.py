"""Custom ``PreTrainedModel`` classes for merged ViTs, registered with the Auto classes."""

from __future__ import annotations

import contextlib

from transformers import AutoConfig, AutoModelForImageClassification

from .emr import EMRMergedViTForImageClassification, EMRViTConfig
from .gated import GatedMergedViTForImageClassification, GatedViTConfig, TaskGate, TaskGateConfig
from .multihead import ViTMultiHeadConfig, ViTMultiHeadForImageClassification
from .partial_zip import ViTPartialZipConfig, ViTPartialZipForImageClassification

__all__ = [
    "EMRMergedViTForImageClassification",
    "EMRViTConfig",
    "GatedMergedViTForImageClassification",
    "GatedViTConfig",
    "TaskGate",
    "TaskGateConfig",
    "ViTMultiHeadConfig",
    "ViTMultiHeadForImageClassification",
    "ViTPartialZipConfig",
    "ViTPartialZipForImageClassification",
    "register",
]

_CUSTOM = [
    (ViTMultiHeadConfig, ViTMultiHeadForImageClassification),
    (GatedViTConfig, GatedMergedViTForImageClassification),
    (EMRViTConfig, EMRMergedViTForImageClassification),
    (TaskGateConfig, TaskGate),
    (ViTPartialZipConfig, ViTPartialZipForImageClassification),
]


def register(config_cls, model_cls) -> None:
    """Register a custom merged-model class with the Auto classes (in this process) and for
    ``auto_map`` (so ``save_pretrained`` copies its code into the folder)."""
    with contextlib.suppress(ValueError):  # already registered in this process
        AutoConfig.register(config_cls.model_type, config_cls)
    with contextlib.suppress(ValueError):
        AutoModelForImageClassification.register(config_cls, model_cls)
    config_cls.register_for_auto_class()
    model_cls.register_for_auto_class("AutoModelForImageClassification")


for _config_cls, _model_cls in _CUSTOM:
    register(_config_cls, _model_cls)
