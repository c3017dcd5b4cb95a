"""Gated merging (Ye et al., "Merging Vision Transformers from Different Tasks and Domains",
arXiv 2312.16240, https://arxiv.org/abs/2312.16240; journal version "Dynamic Model Merging with
Mixture of Weights", code github.com/harveyhuang18/Mixture_of_Weights).

A router (:mod:`hf_vitmerge.gate`; by default a small head on the merged ViT's own features,
or a small CNN) predicts each image's task. *Dynamic* tensors are merged per group of
identically routed images as ``sum_k w_k W_k`` (``w``: the one-hot predicted task by default);
all other tensors come from a static merge; the predicted task's own classifier is used.
Dynamic are:
the embeddings, every LayerNorm, and the ``m`` least-similar attention blocks and ``m``
least-similar MLP blocks, ranked by the mean pairwise cosine similarity of the blocks'
flattened weights across the K models.

Deviations from the released code, each an option where it matters:

* the patch projection is dynamic by default (the released code keeps ``conv1`` static):
  ``dynamic_patch_embedding``; the final LayerNorm is dynamic too ("every LayerNorm");
* inference groups each batch by routing (``granularity: hard``, the default, or ``topk``), so
  batches mixing tasks are correct and never cost one forward per image; ``batch`` is the
  released per-batch mean;
* the static part is any registered method (the released code uses AdaMerging++); ``auto``
  takes task arithmetic when there is a base model and plain averaging when there is none
  (independently initialised inputs);
* the router: see :mod:`hf_vitmerge.gate` (features of the merged backbone, CE on logits,
  train splits only).
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Annotated, Literal, get_args

import torch
from pydantic import Field

from ..arch import ViTAdapter
from ..errors import ConfigError
from ..modeling.gated import GateKind, Granularity
from .base import MergeResult, merged_config_dict, read_heads, union_labels
from .registry import AUTO, Setting, get_method, merge_method

SimilarityOn = Literal["weights", "task_vectors"]
SIMILARITY_ON = get_args(SimilarityOn)
RouterReads = Literal["auto", "merged", "first", "every"]
# router options shared by gated and emr
RouterLayers = Annotated[int, Field(ge=0)] | None
GateHidden = Annotated[int, Field(ge=1)] | None
GateSamples = Annotated[int, Field(ge=1)]
GateFraction = Annotated[float, Field(ge=0, lt=1)]
GateChannels = list[Annotated[int, Field(ge=1)]] | None
TopK = Annotated[int, Field(ge=1)]
BLOCK_KINDS = ("attention", "mlp")


def mean_pairwise_cosine(vectors: list[torch.Tensor]) -> float:
    """Mean cosine similarity over all pairs of flattened vectors (float64)."""
    if len(vectors) < 2:
        raise ValueError("similarity needs at least two models")
    flat = [v.reshape(-1).to(torch.float64) for v in vectors]
    sims = [torch.nn.functional.cosine_similarity(a, b, dim=0) for a, b in itertools.combinations(flat, 2)]
    return float(torch.stack(sims).mean())


def least_similar(similarity: dict[int, float], m: int) -> list[int]:
    """The ``m`` layers with the lowest similarity (ties: lower layer first), sorted by layer."""
    ranked = sorted(similarity, key=lambda layer: (similarity[layer], layer))
    return sorted(ranked[:m])


def block_similarities(ctx, similarity_on: str = "weights") -> dict[str, dict[int, float]]:
    """``{kind: {layer: mean pairwise cosine}}`` for attention and MLP blocks of the inputs."""
    adapter: ViTAdapter = ctx.adapter
    if similarity_on == "task_vectors" and ctx.base is None:
        raise ConfigError("gated: `similarity_on: task_vectors` needs `base_model`")
    readers = [s.tensors() for s in ctx.sources]
    base = ctx.base.tensors() if similarity_on == "task_vectors" else None
    out: dict[str, dict[int, float]] = {kind: {} for kind in BLOCK_KINDS}
    for kind in BLOCK_KINDS:
        for layer in range(adapter.spec.num_layers):
            keys = adapter.block_keys(layer, kind)
            vecs = []
            for r in readers:
                parts = [r.get(k).to(torch.float64).reshape(-1) for k in keys]
                if base is not None:
                    parts = [
                        p - base.get(k).to(torch.float64).reshape(-1)
                        for p, k in zip(parts, keys, strict=True)
                    ]
                vecs.append(torch.cat(parts))
            out[kind][layer] = mean_pairwise_cosine(vecs)
    for r in readers + ([base] if base is not None else []):
        r.close()
    return out


def dynamic_keys(
    adapter: ViTAdapter, blocks: dict[str, list[int]], *, patch_embedding: bool = True
) -> list[str]:
    """Canonical keys of the dynamic tensors: embeddings, every LayerNorm, the chosen blocks."""
    keys = [adapter.key("cls", ""), adapter.key("pos", "")]
    if patch_embedding:
        keys += [adapter.key("patch", "weight"), adapter.key("patch", "bias")]
    keys += adapter.keys_of_kind("norm")
    for kind, layers in blocks.items():
        for layer in layers:
            keys += adapter.block_keys(layer, kind)
    order = {k: i for i, k in enumerate(adapter.keys)}
    return sorted(set(keys), key=order.__getitem__)


def resolve_m(m, num_layers: int) -> int:
    if m is None:  # the released default, 5 of 12 blocks, scaled to the depth
        return round(5 * num_layers / 12)
    if m == "all":
        return num_layers
    if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= num_layers:
        raise ConfigError(f"gated: `m` must be an integer in 0..{num_layers} or 'all', got {m!r}")
    return m


def resolve_static_method(ctx, method: str) -> str:
    """``auto``: task arithmetic when a base model is given, averaging (which needs none) otherwise."""
    if method != "auto":
        return method
    return "task_arithmetic" if ctx.base is not None else "average"


def static_backbone(ctx, method: str, parameters: dict | None, keys: list[str]) -> dict[str, torch.Tensor]:
    """The static tensors ``keys`` from any registered merge method."""
    if not keys:
        return {}
    spec = get_method(method)
    if spec.name == "gated":
        raise ConfigError("gated: `static_method` cannot be 'gated'")
    params = spec.validate_params(parameters, allow_auto=False)
    if spec.needs_base and ctx.base is None:
        raise ConfigError(f"gated: static method {spec.name!r} needs `base_model`")
    if spec.kind == "tensorwise":
        return ctx.run_tensorwise(spec, params, keys)
    result = spec.fn(ctx, **params)
    if result.backbone is None:
        raise ConfigError(
            f"gated: static method {spec.name!r} returns no backbone tensors and cannot be used"
        )
    return {k: result.backbone[k] for k in keys}


def _checked_options(num_tasks: int, num_layers: int, granularity, similarity_on, router_layers) -> int:
    """Validate the routing options; the number of blocks the router reads."""
    from ..modeling.gated import GRANULARITIES

    if granularity not in GRANULARITIES:
        raise ConfigError(f"gated: `granularity` must be one of {GRANULARITIES}, got {granularity!r}")
    if similarity_on not in SIMILARITY_ON:
        raise ConfigError(f"gated: `similarity_on` must be one of {SIMILARITY_ON}, got {similarity_on!r}")
    if num_tasks < 2:
        raise ValueError("gated: needs at least two models")
    check_router_layers(router_layers, num_layers, "gated")
    return default_router_layers(router_layers, num_layers)


def routed_config(ctx, config_cls, gate_config: dict, **layout):
    """The config of a routed model (gated, EMR): labels (shared by the tasks or their union),
    tasks and their label counts, the router's ``gate_config`` and the model's own ``layout``."""
    shared = all(labels == ctx.label_lists[0] for labels in ctx.label_lists)
    labels = ctx.label_lists[0] if shared else union_labels(ctx.task_names, ctx.label_lists)
    id2label = dict(enumerate(labels))
    return config_cls(
        **merged_config_dict(ctx),
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        task_names=ctx.task_names,
        task_num_labels=[len(x) for x in ctx.label_lists],
        shared_labels=shared,
        gate_config=gate_config,
        **layout,
    )


def _build_model(ctx, dyn: list[str], static: dict, routing: dict, gate_config):
    """The gated model: static merged tensors, every task's dynamic tensors stacked, all heads."""
    from ..modeling.gated import GatedMergedViTForImageClassification, GatedViTConfig

    readers = [s.tensors() for s in ctx.sources]
    stacks = {k: torch.stack([r.get(k).to(torch.float32) for r in readers]) for k in dyn}
    for r in readers:
        r.close()
    heads = read_heads(ctx.sources)

    config = routed_config(ctx, GatedViTConfig, gate_config, dynamic_keys=dyn, **routing)
    model = GatedMergedViTForImageClassification(config)
    ViTAdapter.from_model(model).load_state_dict(model, static, strict=False)
    with torch.no_grad():
        for param, key in zip(model.dynamic, dyn, strict=True):
            param.copy_(stacks[key])
        for lin, (w, b) in zip(model.heads, heads, strict=True):
            lin.weight.copy_(w)
            lin.bias.copy_(b)
    return model


