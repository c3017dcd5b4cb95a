"""Merge / unmerge transforms through a whole ViT, and the helpers shared by alignment methods.

A *transform set* maps each merge group of :meth:`ViTAdapter.groups` (``residual``, ``qk.i``,
``vo.i``, ``mlp.i``) to ``(M, U)``: one merge matrix ``M_m`` ``[n_out, d]`` and one unmerge
matrix ``U_m`` ``[d, n_out]`` per model (see :mod:`hf_vitmerge.matching`). ``M_m`` is applied
on every ``outputs`` (key, axis) of the group and ``U_m`` on every ``inputs`` (key, axis), and
the merged tensors are ``sum_m`` of the transformed models (ZipIt!, Eq. 8:
``W* = sum_m M_m W_m U_m^prev``, ``b* = sum_m M_m b_m``). So:

* one residual map covers the patch projection, CLS token, position embeddings (feature
  axis), every o-projection and fc2 output, every LayerNorm and the classifier input;
* per block, Q and K share one within-head map (the QK group), V and O share another (VO);
* the QK and VO maps of a block are solved with ONE head assignment
  (:func:`hf_vitmerge.matching.match_heads` on both similarities), because head ``h``'s
  attention pattern multiplies head ``h``'s values. MuDSC's released code solves the two
  head assignments independently, which is not function-preserving for models of different
  initialisations; Verma & Elbayad (https://arxiv.org/abs/2403.00986) pass the VO head
  assignment to QK. Here both similarities vote on a single assignment.

For permutations the merged model of a model with a permuted copy of itself reproduces the
model exactly (tests/test_alignment.py); zips are exact only for linear paths (LayerNorm,
GELU and softmax make them approximate).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Literal, get_args

import torch

from .arch import MergeGroup, ViTAdapter
from .assembly import assemble
from .errors import ConfigError
from .matching import (
    Transforms,
    hungarian_match,
    match_heads,
    permutation_transforms,
    zip_match,
    zip_within_heads,
)
from .methods.base import MergeResult, merged_config_dict, union_labels

TransformSet = dict[str, Transforms]
Owners = dict[str, list[tuple[int, str, str]]]  # key -> [(axis, group name, "out" | "in")]


# ------------------------------------------------------------------------------ applying transforms
def axis_owners(groups: Sequence[MergeGroup]) -> Owners:
    """For every canonical key, the (axis, group, side) pairs that transform it."""
    owners: Owners = {}
    for g in groups:
        for key, axis in g.outputs:
            owners.setdefault(key, []).append((axis, g.name, "out"))
        for key, axis in g.inputs:
            owners.setdefault(key, []).append((axis, g.name, "in"))
    return owners


def _apply(tensor: torch.Tensor, matrix: torch.Tensor, axis: int, side: str) -> torch.Tensor:
    """``M`` (``[n_out, d]``) on an output axis, or ``U`` (``[d, n_out]``) on an input axis."""
    dims = ([axis], [1]) if side == "out" else ([axis], [0])
    return torch.tensordot(tensor, matrix.to(tensor.dtype), dims=dims).movedim(-1, axis)


def transform_tensor(
    key: str,
    tensor: torch.Tensor,
    owners: Owners,
    transforms: Mapping[str, Transforms],
    model: int,
    skip_axis: int | None = None,
) -> torch.Tensor:
    """Model ``model``'s tensor with every known transform applied (``skip_axis`` left alone)."""
    for axis, group, side in owners.get(key, ()):
        if axis == skip_axis or group not in transforms:
            continue
        ms, us = transforms[group]
        tensor = _apply(tensor, ms[model] if side == "out" else us[model], axis, side)
    return tensor


