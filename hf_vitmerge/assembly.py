"""The one assembler of merged models: a method's :class:`MergeResult` -> a ``PreTrainedModel``.

A plain ``ViTForImageClassification`` (shared or union head) or a
``ViTMultiHeadForImageClassification`` (one head per task) is allocated without random
initialisation and filled with the merged canonical tensors and heads. Methods that build a
complete custom model (partial zip, gated, emr) return it in ``MergeResult.model``.
"""

from __future__ import annotations

import torch
from transformers import ViTConfig, ViTForImageClassification

from .arch import ViTAdapter
from .methods.base import MergeContext, MergeResult, merged_config_dict, union_labels
from .modeling import ViTMultiHeadConfig, ViTMultiHeadForImageClassification


def empty_merged_model(ctx: MergeContext) -> torch.nn.Module:
    """The merged ``PreTrainedModel`` (labels and heads per ``ctx.heads_mode``), allocated but not filled."""
    cfg = merged_config_dict(ctx)
    mode = ctx.heads_mode
    labels = ctx.label_lists[0] if mode == "shared" else union_labels(ctx.task_names, ctx.label_lists)
    id2label = dict(enumerate(labels))
    label2id = {v: k for k, v in id2label.items()}
    if mode == "multi":
        config = ViTMultiHeadConfig(
            **cfg,
            id2label=id2label,
            label2id=label2id,
            task_names=ctx.task_names,
            task_num_labels=[len(x) for x in ctx.label_lists],
        )
        return _empty_model(ViTMultiHeadForImageClassification, config)
    config = ViTConfig(**cfg, id2label=id2label, label2id=label2id)
    return _empty_model(ViTForImageClassification, config)


def _head(ctx: MergeContext, result: MergeResult) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The single classifier of a shared/union model (None when a merged one is already in place)."""
    if ctx.heads_mode == "shared":
        if result.shared_head is not None or result.heads is None:
            return result.shared_head
        return (
            torch.stack([h[0] for h in result.heads]).mean(0),
            torch.stack([h[1] for h in result.heads]).mean(0),
        )
    return torch.cat([h[0] for h in result.heads]), torch.cat([h[1] for h in result.heads])


@torch.no_grad()
def fill_heads(ctx: MergeContext, model: torch.nn.Module, result: MergeResult) -> None:
    """Copy the classifier(s) of ``result`` into ``model``."""
    if ctx.heads_mode == "multi":
        for lin, (w, b) in zip(model.heads, result.heads, strict=True):
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        return
    head = _head(ctx, result)
    if head is not None:
        model.classifier.weight.copy_(head[0])
        model.classifier.bias.copy_(head[1])


def assemble(ctx: MergeContext, result: MergeResult) -> torch.nn.Module:
    """Build the merged ``PreTrainedModel`` from canonical tensors and heads."""
    model = empty_merged_model(ctx)
    adapter = ViTAdapter.from_model(model)
    tensors = dict(result.backbone)
    if ctx.heads_mode != "multi":
        w, b = adapter.key("classifier", "weight"), adapter.key("classifier", "bias")
        tensors[w], tensors[b] = _head(ctx, result)
    adapter.load_state_dict(model, tensors)
    if ctx.heads_mode == "multi":
        fill_heads(ctx, model, result)
    return model


def _empty_model(cls, config) -> torch.nn.Module:
    """Instantiate without random initialisation (every tensor is overwritten by the merge)."""
    with torch.device("meta"):
        model = cls(config)
    return model.to_empty(device="cpu")
