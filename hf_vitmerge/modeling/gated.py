"""A gated merged ViT: a router picks per image which task's weights to run it with.

Gated merging (Ye et al., "Merging Vision Transformers from Different Tasks and Domains",
https://arxiv.org/abs/2312.16240; journal version "Dynamic Model Merging with Mixture of
Weights", code github.com/harveyhuang18/Mixture_of_Weights). The backbone holds one copy of
the *static* tensors (from any static merge) and K copies of only the *dynamic* tensors
(embeddings, LayerNorms and the least-similar attention/MLP blocks). For routing weights
``w`` the dynamic tensors are ``W_M = sum_k w_k W_k``; the classifier is the predicted task's
(``argmax``) own head.

The router (``TaskGate``) is one of two kinds (``gate_config["kind"]``):

* ``"features"`` (default): a small head on the backbone's own features. The backbone is run
  for its first ``config.router_layers`` blocks (all when ``None``) once per row of task
  weights in ``config.router_task_weights`` (``None``: one pass with every task weighted
  equally, i.e. the static merge plus the mean of the dynamic tensors; one-hot rows: input
  models' own tensors, for inputs of different initialisations, whose average computes no
  useful features); the head reads the LayerNorm-ed CLS token and the mean patch token of
  every pass, concatenated.
* ``"cnn"``: a small CNN on the preprocessed image (the earlier gate).

This file is self-contained (it imports only torch and transformers) because
``save_pretrained`` copies it into the model folder, so the model loads with
``trust_remote_code=True`` where hf_vitmerge is not installed.

``config.granularity`` says how images are routed; every mode runs one forward per *group*
of images with identical routing, never one per image:

* ``"hard"`` (default): the one-hot of the predicted task; a batch is grouped by prediction.
* ``"topk"``: images are grouped by their set of ``config.routing_top_k`` most likely tasks; each
  group mixes those tasks' dynamic weights with the group's mean renormalised probabilities.
* ``"batch"``: the batch mean of the probabilities and its argmax for every image, as in the
  released code. Only correct for batches drawn from one task.

``logits`` are over ``config.id2label``: the predicted task's logits when all tasks share one
label space; otherwise the predicted task's log-softmax in its own slice of the union and
``-inf`` elsewhere. ``task_logits`` (every head on the same features), ``predicted_task`` and
``gate_probs`` are extra fields. Passing ``task=`` (an int or one id per image) overrides the
router with a known task id. With ``labels`` the loss is the cross-entropy of ``logits``; with
``task_labels`` (true task ids) the router's cross-entropy is added, so ``transformers.Trainer``
can train the router inside the merged model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, ViTConfig, ViTModel
from transformers.modeling_outputs import ImageClassifierOutput

Granularity = Literal["hard", "topk", "batch"]
GateKind = Literal["features", "cnn"]
GRANULARITIES = get_args(Granularity)
GATE_KINDS = get_args(GateKind)

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
    """Config of the task router: a head on backbone features, or a small CNN on the image."""

    model_type = "vit_task_gate"

    def __init__(
        self,
        task_names=None,
        kind: str = "cnn",
        num_channels: int = 3,
        channels=(16, 32, 64),
        pool_size: int = 4,
        in_features: int = 0,
        hidden: int = 256,
        validation_accuracy: float | None = None,
        **kwargs,
    ):
        self.task_names = list(task_names or ["task0", "task1"])
        kwargs.setdefault("id2label", dict(enumerate(self.task_names)))
        kwargs.setdefault("label2id", {n: i for i, n in enumerate(self.task_names)})
        super().__init__(**kwargs)
        if kind not in GATE_KINDS:
            raise ValueError(f"gate kind must be one of {GATE_KINDS}, got {kind!r}")
        self.kind = kind
        self.num_channels = int(num_channels)
        self.channels = [int(c) for c in channels]
        self.pool_size = int(pool_size)
        self.in_features = int(in_features)
        self.hidden = int(hidden)
        self.validation_accuracy = validation_accuracy

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)


class TaskGate(PreTrainedModel):
    """The router. ``kind="cnn"``: Conv(3x3, stride 2) + BatchNorm + ReLU per entry of
    ``channels``, adaptive average pooling to ``pool_size`` x ``pool_size``, a linear layer.
    ``kind="features"``: LayerNorm, Linear(``in_features``, ``hidden``), GELU, Linear to one
    logit per task, on ``features`` (backbone features computed by the merged model).
    Trained with cross-entropy on the logits against the task id."""

    config_class = TaskGateConfig
    main_input_name = "pixel_values"

    def __init__(self, config: TaskGateConfig):
        super().__init__(config)
        if config.kind == "features":
            self.head = nn.Sequential(
                nn.LayerNorm(config.in_features),
                nn.Linear(config.in_features, config.hidden),
                nn.GELU(),
                nn.Linear(config.hidden, config.num_tasks),
            )
        else:
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
            if self.config.kind == "features":
                nn.init.xavier_uniform_(module.weight)
            else:
                nn.init.normal_(module.weight, std=0.01)
            nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, pixel_values=None, features=None, labels=None, **kwargs):
        if self.config.kind == "features":
            if features is None:
                raise ValueError("a features gate needs `features` (computed by the merged model)")
            logits = self.head(features)
        else:
            logits = self.classifier(self.pool(self.features(pixel_values)).flatten(1))
        loss = nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


class GatedViTConfig(ViTConfig):
    """ViT config plus the gated-merge layout: tasks, their label counts, dynamic tensors, router."""

    model_type = "vit_gated"

    def __init__(
        self,
        task_names=None,
        task_num_labels=None,
        dynamic_keys=None,
        granularity: str = "hard",
        routing_top_k: int = 2,
        router_layers: int | None = None,
        router_task_weights: list[list[float]] | None = None,
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
        self.routing_top_k = int(routing_top_k)
        self.router_layers = None if router_layers is None else int(router_layers)
        self.router_task_weights = (
            None if router_task_weights is None else [[float(w) for w in row] for row in router_task_weights]
        )
        self.shared_labels = bool(shared_labels)
        self.gate_config = dict(gate_config or {"task_names": self.task_names})


@dataclass
class GatedImageClassifierOutput(ImageClassifierOutput):
    """``logits`` over ``config.id2label`` plus every head's logits, the predicted task and the router."""

    task_logits: tuple[torch.Tensor, ...] | None = None
    predicted_task: torch.Tensor | None = None
    gate_probs: torch.Tensor | None = None