def _facts(ctx, model, sims, blocks, dyn, static_name, start) -> dict:
    """What the card records about a gated merge: dynamic blocks, similarities, storage, time."""
    return {
        "static_method": static_name or "none (every backbone tensor is dynamic)",
        "dynamic_blocks": blocks,
        "block_similarity": {k: {str(layer): round(v, 6) for layer, v in s.items()} for k, s in sims.items()},
        "num_dynamic_tensors": len(dyn),
        **storage_facts(ctx, model),
        "merge_seconds": round(time.perf_counter() - start - ctx.timings["stats_seconds"], 3),
    }


def train_router(ctx, model, *, method: str, combined: str = "", **router_options) -> dict:
    """Fit the task router inside a routed ``model`` (timed as statistics); the facts for the card.
    ``combined`` says how the ViT weights were combined, in the training note."""
    from ..gate import fit_router

    stats_start = time.perf_counter()
    stats_before = ctx.timings.get("stats_seconds", 0.0)
    info: dict = {
        "training_note": "Only the task router was trained (on unlabeled training images, task id as label); "
        f"the ViT weights were combined directly{combined}."
    }
    info.update(fit_router(ctx, model, method=method, **router_options))
    ctx.timings["stats_seconds"] = round(stats_before + time.perf_counter() - stats_start, 3)
    model.eval()
    return info


