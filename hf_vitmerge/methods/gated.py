"""Gated merging (Ye et al., "Merging Vision Transformers from Different Tasks and Domains",
arXiv 2312.16240, https://arxiv.org/abs/2312.16240; journal version "Dynamic Model Merging with
Mixture of Weights", code github.com/harveyhuang18/Mixture_of_Weights).

A gate (a small CNN, :mod:`hf_vitmerge.gate`) predicts each image's task. *Dynamic* tensors
are merged per image as ``sum_k p_k W_k`` with the gate's probabilities ``p``; all other
tensors come from a static merge; the predicted task's own classifier is used. Dynamic are:
the embeddings, every LayerNorm, and the ``m`` least-similar attention blocks and ``m``
least-similar MLP blocks, ranked by the mean pairwise cosine similarity of the blocks'
flattened weights across the K models.

Deviations from the released code, each an option where it matters:

* the patch projection is dynamic by default (the released code keeps ``conv1`` static):
  ``dynamic_patch_embedding``; the final LayerNorm is dynamic too ("every LayerNorm");
* inference merges per image (``granularity: sample``) so that batches mixing tasks are
  correct; ``batch`` is the released per-batch mean, ``hard`` the argmax one-hot;
* the static part is any registered method (the released code uses AdaMerging++);
* the gate: see :mod:`hf_vitmerge.gate` (CE on logits, train splits only, own small CNN).
"""

from __future__ import annotations

import itertools
import math

import torch

from ..arch import ViTAdapter
from .base import MergeResult, merged_config_dict, read_heads, union_labels
from .registry import get_method, merge_method

SIMILARITY_ON = ("weights", "task_vectors")
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
        raise ValueError("gated: `similarity_on: task_vectors` needs `base_model`")
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
        raise ValueError(f"gated: `m` must be an integer in 0..{num_layers} or 'all', got {m!r}")
    return m


def static_backbone(ctx, method: str, parameters: dict | None, keys: list[str]) -> dict[str, torch.Tensor]:
    """The static tensors ``keys`` from any registered merge method."""
    spec = get_method(method)
    if spec.name == "gated":
        raise ValueError("gated: `static_method` cannot be 'gated'")
    params = spec.validate_params(parameters)
    if spec.needs_base and ctx.base is None:
        raise ValueError(f"gated: static method {spec.name!r} needs `base_model`")
    if spec.kind == "tensorwise":
        return ctx.run_tensorwise(spec, params, keys)
    result = spec.fn(ctx, **params)
    if result.backbone is None:
        raise ValueError(f"gated: static method {spec.name!r} returns no backbone tensors and cannot be used")
    return {k: result.backbone[k] for k in keys}


