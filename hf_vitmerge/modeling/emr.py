"""An EMR-merged ViT: one unified task vector, a 1-bit mask and a rescaler per task, routed.

EMR-Merging (Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging", NeurIPS
2024, https://arxiv.org/abs/2405.17461; code github.com/harveyhuang18/EMR_Merging). For task
``k`` the backbone is ``W_0 + lambda_k * (M_k * tau_uni)``: the base weights, the elected
unified task vector ``tau_uni``, the task's binary mask ``M_k`` (stored packed, 8 per byte)
and its scalar rescaler ``lambda_k``. Routing weights ``w`` (one-hot by default) give
``W_0 + tau_uni * sum_k w_k lambda_k M_k``. The task comes from the router (as in
:mod:`.gated`, whose routing and inference this class shares) or from ``task=``.

Self-contained apart from ``.gated`` (copied alongside by ``save_pretrained``), so the model
loads with ``trust_remote_code=True`` where hf_vitmerge is not installed.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .gated import GatedViTConfig, RoutedViTBase, _GatedBackbone, memory_name


class EMRViTConfig(GatedViTConfig):
    """The gated layout's config (tasks, heads, router) plus the keys carrying EMR masks."""

    model_type = "vit_emr"

    def __init__(self, masked_keys=None, **kwargs):
        super().__init__(**kwargs)
        self.masked_keys = list(masked_keys or [])


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as little-endian packed bits (uint8, 8 entries per byte)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    flat = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, 8)
    shifts = torch.arange(8, dtype=torch.uint8, device=flat.device)
    return (flat << shifts).sum(-1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: a {0, 1} float tensor of ``shape``."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(-1)[: math.prod(shape)].reshape(shape).float()


class EMRMergedViTForImageClassification(RoutedViTBase):
    """Base ViT + unified task vector + K packed masks and rescalers + K heads + a task router."""

    config_class = EMRViTConfig
    # Not "vit": every backbone weight lives in `base` / `unified`, so a checkpoint holds no `vit.`
    # keys, and transformers 4 would take it for a headless base-model state dict and refuse it.
    base_model_prefix = "emr"

    def __init__(self, config: EMRViTConfig):
        super().__init__(config)
        self.vit = _GatedBackbone(config, add_pooling_layer=False)
        names = [memory_name(self.vit, k) for k in config.masked_keys]
        live = dict(self.vit.named_parameters())
        shapes = [tuple(live[n].shape) for n in names]
        num_tasks = len(config.task_names)
        self.base = nn.ParameterList(nn.Parameter(torch.empty(s)) for s in shapes)
        self.unified = nn.ParameterList(nn.Parameter(torch.empty(s)) for s in shapes)
        self.rescalers = nn.Parameter(torch.ones(num_tasks))
        for i, s in enumerate(shapes):
            self.register_buffer(
                f"mask_{i}", torch.zeros(num_tasks, -(-math.prod(s) // 8), dtype=torch.uint8)
            )
        self._free_slots(names)
        self._masked_names, self._shapes = names, shapes
        self._build_router_and_heads(config)
        self.post_init()

    def masks(self, i: int) -> torch.Tensor:
        """Packed masks ``[K, bytes]`` of the ``i``-th masked tensor."""
        return getattr(self, f"mask_{i}")

    def task_params(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """``W_0 + tau_uni * sum_k w_k lambda_k M_k`` for every masked tensor (in-memory names)."""
        coef = weights.to(self.rescalers.dtype) * self.rescalers
        used = [k for k in range(coef.shape[0]) if float(weights[k]) != 0.0]
        out = {}
        for i, (name, shape) in enumerate(zip(self._masked_names, self._shapes, strict=True)):
            packed = self.masks(i)
            scale = sum(coef[k] * unpack_mask(packed[k], shape).to(coef.device) for k in used)
            out[name] = self.base[i] + self.unified[i] * scale
        return out
