"""A gated merged ViT: a small CNN gate picks per image how to mix the task models' weights.

Gated merging (Ye et al., "Merging Vision Transformers from Different Tasks and Domains",
https://arxiv.org/abs/2312.16240; journal version "Dynamic Model Merging with Mixture of
Weights", code github.com/harveyhuang18/Mixture_of_Weights). The backbone holds one copy of
the *static* tensors (from any static merge) and K copies of only the *dynamic* tensors
(embeddings, LayerNorms and the least-similar attention/MLP blocks). For an image with gate
probabilities ``p`` the dynamic tensors are ``W_M = sum_k p_k W_k``; the classifier is the
predicted task's (``argmax p``) own head.

This file is self-contained (it imports only torch and transformers) because
``save_pretrained`` copies it into the model folder, so the model loads with
``trust_remote_code=True`` where hf_vitmerge is not installed.

``config.granularity`` says which ``p`` an image is merged with:

* ``"sample"`` (default): its own gate probabilities. An image's output does not depend on
  what else is in the batch; images with identical ``p`` share one forward pass.
* ``"hard"``: the one-hot of its predicted task (K forward passes at most per batch).
* ``"batch"``: the batch mean of ``p`` and its argmax for every image, as in the released
  code. Only correct for batches drawn from one task.

``logits`` are over ``config.id2label``: the predicted task's logits when all tasks share one
label space; otherwise the predicted task's log-softmax in its own slice of the union and
``-inf`` elsewhere. ``task_logits`` (every head on the same features), ``predicted_task`` and
``gate_probs`` are extra fields. Passing ``task=`` (an int or one id per image) overrides the
gate with a known task id.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, ViTConfig, ViTModel
from transformers.modeling_outputs import ImageClassifierOutput

GRANULARITIES = ("sample", "hard", "batch")

# Checkpoint (transformers 4.x) module names inside a block -> transformers 5.x in-memory names.
_V5_BLOCK_NAMES = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}


class TaskGateConfig(PretrainedConfig):
    """Config of the task gate: a small CNN on the preprocessed image that predicts the task."""

    model_type = "vit_task_gate"

    def __init__(
        self,
        task_names=None,
        num_channels: int = 3,
        channels=(16, 32, 64),
        pool_size: int = 4,
        validation_accuracy: float | None = None,
        **kwargs,
    ):
        self.task_names = list(task_names or ["task0", "task1"])
        kwargs.setdefault("id2label", dict(enumerate(self.task_names)))
        kwargs.setdefault("label2id", {n: i for i, n in enumerate(self.task_names)})
        super().__init__(**kwargs)
        self.num_channels = int(num_channels)
        self.channels = [int(c) for c in channels]
        self.pool_size = int(pool_size)
        self.validation_accuracy = validation_accuracy

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)


class TaskGate(PreTrainedModel):
    """Conv(3x3, stride 2) + BatchNorm + ReLU per entry of ``channels``, adaptive average pooling
    to ``pool_size`` x ``pool_size`` (kept spatial so that position-only domains stay separable),
    then a linear layer to one logit per task. Trained with cross-entropy on the logits."""

    config_class = TaskGateConfig
    main_input_name = "pixel_values"

    def __init__(self, config: TaskGateConfig):
        super().__init__(config)
        layers: list[nn.Module] = []
        c_in = config.num_channels
        for c in config.channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(config.pool_size)
        self.classifier = nn.Linear(c_in * config.pool_size**2, config.num_tasks)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.01)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, pixel_values=None, labels=None, **kwargs):
        x = self.pool(self.features(pixel_values)).flatten(1)
        logits = self.classifier(x)
        loss = nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


class GatedViTConfig(ViTConfig):
    """ViT config plus the gated-merge layout: tasks, their label counts, dynamic tensors, gate."""

    model_type = "vit_gated"

    def __init__(
        self,
        task_names=None,
        task_num_labels=None,
        dynamic_keys=None,
        granularity: str = "sample",
        shared_labels: bool = False,
        gate_config: dict | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.task_names = list(task_names or [])
        self.task_num_labels = [int(n) for n in (task_num_labels or [])]
        self.dynamic_keys = list(dynamic_keys or [])
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.granularity = granularity
        self.shared_labels = bool(shared_labels)
        self.gate_config = dict(gate_config or {"task_names": self.task_names})


@dataclass
class GatedImageClassifierOutput(ImageClassifierOutput):
    """``logits`` over ``config.id2label`` plus every head's logits, the predicted task and the gate."""

    task_logits: tuple[torch.Tensor, ...] | None = None
    predicted_task: torch.Tensor | None = None
    gate_probs: torch.Tensor | None = None


class _GatedBackbone(ViTModel):
    """A ``ViTModel`` whose dynamic parameters live in the parent; their slots stay ``None``."""

    def _init_weights(self, module):
        if any(p is None for p in module._parameters.values()):
            return
        super()._init_weights(module)


