"""A partially zipped ViT ("ZipIt! n/m", Stoica et al., 2023, https://arxiv.org/abs/2305.03053).

The embeddings and the first ``stop_block`` transformer blocks are shared (merged); after
them every input model keeps its own tail: an explicit residual unmerge (a ``d x d`` linear
map from the merged residual basis back to that model's basis, ZipIt!'s ``SpaceInterceptor``),
its remaining blocks, its own final LayerNorm and its own classifier.

This file imports only torch, transformers and its sibling ``multihead.py``; ``save_pretrained``
copies both into every saved model folder, so the model loads with ``trust_remote_code=True``
where hf_vitmerge is not installed.

``logits`` hold per-task log-probabilities over the union of labels in ``config.id2label``
order: each tail's logits go through their own softmax and the joint prediction is the argmax
over the concatenation (ZipIt!'s protocol). ``task_logits`` and ``predicted_task`` are extra
output fields; ``task`` (an int or a ``[batch]`` tensor) restricts the prediction to a task.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import ViTConfig
from transformers.models.vit.modeling_vit import ViTEmbeddings, ViTLayer

from .multihead import MultiTaskViTBase, multitask_output


class ViTPartialZipConfig(ViTConfig):
    model_type = "vit_partial_zip"

    def __init__(self, stop_block=None, task_names=None, task_num_labels=None, **kwargs):
        super().__init__(**kwargs)
        self.stop_block = int(self.num_hidden_layers if stop_block is None else stop_block)
        self.task_names = list(task_names or [])
        self.task_num_labels = [int(n) for n in (task_num_labels or [])]


def _run_layer(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    out = layer(hidden)
    return out[0] if isinstance(out, tuple) else out


class ViTTrunk(nn.Module):
    """The shared part: embeddings and the first ``stop_block`` blocks."""

    def __init__(self, config: ViTPartialZipConfig):
        super().__init__()
        self.embeddings = ViTEmbeddings(config)
        self.layers = nn.ModuleList(ViTLayer(config) for _ in range(config.stop_block))


class ViTTail(nn.Module):
    """One model's own part: residual unmerge, remaining blocks, final LayerNorm, classifier."""

    def __init__(self, config: ViTPartialZipConfig, num_labels: int):
        super().__init__()
        d = config.hidden_size
        self.unmerge = nn.Linear(d, d, bias=False)
        self.layers = nn.ModuleList(
            ViTLayer(config) for _ in range(config.num_hidden_layers - config.stop_block)
        )
        self.layernorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.classifier = nn.Linear(d, num_labels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.unmerge(hidden)
        for layer in self.layers:
            hidden = _run_layer(layer, hidden)
        return self.classifier(self.layernorm(hidden)[:, 0, :])


class ViTPartialZipForImageClassification(MultiTaskViTBase):
    """A merged ViT trunk followed by one unmerge + tail + head per input model."""

    config_class = ViTPartialZipConfig
    base_model_prefix = "trunk"

    def __init__(self, config: ViTPartialZipConfig):
        super().__init__(config)
        if not 0 <= config.stop_block <= config.num_hidden_layers:
            raise ValueError(
                f"stop_block must be in [0, {config.num_hidden_layers}], got {config.stop_block}"
            )
        self.trunk = ViTTrunk(config)
        self.tails = nn.ModuleList(ViTTail(config, n) for n in config.task_num_labels)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)  # the linear layers
        if isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()
        elif isinstance(module, ViTEmbeddings):
            module.cls_token.data.normal_(0.0, self.config.initializer_range)
            module.position_embeddings.data.normal_(0.0, self.config.initializer_range)

    def forward(self, pixel_values=None, labels=None, task=None, return_dict=None, **kwargs):
        dtype = self.trunk.embeddings.patch_embeddings.projection.weight.dtype
        hidden = self.trunk.embeddings(pixel_values.to(dtype))
        for layer in self.trunk.layers:
            hidden = _run_layer(layer, hidden)
        task_logits = tuple(tail(hidden) for tail in self.tails)
        return multitask_output(task_logits, task, labels)