def _check(params: dict, setting: Setting) -> None:
    """What the schema cannot say: the base model some options need, and the static method (a
    registered method other than gated, or ``auto``) with its own parameters."""
    if params["similarity_on"] == "task_vectors" and not setting.has_base:
        raise ValueError("gated: `similarity_on: task_vectors` needs `base_model`")
    if params["static_method"] == AUTO:
        return
    spec = get_method(params["static_method"])
    if spec.name == "gated":
        raise ValueError("gated: `static_method` cannot be 'gated'")
    if spec.needs_base and not setting.has_base:
        raise ValueError(f"gated: static method {spec.name!r} needs `base_model`")
    spec.validate_params(params["static_parameters"], allow_auto=False)


def _needs_data(params: dict) -> bool:
    """Training a router reads each task's images; a reused router (``gate``) does not, unless the
    static method reads calibration data."""
    if params["gate"] is None:
        return True
    static = params["static_method"]
    if static == AUTO:
        return False  # task arithmetic or averaging
    spec = get_method(static)
    return spec.requires_data(spec.validate_params(params["static_parameters"], allow_auto=False))


def _resolve(params: dict, setting: Setting) -> dict:
    """The static method ``auto`` stands for; with the models read, ``m`` and ``router_layers``."""
    out = {"static_method": "task_arithmetic" if setting.has_base else "average"}
    if setting.num_layers is not None:
        out["m"] = resolve_m(None, setting.num_layers)
        out["router_layers"] = default_router_layers(None, setting.num_layers)
    return out


@merge_method(
    "gated",
    kind="model",
    needs_data=_needs_data,
    reference="https://arxiv.org/abs/2312.16240",
    check=_check,
    resolve=_resolve,
)
def gated(
    ctx,
    *,
    m: Annotated[int, Field(ge=0)] | Literal["all"] | None = "all",
    granularity: Granularity = "hard",
    top_k: TopK = 2,
    similarity_on: SimilarityOn = "weights",
    dynamic_patch_embedding: bool = True,
    static_method: str = "auto",
    static_parameters: dict | None = None,
    gate: str | None = None,
    gate_kind: GateKind = "features",
    router_layers: RouterLayers = None,
    router_reads: RouterReads = "auto",
    gate_hidden: GateHidden = None,
    gate_samples_per_task: GateSamples = 512,
    gate_validation_fraction: GateFraction = 0.1,
    gate_channels: GateChannels = None,
    trainer: dict | None = None,
):
    """Gated merging: a task router picks which task's dynamic layers run each image; the rest is merged statically.

    ``m``: number of attention blocks and of MLP blocks made dynamic (0..num_layers or "all",
    the default; ``null``: the released 5 of 12, scaled to the depth). ``granularity``: hard
    (group a batch by predicted task) | topk (group by the ``top_k`` most likely tasks, mix
    their weights) | batch (the released per-batch mean). ``similarity_on``: weights (paper) |
    task_vectors. ``dynamic_patch_embedding``: the patch projection is dynamic (the released
    code keeps it static). ``static_method`` / ``static_parameters``: any registered method
    for the static tensors; ``auto``: task_arithmetic with a base model, average without.
    ``gate``: folder of a trained router to reuse; otherwise one is trained with
    ``transformers.Trainer`` on ``gate_samples_per_task`` train images per task,
    ``gate_validation_fraction`` of them held back. ``gate_kind``: features (a head with
    ``gate_hidden`` units (default: the ViT's width) on the CLS and mean patch token of the backbone(s) of ``router_reads``
    after ``router_layers`` blocks; null: a quarter of them, at least one) | cnn (a CNN of ``gate_channels``).
    ``router_reads``: auto | merged | first | every, the backbones the features router reads
    (:func:`resolve_router_reads`).
    ``trainer``: overrides for ``transformers.TrainingArguments``.
    """
    adapter = ctx.adapter
    num_layers = adapter.spec.num_layers
    num_tasks = len(ctx.sources)
    m = resolve_m(m, num_layers)
    router_layers = _checked_options(num_tasks, num_layers, granularity, similarity_on, router_layers)

    start = time.perf_counter()
    sims = block_similarities(ctx, similarity_on)
    blocks = {kind: least_similar(sims[kind], m) for kind in BLOCK_KINDS}
    dyn = dynamic_keys(adapter, blocks, patch_embedding=dynamic_patch_embedding)
    static_keys = [k for k in adapter.backbone_keys if k not in set(dyn)]
    reads = resolve_router_reads(ctx, router_reads, has_static=bool(static_keys), router_layers=router_layers)
    static_name = resolve_static_method(ctx, static_method)
    static = static_backbone(ctx, static_name, static_parameters, static_keys)
    task_weights, gate_config = _router_setup(
        ctx, reads, kind=gate_kind, gate=gate, channels=gate_channels, hidden=gate_hidden
    )
    routing = dict(
        granularity=granularity,
        routing_top_k=top_k,
        router_layers=router_layers,
        router_task_weights=task_weights,
    )
    model = _build_model(ctx, dyn, static, routing, gate_config)
    model.eval()

    router_options = dict(
        samples_per_task=gate_samples_per_task, validation_fraction=gate_validation_fraction
    )
    info = train_router(ctx, model, method="gated", gate=gate, trainer=trainer, **router_options)
    if static_keys and ctx.base is None:
        info["static_note"] = (
            f"No base model: the static tensors were merged with {static_name!r}, which needs none."
        )
    info.update(
        _facts(ctx, model, sims, blocks, dyn, static_name if static_keys else None, start)
        | {"m": m, "granularity": granularity, "similarity_on": similarity_on, "router_layers": router_layers}
        | {"router_reads": reads if gate_kind == "features" else "image (cnn)"}
    )
    return MergeResult(model=model, info=info)


