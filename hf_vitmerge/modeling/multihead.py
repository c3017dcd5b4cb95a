"""A merged ViT backbone with one classifier head per task.

This file is self-contained (it imports only torch and transformers) because it is copied
into every saved model folder, so the model loads with ``trust_remote_code=True`` where
hf_vitmerge is not installed.

The joint prediction follows the ZipIt! protocol (Stoica et al., 2023,
https://arxiv.org/abs/2305.03053): each head's logits go through their own softmax, and the
argmax is taken over the concatenation. ``logits`` therefore holds per-task log-probabilities
over the union of labels in the order of ``config.id2label``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel, ViTConfig, ViTModel
from transformers.modeling_outputs import ImageClassifierOutput


class ViTMultiHeadConfig(ViTConfig):
    model_type = "vit_multihead"

    def __init__(self, task_names=None, task_num_labels=None, **kwargs):
        super().__init__(**kwargs)
        self.task_names = list(task_names or [])
        self.task_num_labels = [int(n) for n in (task_num_labels or [])]


@dataclass
class MultiTaskImageClassifierOutput(ImageClassifierOutput):
    """``logits`` over the union of labels, plus each task's own logits and the predicted task."""

    task_logits: tuple[torch.Tensor, ...] | None = None
    predicted_task: torch.Tensor | None = None


def task_offsets(task_num_labels) -> list[int]:
    offsets = [0]
    for n in task_num_labels:
        offsets.append(offsets[-1] + n)
    return offsets


def joint_logits(task_logits, task=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task log-softmax, concatenated; optionally restricted to given task(s).

    ``task`` is an int or a ``[batch]`` tensor of task ids; other tasks' entries become -inf.
    Returns the union logits and the task whose label wins the joint argmax.
    """
    logp = [torch.log_softmax(t.float(), dim=-1) for t in task_logits]
    union = torch.cat(logp, dim=-1)
    sizes = torch.tensor([t.shape[-1] for t in task_logits], device=union.device)
    owner = torch.repeat_interleave(torch.arange(len(task_logits), device=union.device), sizes)
    if task is not None:
        task = torch.as_tensor(task, device=union.device).reshape(-1, 1)
        union = union.masked_fill(owner.unsqueeze(0) != task, float("-inf"))
    return union, owner[union.argmax(-1)]


def multitask_output(task_logits, task=None, labels=None, **fields) -> MultiTaskImageClassifierOutput:
    """The output of a model with one block of logits per task: the :func:`joint_logits` of
    ``task_logits``, the predicted task and, with ``labels``, the NLL loss of the joint logits."""
    logits, predicted = joint_logits(task_logits, task)
    loss = None
    if labels is not None:
        loss = nn.functional.nll_loss(logits.masked_fill(torch.isinf(logits), -1e4), labels)
    return MultiTaskImageClassifierOutput(
        loss=loss, logits=logits, task_logits=task_logits, predicted_task=predicted, **fields
    )


class MultiTaskViTBase(PreTrainedModel):
    """What the multi-task ViTs (multi-head, partial zip) share: the input name and the
    initialisation of linear layers."""

    base_model_prefix = "vit"
    main_input_name = "pixel_values"

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, self.config.initializer_range)
            if module.bias is not None:
                module.bias.data.zero_()


class ViTMultiHeadForImageClassification(MultiTaskViTBase):
    """A ViT backbone shared by all tasks and one linear head per task."""

    config_class = ViTMultiHeadConfig

    def __init__(self, config: ViTMultiHeadConfig):
        super().__init__(config)
        self.vit = ViTModel(config, add_pooling_layer=False)
        self.heads = nn.ModuleList(nn.Linear(config.hidden_size, n) for n in config.task_num_labels)
        self.post_init()

    def forward(
        self,
        pixel_values=None,
        labels=None,
        task=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        out = self.vit(
            pixel_values, output_attentions=output_attentions, output_hidden_states=output_hidden_states
        )
        cls = out.last_hidden_state[:, 0, :]
        task_logits = tuple(head(cls) for head in self.heads)
        return multitask_output(
            task_logits, task, labels, hidden_states=out.hidden_states, attentions=out.attentions
        )
