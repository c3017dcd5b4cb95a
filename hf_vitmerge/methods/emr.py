"""EMR-Merging (Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging",
NeurIPS 2024, https://arxiv.org/abs/2405.17461; reference code
github.com/harveyhuang18/EMR_Merging ``merge_vit/src/main_emr_merging.py``).

Elect, mask, rescale over the task vectors ``tau_k = W_k - W_0`` of every backbone tensor:

* elect: the sign ``s = sign(sum_k tau_k)`` (zero counts as negative, as in the reference)
  and, per entry, the largest ``|tau_k|`` among the tasks that agree with ``s``:
  ``tau_uni = s * max_k |tau_k| [tau_k * s > 0]``;
* mask: ``M_k = (tau_k * tau_uni > 0)``, one bit per entry and task;
* rescale: ``lambda_k = sum_t mean|tau_k,t| / sum_t mean|M_k,t * tau_uni,t|`` over the
  tensors ``t`` (one scalar per task, as in the reference).

Task ``k``'s backbone is ``W_0 + lambda_k M_k * tau_uni`` with its own head. EMR needs the
task id; here a router (the same as ``gated``'s: a head on the merged ViT's features by
default) supplies it, or the caller passes ``task=``. Storage: the base and the unified
vector (two models' backbones), K packed masks (K/32 of a model in float32), K heads, the
router.
"""

from __future__ import annotations

import time

import torch

from ..errors import ConfigError
from ..modeling.gated import GateKind, Granularity
from .base import MergeResult, read_heads
from .gated import (
    GateChannels,
    GateFraction,
    GateHidden,
    GateSamples,
    RouterLayers,
    TopK,
    check_router_layers,
    default_router_layers,
    routed_config,
    storage_facts,
    train_router,
)
from .registry import merge_method


def elect_mask_rescale(base: dict, models: list[dict]) -> tuple[dict, dict, list[float]]:
    """``(tau_uni, masks, rescalers)`` from base tensors and the K models' tensors (same keys).

    ``masks[key]`` is a boolean ``[K, *shape]`` tensor.
    """
    unified, masks = {}, {}
    num, den = torch.zeros(len(models), dtype=torch.float64), torch.zeros(len(models), dtype=torch.float64)
    for key, w0 in base.items():
        taus = torch.stack([m[key].to(torch.float32) - w0.to(torch.float32) for m in models])
        sign = torch.where(taus.sum(0) > 0, 1.0, -1.0)
        agree = taus * sign > 0
        tau_uni = sign * (taus.abs() * agree).amax(0)
        mask = taus * tau_uni > 0
        unified[key], masks[key] = tau_uni, mask
        num += taus.abs().flatten(1).mean(1).double()
        den += (mask * tau_uni).abs().flatten(1).mean(1).double()
    rescalers = [float(n / d) if d > 0 else 1.0 for n, d in zip(num, den, strict=True)]
    return unified, masks, rescalers


def _elect_from_sources(ctx, keys: list[str]):
    """Read the base and every input's backbone tensors and run elect / mask / rescale."""
    base_reader = ctx.base.tensors()
    base = {k: base_reader.get(k).to(torch.float32) for k in keys}
    base_reader.close()
    models = []
    for s in ctx.sources:
        r = s.tensors()
        models.append({k: r.get(k) for k in keys})
        r.close()
    unified, masks, rescalers = elect_mask_rescale(base, models)
    return base, unified, masks, rescalers


@torch.no_grad()
def _fill(model, keys, base, unified, masks, rescalers, heads) -> None:
    """Copy base, unified task vector, packed masks, rescalers and heads into the EMR model."""
    from ..modeling.emr import pack_mask

    for i, key in enumerate(keys):
        model.base[i].copy_(base[key])
        model.unified[i].copy_(unified[key])
        model.masks(i).copy_(torch.stack([pack_mask(m) for m in masks[key]]))
    model.rescalers.copy_(torch.tensor(rescalers))
    for lin, (w, b) in zip(model.heads, heads, strict=True):
        lin.weight.copy_(w)
        lin.bias.copy_(b)