ROUTER_READS = get_args(RouterReads)


def resolve_router_reads(ctx, router_reads: str, *, has_static: bool, router_layers: int) -> str:
    """``merged``, ``first`` or ``every``: the backbones the features router reads.

    merged: every task weighted equally (one pass); first: the first input model's own tensors
    (one pass); every: each input model's own tensors (K passes, features concatenated). auto:
    every when its K passes cost at most half a forward pass (2 x K x ``router_layers`` <= the
    number of blocks), so that the routed model keeps at least half one model's throughput;
    otherwise merged with a base model or static tensors, and first without (the inputs may then
    be differently initialised, and their average computes no useful features).
    """
    if router_reads not in ROUTER_READS:
        raise ConfigError(f"gated: `router_reads` must be one of {ROUTER_READS}, got {router_reads!r}")
    if router_reads != "auto":
        return router_reads
    if 2 * len(ctx.sources) * router_layers <= ctx.adapter.spec.num_layers:
        return "every"
    return "merged" if ctx.base is not None or has_static else "first"


def one_hot(k: int, n: int) -> list[float]:
    return [1.0 if i == k else 0.0 for i in range(n)]


def _router_setup(ctx, reads: str, **gate_options) -> tuple[list[list[float]] | None, dict]:
    """The router's rows of task weights, one per backbone pass (``None``: one equally weighted
    pass), and its ``gate_config``."""
    from ..gate import router_config

    n = len(ctx.sources)
    rows = {"merged": None, "first": [one_hot(0, n)], "every": [one_hot(k, n) for k in range(n)]}[reads]
    return rows, router_config(ctx, method="gated", passes=len(rows or [None]), **gate_options)


def default_router_layers(router_layers, num_layers: int) -> int:
    """``null``: a quarter of the blocks (at least one). On shapes-tasks (tiny) one of three blocks
    routed as well as all three at twice the throughput (BENCHMARKS.md, issue 13)."""
    return max(1, num_layers // 4) if router_layers is None else router_layers


def check_router_layers(router_layers, num_layers: int, method: str) -> None:
    if router_layers is None:
        return
    if (
        isinstance(router_layers, bool)
        or not isinstance(router_layers, int)
        or not 0 <= router_layers <= num_layers
    ):
        raise ConfigError(
            f"{method}: `router_layers` must be null or an integer in 0..{num_layers}, got {router_layers!r}"
        )


def storage_facts(ctx, model) -> dict:
    """Parameters and bytes of a routed model against K separate models (ratio of bytes)."""
    separate = sum(math.prod(p.shape) for s in ctx.sources for p in s.adapter.params)
    total = sum(p.numel() for p in model.parameters())
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    separate_bytes = 4 * separate
    return {
        "num_parameters": total,
        "storage_bytes": nbytes,
        "separate_models_parameters": separate,
        "storage_ratio": round(nbytes / separate_bytes, 4),
    }