def memory_name(backbone: nn.Module, key: str) -> str:
    """In-memory parameter name (relative to the backbone) of a checkpoint key ``vit.…``."""
    name = key.removeprefix("vit.")
    names = dict(backbone.named_parameters())
    if name in names:
        return name
    if name.startswith("encoder.layer."):
        idx, _, tail = name[len("encoder.layer.") :].partition(".")
        module, _, attr = tail.rpartition(".")
        candidate = f"layers.{idx}.{_V5_BLOCK_NAMES.get(module, module)}.{attr}"
        if candidate in names:
            return candidate
    raise KeyError(f"the ViT backbone has no parameter for checkpoint key {key!r}")


class GatedMergedViTForImageClassification(PreTrainedModel):
    """Static merged ViT + K copies of the dynamic tensors + K heads + a task gate."""

    config_class = GatedViTConfig
    base_model_prefix = "vit"
    main_input_name = "pixel_values"

    def __init__(self, config: GatedViTConfig):
        super().__init__(config)
        self.vit = _GatedBackbone(config, add_pooling_layer=False)
        num_tasks = len(config.task_names)
        names = [memory_name(self.vit, k) for k in config.dynamic_keys]
        live = dict(self.vit.named_parameters())
        self.dynamic = nn.ParameterList(
            nn.Parameter(torch.empty(num_tasks, *live[n].shape, dtype=live[n].dtype, device=live[n].device))
            for n in names
        )
        for name in names:
            owner, _, attr = name.rpartition(".")
            self.vit.get_submodule(owner).register_parameter(attr, None)
        self._dynamic_names = names
        self.heads = nn.ModuleList(nn.Linear(config.hidden_size, n) for n in config.task_num_labels)
        self.gate = TaskGate(TaskGateConfig(**config.gate_config))
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, nn.Linear) and module.weight is not None:
            module.weight.normal_(0.0, self.config.initializer_range)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.ParameterList):
            for p in module:
                p.normal_(0.0, self.config.initializer_range)

    def merged_dynamic(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """Dynamic tensors merged with task weights ``[K]``: ``sum_k w_k W_k`` (in-memory names)."""
        return {
            name: torch.tensordot(weights.to(stack.dtype), stack, dims=1)
            for name, stack in zip(self._dynamic_names, self.dynamic, strict=True)
        }

    def _task_weights(self, probs: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
        mode = self.config.granularity
        if mode not in GRANULARITIES:
            raise ValueError(f"config.granularity must be one of {GRANULARITIES}, got {mode!r}")
        if mode == "hard":
            return nn.functional.one_hot(predicted, probs.shape[-1]).to(probs.dtype)
        if mode == "batch":
            return probs.mean(0, keepdim=True).expand_as(probs)
        return probs

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
        num_tasks = len(self.config.task_names)
        probs = torch.softmax(self.gate(pixel_values).logits.float(), dim=-1)
        if task is not None:
            predicted = torch.as_tensor(task, device=probs.device).reshape(-1).expand(probs.shape[0])
            weights = nn.functional.one_hot(predicted, num_tasks).to(probs.dtype)
        else:
            predicted = probs.argmax(-1)
            if self.config.granularity == "batch":
                predicted = probs.mean(0).argmax().expand(probs.shape[0])
            weights = self._task_weights(probs, predicted)
        groups, inverse = torch.unique(weights, dim=0, return_inverse=True)
        features = pixel_values.new_empty(pixel_values.shape[0], self.config.hidden_size)
        for g in range(groups.shape[0]):
            idx = (inverse == g).nonzero().squeeze(1)
            out = torch.func.functional_call(
                self.vit, self.merged_dynamic(groups[g]), (pixel_values[idx],), strict=False
            )
            features[idx] = out.last_hidden_state[:, 0, :].to(features.dtype)
        task_logits = tuple(head(features) for head in self.heads)
        rows = torch.arange(features.shape[0], device=features.device)
        if self.config.shared_labels:
            logits = torch.stack(task_logits)[predicted, rows]
        else:
            union = torch.cat([torch.log_softmax(t.float(), dim=-1) for t in task_logits], dim=-1)
            sizes = torch.tensor(self.config.task_num_labels, device=union.device)
            owner = torch.repeat_interleave(torch.arange(num_tasks, device=union.device), sizes)
            logits = union.masked_fill(owner.unsqueeze(0) != predicted.unsqueeze(1), float("-inf"))
        loss = None
        if labels is not None:
            safe = logits.float().masked_fill(torch.isinf(logits), -1e4)
            loss = nn.functional.cross_entropy(safe, labels)
        return GatedImageClassifierOutput(
            loss=loss,
            logits=logits,
            task_logits=task_logits,
            predicted_task=predicted,
            gate_probs=probs,
        )