def merge_tensors(
    states: Sequence[Mapping[str, torch.Tensor]],
    groups: Sequence[MergeGroup],
    transforms: Mapping[str, Transforms],
    keys: Sequence[str],
) -> dict[str, torch.Tensor]:
    """``sum_m`` of the transformed tensors of ``keys`` (float64 maths, float32 out).

    A key without a merge (output-side) transform is averaged instead of summed, since only
    the merge matrices carry the ``1/N`` weights.
    """
    owners = axis_owners(groups)
    out = {}
    for key in keys:
        merged = any(side == "out" and g in transforms for _, g, side in owners.get(key, ()))
        acc = sum(
            transform_tensor(key, st[key].to(torch.float64), owners, transforms, m)
            for m, st in enumerate(states)
        )
        if not merged:
            acc = acc / len(states)
        out[key] = acc.to(torch.float32).contiguous()
    return out


def transform_model(
    state: Mapping[str, torch.Tensor], groups: Sequence[MergeGroup], transforms: Mapping[str, Transforms]
) -> dict[str, torch.Tensor]:
    """One model's tensors with its transforms applied (transform sets with a single model,
    e.g. ``permutation_transforms([perm])``); a permutation leaves the model's function unchanged."""
    owners = axis_owners(groups)
    return {
        k: transform_tensor(k, v.to(torch.float64), owners, transforms, 0).to(v.dtype)
        for k, v in state.items()
    }