class _GatedBackbone(ViTModel):
    """A ``ViTModel`` whose routed parameters live in the parent; their slots stay ``None``."""

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


def _call(module: nn.Module, prefix: str, params: dict[str, torch.Tensor], *args):
    sub = {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}
    return torch.func.functional_call(module, sub, args, strict=False)


def run_backbone(vit: ViTModel, pixel_values, params: dict[str, torch.Tensor], num_layers=None):
    """The ViT's LayerNorm-ed token states with ``params`` (in-memory names) substituted, after
    its first ``num_layers`` blocks (all when ``None``)."""
    patch = "embeddings.patch_embeddings.projection.weight"
    dtype = (
        params[patch].dtype if patch in params else vit.embeddings.patch_embeddings.projection.weight.dtype
    )
    hidden = _call(vit.embeddings, "embeddings.", params, pixel_values.to(dtype))
    blocks, prefix = (
        (vit.layers, "layers.") if hasattr(vit, "layers") else (vit.encoder.layer, "encoder.layer.")
    )
    for i, layer in enumerate(blocks if num_layers is None else blocks[:num_layers]):
        hidden = _call(layer, f"{prefix}{i}.", params, hidden)
    return _call(vit.layernorm, "layernorm.", params, hidden)


class RoutedViTBase(PreTrainedModel):
    """Shared routing and inference of routed merged ViTs (gated, EMR): a subclass stores the
    per-task tensors and says how to build the backbone's routed tensors from task weights
    (:meth:`task_params`); this class routes, groups the batch and picks the heads."""

    config_class = GatedViTConfig
    base_model_prefix = "vit"
    main_input_name = "pixel_values"

    def _build_router_and_heads(self, config) -> None:
        self.heads = nn.ModuleList(nn.Linear(config.hidden_size, n) for n in config.task_num_labels)
        self.gate = TaskGate(TaskGateConfig(**config.gate_config))

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, nn.Linear) and module.weight is not None:
            module.weight.normal_(0.0, self.config.initializer_range)
            if module.bias is not None:
                module.bias.zero_()

    def _free_slots(self, names: list[str]) -> None:
        for name in names:
            owner, _, attr = name.rpartition(".")
            self.vit.get_submodule(owner).register_parameter(attr, None)

    @property
    def num_tasks(self) -> int:
        return len(self.config.task_names)

    def task_params(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def _router_params(self, device) -> list[dict[str, torch.Tensor]]:
        """``task_params`` of each router pass, cached until a parameter changes."""
        versions = tuple(p._version for p in self.parameters()) + tuple(b._version for b in self.buffers())
        cached = getattr(self, "_router_cache", None)
        if self.training or torch.is_grad_enabled() or cached is None or cached[0] != versions:
            rows = self.config.router_task_weights or [[1.0 / self.num_tasks] * self.num_tasks]
            params = [self.task_params(torch.tensor(row, dtype=torch.float32, device=device)) for row in rows]
            if self.training or torch.is_grad_enabled():
                return params
            self._router_cache = cached = (versions, params)
        return cached[1]

    def router_features(self, pixel_values) -> torch.Tensor:
        """CLS and mean patch token of every router pass, concatenated (the features gate's input)."""
        features = []
        for params in self._router_params(pixel_values.device):
            states = run_backbone(self.vit, pixel_values, params, self.config.router_layers)
            features += [states[:, 0], states[:, 1:].mean(1)]
        return torch.cat(features, dim=-1)

    def route(self, pixel_values) -> torch.Tensor:
        """The router's logits ``[batch, K]``."""
        if self.gate.config.kind == "features":
            return self.gate(features=self.router_features(pixel_values)).logits
        return self.gate(pixel_values).logits

    def _groups(self, probs: torch.Tensor):
        """Predicted task per image, routing weights per group ``[G, K]`` and each image's group."""
        mode = self.config.granularity
        if mode not in GRANULARITIES:
            raise ValueError(f"config.granularity must be one of {GRANULARITIES}, got {mode!r}")
        predicted = probs.argmax(-1)
        if mode == "batch":
            mean = probs.mean(0, keepdim=True)
            predicted = mean.argmax(-1).expand(probs.shape[0])
            return predicted, mean, torch.zeros_like(predicted)
        if mode == "hard":
            tasks, inverse = torch.unique(predicted, return_inverse=True)
            return predicted, nn.functional.one_hot(tasks, self.num_tasks).to(probs.dtype), inverse
        k = max(1, min(int(self.config.routing_top_k), self.num_tasks))
        top = probs.topk(k, dim=-1).indices.sort(dim=-1).values
        sets, inverse = torch.unique(top, dim=0, return_inverse=True)
        weights = torch.zeros(sets.shape[0], self.num_tasks, dtype=probs.dtype, device=probs.device)
        for g in range(sets.shape[0]):
            chosen = probs[inverse == g][:, sets[g]].mean(0)
            weights[g, sets[g]] = chosen / chosen.sum()
        return predicted, weights, inverse

    def forward(
        self,
        pixel_values=None,
        labels=None,
        task=None,
        task_labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        num_tasks = self.num_tasks
        gate_logits = self.route(pixel_values)
        probs = torch.softmax(gate_logits.float(), dim=-1)
        if task is not None:
            predicted = torch.as_tensor(task, device=probs.device).reshape(-1).expand(probs.shape[0])
            tasks, inverse = torch.unique(predicted, return_inverse=True)
            weights = nn.functional.one_hot(tasks, num_tasks).to(probs.dtype)
        else:
            predicted, weights, inverse = self._groups(probs.detach())
        features = None
        for g in range(weights.shape[0]):
            idx = (inverse == g).nonzero().squeeze(1)
            states = run_backbone(self.vit, pixel_values[idx], self.task_params(weights[g]))
            cls = states[:, 0, :]
            if features is None:
                features = cls.new_empty(pixel_values.shape[0], cls.shape[-1])
            features[idx] = cls
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
        if task_labels is not None:
            router_loss = nn.functional.cross_entropy(gate_logits.float(), task_labels)
            loss = router_loss if loss is None else loss + router_loss
        return GatedImageClassifierOutput(
            loss=loss,
            logits=logits,
            task_logits=task_logits,
            predicted_task=predicted,
            gate_probs=probs,
        )


class GatedMergedViTForImageClassification(RoutedViTBase):
    """Static merged ViT + K copies of the dynamic tensors + K heads + a task router."""

    config_class = GatedViTConfig
    # Not "vit": with every backbone tensor dynamic (``m: all``, the default) they all live in
    # ``dynamic``, a checkpoint holds no `vit.` keys, and transformers 4 would take it for a
    # headless base-model state dict and refuse it (as for the EMR class).
    base_model_prefix = "gated"

    def __init__(self, config: GatedViTConfig):
        super().__init__(config)
        self.vit = _GatedBackbone(config, add_pooling_layer=False)
        names = [memory_name(self.vit, k) for k in config.dynamic_keys]
        live = dict(self.vit.named_parameters())
        self.dynamic = nn.ParameterList(
            nn.Parameter(torch.empty(len(config.task_names), *live[n].shape, dtype=live[n].dtype))
            for n in names
        )
        self._free_slots(names)
        self._dynamic_names = names
        self._build_router_and_heads(config)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)  # the heads
        if isinstance(module, nn.ParameterList):
            for p in module:
                p.normal_(0.0, self.config.initializer_range)

    def task_params(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """Dynamic tensors merged with task weights ``[K]``: ``sum_k w_k W_k`` (in-memory names)."""
        nonzero = torch.nonzero(weights).flatten()
        if nonzero.numel() == 1 and float(weights[nonzero[0]]) == 1.0:  # one task: its own tensors
            k = int(nonzero[0])
            return {name: stack[k] for name, stack in zip(self._dynamic_names, self.dynamic, strict=True)}
        return {
            name: torch.tensordot(weights.to(stack.dtype), stack, dims=1)
            for name, stack in zip(self._dynamic_names, self.dynamic, strict=True)
        }

    merged_dynamic = task_params