@merge_method("gated", kind="model", needs_data=True, reference="https://arxiv.org/abs/2312.16240")
def gated(
    ctx,
    *,
    m: int | str | None = None,
    granularity: str = "sample",
    similarity_on: str = "weights",
    dynamic_patch_embedding: bool = True,
    static_method: str = "task_arithmetic",
    static_parameters: dict | None = None,
    gate: str | None = None,
    gate_samples_per_task: int = 512,
    gate_validation_fraction: float = 0.1,
    gate_channels: list | None = None,
    trainer: dict | None = None,
):
    """Gated merging: a task gate mixes dynamic layers per image; the rest is merged statically.

    ``m``: number of attention blocks and of MLP blocks made dynamic (0..num_layers or "all";
    default: the released 5 of 12, scaled to the depth). ``granularity``: sample | hard | batch.
    ``similarity_on``: weights (paper) | task_vectors. ``dynamic_patch_embedding``: the patch
    projection is dynamic (the released code keeps it static). ``static_method`` /
    ``static_parameters``: any registered method for the static tensors. ``gate``: folder of a
    trained gate to reuse; otherwise one is trained on ``gate_samples_per_task`` train images per
    task, ``gate_validation_fraction`` of them held back, with a CNN of ``gate_channels``
    (default [16, 32, 64]) and ``trainer`` overrides for ``transformers.TrainingArguments``.
    """
    import time

    from ..data import load_task_data
    from ..gate import gate_pixels, load_gate, train_gate
    from ..modeling.gated import GRANULARITIES, GatedMergedViTForImageClassification, GatedViTConfig

    adapter = ctx.adapter
    num_layers = adapter.spec.num_layers
    num_tasks = len(ctx.sources)
    m = resolve_m(m, num_layers)
    if granularity not in GRANULARITIES:
        raise ValueError(f"gated: `granularity` must be one of {GRANULARITIES}, got {granularity!r}")
    if similarity_on not in SIMILARITY_ON:
        raise ValueError(f"gated: `similarity_on` must be one of {SIMILARITY_ON}, got {similarity_on!r}")
    if num_tasks < 2:
        raise ValueError("gated: needs at least two models")
    if trainer is not None and not isinstance(trainer, dict):
        raise TypeError(f"gated: `trainer` must be a mapping of TrainingArguments fields, got {trainer!r}")

    start = time.perf_counter()
    sims = block_similarities(ctx, similarity_on)
    blocks = {kind: least_similar(sims[kind], m) for kind in BLOCK_KINDS}
    dyn = dynamic_keys(adapter, blocks, patch_embedding=dynamic_patch_embedding)
    static_keys = [k for k in adapter.backbone_keys if k not in set(dyn)]
    static = static_backbone(ctx, static_method, static_parameters, static_keys)

    readers = [s.tensors() for s in ctx.sources]
    stacks = {k: torch.stack([r.get(k).to(torch.float32) for r in readers]) for k in dyn}
    for r in readers:
        r.close()
    heads = read_heads(ctx.sources)

    stats_start = time.perf_counter()
    stats_before = ctx.timings.get("stats_seconds", 0.0)
    info: dict = {
        "training_note": "Only the task gate was trained (on unlabeled training images, task id as label); "
        "the ViT weights were combined directly."
    }
    if gate is not None:
        gate_model = load_gate(gate, ctx.task_names)
        info["gate"] = str(gate)
        info["gate_validation_accuracy"] = gate_model.config.validation_accuracy
    else:
        processor = ctx.sources[0].image_processor()
        data = []
        for i, entry in enumerate(ctx.config.models):
            if entry.data is None:
                raise ValueError(
                    f"gated: model {ctx.sources[i].ref!r} has no `data:` entry; the gate needs each task's "
                    "training images (or pass a trained gate with `gate: folder`)"
                )
            if entry.data.split is not None and entry.data.split == entry.data.test_split:
                raise ValueError(
                    f"gated: model {ctx.sources[i].ref!r}: `split` and `test_split` are both "
                    f"{entry.data.split!r}; the gate must not be trained on evaluation data"
                )
            task = load_task_data(
                entry.data.path,
                entry.data.split,
                image_column=entry.data.image_column,
                revision=entry.data.revision,
            )
            data.append(task.subset(gate_samples_per_task, seed=ctx.seed))
        pixels = gate_pixels(data, processor, ctx.config.calibration.batch_size)
        gate_model, gate_info = train_gate(
            pixels,
            ctx.task_names,
            channels=gate_channels or (16, 32, 64),
            validation_fraction=gate_validation_fraction,
            trainer=trainer,
            seed=ctx.seed,
            device=ctx.device,
            quiet=ctx.quiet,
        )
        info.update(gate_info)
    ctx.timings["stats_seconds"] = round(stats_before + time.perf_counter() - stats_start, 3)

    shared = all(labels == ctx.label_lists[0] for labels in ctx.label_lists)
    labels = ctx.label_lists[0] if shared else union_labels(ctx.task_names, ctx.label_lists)
    id2label = dict(enumerate(labels))
    config = GatedViTConfig(
        **merged_config_dict(ctx),
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        task_names=ctx.task_names,
        task_num_labels=[len(x) for x in ctx.label_lists],
        dynamic_keys=dyn,
        granularity=granularity,
        shared_labels=shared,
        gate_config={
            "task_names": list(gate_model.config.task_names),
            "num_channels": gate_model.config.num_channels,
            "channels": list(gate_model.config.channels),
            "pool_size": gate_model.config.pool_size,
            "validation_accuracy": gate_model.config.validation_accuracy,
        },
    )
    model = GatedMergedViTForImageClassification(config)
    ViTAdapter.from_model(model).load_state_dict(model, static, strict=False)
    with torch.no_grad():
        for param, key in zip(model.dynamic, dyn, strict=True):
            param.copy_(stacks[key])
        for lin, (w, b) in zip(model.heads, heads, strict=True):
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        model.gate.load_state_dict(gate_model.state_dict())
    model.eval()

    separate = sum(math.prod(p.shape) for s in ctx.sources for p in s.adapter.params)
    total = sum(p.numel() for p in model.parameters())
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    info.update(
        {
            "m": m,
            "granularity": granularity,
            "static_method": static_method,
            "similarity_on": similarity_on,
            "dynamic_blocks": blocks,
            "block_similarity": {
                k: {str(layer): round(v, 6) for layer, v in s.items()} for k, s in sims.items()
            },
            "num_dynamic_tensors": len(dyn),
            "num_parameters": total,
            "storage_bytes": nbytes,
            "separate_models_parameters": separate,
            "storage_ratio": round(total / separate, 4),
            "merge_seconds": round(time.perf_counter() - start - ctx.timings["stats_seconds"], 3),
        }
    )
    return MergeResult(model=model, info=info)