def _emr_config(ctx, keys, granularity, top_k, router_layers, gate_config):
    """The EMR model's config: labels (shared or union), tasks, masked keys and routing."""
    from ..modeling.emr import EMRViTConfig

    return routed_config(
        ctx,
        EMRViTConfig,
        gate_config,
        masked_keys=keys,
        granularity=granularity,
        routing_top_k=top_k,
        router_layers=router_layers,
    )


def _checked_router_layers(ctx, granularity: str, router_layers: int | None) -> int:
    """Validate the routing options; the number of blocks the router reads."""
    from ..modeling.gated import GRANULARITIES

    if granularity not in GRANULARITIES:
        raise ConfigError(f"emr: `granularity` must be one of {GRANULARITIES}, got {granularity!r}")
    if len(ctx.sources) < 2:
        raise ValueError("emr: needs at least two models")
    check_router_layers(router_layers, ctx.adapter.spec.num_layers, "emr")
    return default_router_layers(router_layers, ctx.adapter.spec.num_layers)


def _resolve(_params: dict, setting) -> dict:
    """With the models read: the number of blocks the router reads."""
    if setting.num_layers is None:
        return {}
    return {"router_layers": default_router_layers(None, setting.num_layers)}


@merge_method(
    "emr",
    kind="model",
    needs_base=True,
    needs_data=lambda params: params["gate"] is None,  # only a router to train reads images
    reference="https://arxiv.org/abs/2405.17461",
    resolve=_resolve,
)
def emr(
    ctx,
    *,
    granularity: Granularity = "hard",
    top_k: TopK = 2,
    gate: str | None = None,
    gate_kind: GateKind = "features",
    router_layers: RouterLayers = None,
    gate_hidden: GateHidden = None,
    gate_samples_per_task: GateSamples = 512,
    gate_validation_fraction: GateFraction = 0.1,
    gate_channels: GateChannels = None,
    trainer: dict | None = None,
):
    """EMR-Merging: unified task vector + a binary mask and a rescaler per task, routed by a task router.

    ``granularity``, ``top_k`` and the ``gate*`` / ``router_layers`` / ``trainer`` options are
    those of ``gated`` (the router is trained the same way on each task's training images;
    ``gate: folder`` reuses one). Pass ``task=`` to the model's forward when the task is known.
    """
    from ..gate import router_config
    from ..modeling.emr import EMRMergedViTForImageClassification

    adapter = ctx.adapter
    router_layers = _checked_router_layers(ctx, granularity, router_layers)

    start = time.perf_counter()
    keys = list(adapter.backbone_keys)
    base, unified, masks, rescalers = _elect_from_sources(ctx, keys)
    heads = read_heads(ctx.sources)

    config = _emr_config(
        ctx,
        keys,
        granularity,
        top_k,
        router_layers,
        router_config(
            ctx, kind=gate_kind, gate=gate, channels=gate_channels, hidden=gate_hidden, method="emr"
        ),
    )
    model = EMRMergedViTForImageClassification(config)
    _fill(model, keys, base, unified, masks, rescalers, heads)
    model.eval()

    info = train_router(
        ctx,
        model,
        method="emr",
        combined=" (elect, mask, rescale)",
        gate=gate,
        samples_per_task=gate_samples_per_task,
        validation_fraction=gate_validation_fraction,
        trainer=trainer,
    )
    kept = {
        name: round(float(torch.stack([masks[k][t].float().mean() for k in keys]).mean()), 4)
        for t, name in enumerate(ctx.task_names)
    }
    info.update(
        {
            "granularity": granularity,
            "router_layers": router_layers,
            "rescalers": {name: round(v, 4) for name, v in zip(ctx.task_names, rescalers, strict=True)},
            "mask_density": kept,
            **storage_facts(ctx, model),
            "merge_seconds": round(time.perf_counter() - start - ctx.timings["stats_seconds"], 3),
        }
    )
    return MergeResult(model=model, info=info)