def head_in_merged_basis(
    weight: torch.Tensor, bias: torch.Tensor, unmerge: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A model's classifier reading the merged residual: ``W_m U_res,m`` (bias unchanged)."""
    return (weight.to(torch.float64) @ unmerge.to(torch.float64)).to(torch.float32), bias.to(torch.float32)


# ------------------------------------------------------------------------------ solving groups
def alignment_units(groups: Sequence[MergeGroup]) -> list[list[MergeGroup]]:
    """Groups that are solved together: the residual, each block's ``[qk, vo]`` (one head
    assignment) and each block's MLP."""
    by_name = {g.name: g for g in groups}
    units: list[list[MergeGroup]] = [[by_name["residual"]]]
    layers = sorted({g.layer for g in groups if g.layer is not None})
    for i in layers:
        units.append([by_name[f"qk.{i}"], by_name[f"vo.{i}"]])
        units.append([by_name[f"mlp.{i}"]])
    return units


def solve_unit(
    unit: Sequence[MergeGroup],
    sims: Mapping[str, torch.Tensor],
    num_models: int,
    *,
    solver: str = "hungarian",
    alpha: float = 0.5,
    beta: float = 0.5,
    reference: str = "first",
) -> TransformSet:
    """Transforms of one unit from its joint similarities.

    ``solver="hungarian"``: permutations (every model matched to the first, or to the running
    mean with ``reference="mean"``); ``"zip"``: ZipIt!'s greedy zip. Head groups first get one
    shared head assignment (two-level Hungarian over all the unit's similarities), then are
    matched (or zipped) within each matched head.
    """
    if solver not in ("hungarian", "zip"):
        raise ConfigError(f"solver must be 'hungarian' or 'zip', got {solver!r}")
    heads = unit[0].num_heads
    if heads:
        head_perms, perms = match_heads([sims[g.name] for g in unit], num_models, heads, reference)
        if solver == "hungarian":
            return {g.name: permutation_transforms(p) for g, p in zip(unit, perms, strict=True)}
        return {
            g.name: zip_within_heads(sims[g.name], num_models, head_perms, heads, alpha=alpha, beta=beta)
            for g in unit
        }
    (g,) = unit
    if solver == "hungarian":
        return {g.name: permutation_transforms(hungarian_match(sims[g.name], num_models, reference))}
    return {g.name: zip_match(sims[g.name], num_models, alpha=alpha, beta=beta)}


def identity_transforms(groups: Sequence[MergeGroup], num_models: int) -> TransformSet:
    """Every group aligned by the identity (plain averaging)."""
    return {g.name: permutation_transforms([torch.arange(g.size)] * num_models) for g in groups}


# ------------------------------------------------------------------------------ weight similarity
def unit_vectors(
    state: Mapping[str, torch.Tensor],
    group: MergeGroup,
    owners: Owners,
    transforms: Mapping[str, Transforms],
    model: int,
) -> torch.Tensor:
    """``[size, L]``: each feature's slices of every tensor of the group (outputs and inputs),
    with the other axes mapped into the merged basis by the current transforms of the
    neighbouring groups (Git Re-Basin's weight matching; MuDSC's weight space)."""
    parts = []
    for key, axis in group.outputs + group.inputs:
        if key not in state:
            continue
        t = transform_tensor(key, state[key].to(torch.float64), owners, transforms, model, skip_axis=axis)
        parts.append(t.movedim(axis, 0).reshape(t.shape[axis], -1))
    return torch.cat(parts, 1)


def weight_similarity(
    states: Sequence[Mapping[str, torch.Tensor]],
    group: MergeGroup,
    owners: Owners,
    transforms: Mapping[str, Transforms],
    kind: str = "pearson",
) -> torch.Tensor:
    """Joint ``[N*size, N*size]`` weight similarity of a group's features: ``"inner"`` products
    (Git Re-Basin) or ``"pearson"`` correlation of the unit vectors (MuDSC)."""
    v = torch.cat([unit_vectors(st, group, owners, transforms, m) for m, st in enumerate(states)])
    if kind == "pearson":
        v = v - v.mean(1, keepdim=True)
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
    elif kind != "inner":
        raise ValueError(f"kind must be 'pearson' or 'inner', got {kind!r}")
    return v @ v.T


# ------------------------------------------------------------------------------ context helpers
def load_states(ctx, keys: Sequence[str]) -> list[dict[str, torch.Tensor]]:
    """Every model's tensors of ``keys`` (float32), read from its weight files."""
    states = []
    for source in ctx.sources:
        reader = source.tensors()
        try:
            states.append({k: reader.get(k).to(torch.float32) for k in keys})
        finally:
            reader.close()
    return states


#: where the residual stream's statistics come from (see :func:`residual_points`)
ResidualFeatures = Literal["cls", "tokens", "layernorms"]
RESIDUAL_FEATURES = get_args(ResidualFeatures)
#: which models' features a matching compares each model to (:func:`~hf_vitmerge.matching.reference_similarity`)
Reference = Literal["first", "mean"]
#: statistics of a block's QK group: ``"k"``, the key projection's outputs (as MuDSC's released
#: code), or ``"qk"``, query and key outputs stacked as samples of the same features
QKFeatures = Literal["k", "qk"]
QK_FEATURES = get_args(QKFeatures)


def residual_points(
    adapter: ViTAdapter, stop_block: int | None = None, residual_features: str = "layernorms"
) -> list[str]:
    """Where the residual stream's statistics come from (their sign-corrected correlations are
    averaged when there are several):

    * ``"cls"``: the classifier input (final-LN CLS token, one vector per image, as in MuDSC);
    * ``"tokens"``: the final-LN output at every token (ZipIt! hooks every position);
    * ``"layernorms"``: every LayerNorm output the residual feeds (ln1 and ln2 of each block and
      the final LN), every token (Verma & Elbayad's ``res=all``).

    A partial zip's tails start at block ``stop_block``'s ln1, so its residual point is that
    output (every token), and ``"layernorms"`` adds the ln1/ln2 outputs of the trunk blocks.
    """
    if residual_features not in RESIDUAL_FEATURES:
        raise ConfigError(
            f"residual_features must be one of {', '.join(RESIDUAL_FEATURES)}, got {residual_features!r}"
        )
    num = adapter.spec.num_layers
    partial = stop_block is not None and stop_block < num
    last = (
        f"attn_in.{stop_block}"
        if partial
        else ("residual" if residual_features == "cls" else "residual_tokens")
    )
    if residual_features != "layernorms":
        return [last]
    upto = stop_block if partial else num
    points = [p for i in range(upto) for p in (f"attn_in.{i}", f"fc1_in.{i}")]
    return points + [last]


def alignment_points(
    adapter: ViTAdapter,
    groups: Sequence[MergeGroup] | None = None,
    *,
    stop_block: int | None = None,
    residual_features: str = "layernorms",
    qk_features: str = "k",
) -> tuple[list[str], dict[str, str]]:
    """The statistics points an alignment merge collects: the residual stream's
    (:func:`residual_points`) and, per non-residual group (default: every group of the
    architecture), the point whose correlations align it (a QK group's key outputs with
    ``qk_features="k"``, its query and key outputs with ``"qk"``)."""
    if qk_features not in QK_FEATURES:
        raise ConfigError(f"qk_features must be one of {', '.join(QK_FEATURES)}, got {qk_features!r}")
    groups = adapter.groups() if groups is None else groups
    point_of = {
        g.name: f"k_out.{g.layer}" if g.kind == "qk" and qk_features == "k" else g.name
        for g in groups
        if g.kind != "residual"
    }
    return residual_points(adapter, stop_block, residual_features), point_of


def _ln_signs(states, adapter: ViTAdapter, point: str) -> torch.Tensor:
    """``sign(gamma)`` of the LayerNorm producing ``point``, stacked over models: a negative
    LayerNorm scale flips a feature's sign at the statistics point but not in the residual."""
    if point in ("residual", "residual_tokens"):
        key = adapter.key("final_ln", "weight")
    else:
        kind, _, layer = point.partition(".")
        key = adapter.key("ln1" if kind == "attn_in" else "ln2", "weight", int(layer))
    signs = torch.cat([torch.sign(st[key].to(torch.float64)) for st in states])
    return torch.where(signs == 0, torch.ones_like(signs), signs)


def activation_similarities(
    ctx,
    groups: Sequence[MergeGroup],
    states,
    *,
    stop_block: int | None = None,
    residual_features: str = "layernorms",
    qk_features: str = "k",
) -> dict[str, torch.Tensor]:
    """Joint activation correlations of every group (``collect_joint_stats`` on the
    concatenated calibration data of all tasks); the residual's is the mean of the
    sign-corrected correlations at :func:`residual_points`, a QK group's those of its key
    outputs (``qk_features="k"``) or of query and key outputs stacked (``"qk"``). The statistics
    time goes to ``ctx.timings["stats_seconds"]``."""
    from .stats import collect_joint_stats, source_cache_key

    adapter = ctx.adapter
    res_points, point_of = alignment_points(
        adapter, groups, stop_block=stop_block, residual_features=residual_features, qk_features=qk_features
    )
    calib = ctx.config.calibration
    start = time.perf_counter()
    stats = collect_joint_stats(
        ctx.models(),
        [ctx.calibration_data(i) for i in range(len(ctx.sources))],
        [s.image_processor() for s in ctx.sources],
        list(dict.fromkeys([*res_points, *point_of.values()])),
        batch_size=calib.batch_size,
        device=ctx.device,
        mixed_precision=calib.mixed_precision,
        cache_dir=calib.cache_dir,
        cache_key="|".join(source_cache_key(s) for s in ctx.sources),
        quiet=ctx.quiet,
    )
    ctx.timings["stats_seconds"] = round(
        ctx.timings.get("stats_seconds", 0.0) + time.perf_counter() - start, 3
    )
    sims = {}
    for g in groups:
        if g.kind != "residual":
            sims[g.name] = stats[point_of[g.name]].correlation()
            continue
        total = 0
        for point in res_points:
            sign = _ln_signs(states, adapter, point)
            total = total + stats[point].correlation() * sign[:, None] * sign[None, :]
        sims[g.name] = total / len(res_points)
    return sims


def heads_of(ctx, states, transforms: Mapping[str, Transforms]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each model's classifier reading the merged residual (``U_res`` on its input)."""
    adapter = ctx.adapter
    wk, bk = adapter.key("classifier", "weight"), adapter.key("classifier", "bias")
    us = transforms["residual"][1]
    return [head_in_merged_basis(st[wk], st[bk], u) for st, u in zip(states, us, strict=True)]


def aligned_result(ctx, states, transforms: TransformSet, info: dict, *, repair: bool = False):
    """The :class:`MergeResult` of a full alignment merge: the merged backbone and every model's
    head in the merged residual basis (averaged by ``assemble`` when labels are shared). With
    ``repair`` the assembled model's feature statistics are restored (:mod:`hf_vitmerge.repair`)."""
    adapter = ctx.adapter
    backbone = merge_tensors(states, adapter.groups(), transforms, adapter.backbone_keys)
    result = MergeResult(backbone=backbone, heads=heads_of(ctx, states, transforms), info=info)
    if not repair:
        return result
    from .repair import repair_model

    model = assemble(ctx, result)
    info.update(repair_model(ctx, model, transforms))
    return MergeResult(model=model, info=info)


def resolve_stop_block(stop_block: int | float | None, num_layers: int) -> int | None:
    """``None`` (full merge), a block count (int) or a fraction of the depth (float in (0, 1))."""
    if stop_block is None:
        return None
    if isinstance(stop_block, bool):
        raise ConfigError(f"stop_block must be an int, a fraction or null, got {stop_block!r}")
    if isinstance(stop_block, float) and not stop_block.is_integer():
        if not 0.0 < stop_block < 1.0:
            raise ConfigError(f"a fractional stop_block must be in (0, 1), got {stop_block}")
        return int(round(stop_block * num_layers))
    stop = int(stop_block)
    if not 0 <= stop <= num_layers:
        raise ConfigError(f"stop_block must be in [0, {num_layers}] (the model has {num_layers} blocks)")
    return stop


def trunk_groups(groups: Sequence[MergeGroup], stop: int) -> list[MergeGroup]:
    """The groups of a partial zip: the residual and the blocks before ``stop``."""
    return [g for g in groups if g.layer is None or g.layer < stop]


def build_partial_zip(ctx, states, transforms: TransformSet, stop: int):
    """A :class:`ViTPartialZipForImageClassification`: merged embeddings and blocks ``< stop``,
    then per model ``U_res,m`` (the residual unmerge), its own blocks ``>= stop``, final
    LayerNorm and classifier."""
    from .modeling import ViTPartialZipConfig, ViTPartialZipForImageClassification

    adapter = ctx.adapter
    labels = union_labels(ctx.task_names, ctx.label_lists)
    id2label = dict(enumerate(labels))
    config = ViTPartialZipConfig(
        **merged_config_dict(ctx),
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        stop_block=stop,
        task_names=ctx.task_names,
        task_num_labels=[len(x) for x in ctx.label_lists],
    )
    model = ViTPartialZipForImageClassification(config)
    groups = trunk_groups(adapter.groups(), stop)
    trunk_keys = [k for k in adapter.backbone_keys if adapter.info(k).role in ("cls", "pos", "patch")] + [
        k for k in adapter.backbone_keys if adapter.info(k).layer is not None and adapter.info(k).layer < stop
    ]
    merged = merge_tensors(states, groups, transforms, trunk_keys)
    bare = ViTAdapter.from_config(ctx.sources[0].config, with_classifier=False)
    with torch.no_grad():
        for key, value in merged.items():
            _partial_param(bare, adapter, model.trunk, key, 0).copy_(value)
        own = [
            k
            for k in adapter.keys
            if adapter.info(k).role in ("final_ln", "classifier")
            or (adapter.info(k).layer is not None and adapter.info(k).layer >= stop)
        ]
        for m, (tail, st) in enumerate(zip(model.tails, states, strict=True)):
            tail.unmerge.weight.copy_(transforms["residual"][1][m].to(torch.float32))
            for key in own:
                _partial_param(bare, adapter, tail, key, stop).copy_(st[key])
    return model.eval()


def _partial_param(bare: ViTAdapter, adapter: ViTAdapter, container, key: str, offset: int) -> torch.Tensor:
    """The parameter of ``key`` inside a trunk or tail module (block ``layer - offset``)."""
    p = adapter.info(key)
    if p.role in ("cls", "pos"):
        emb = container.embeddings
        return emb.cls_token if p.role == "cls" else emb.position_embeddings
    if p.role == "classifier":
        return getattr(container.classifier, p.attr)
    layer = None if p.layer is None else p.layer - offset
    return getattr(bare.module(container, p.role, layer), p.attr)
