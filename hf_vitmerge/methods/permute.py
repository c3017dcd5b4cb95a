"""Activation matching ("Permute"): align every model to the first by the Hungarian assignment
on activation correlations, then average (the "Permute" baseline of ZipIt!, Stoica et al. 2023,
https://arxiv.org/abs/2305.03053, and Git Re-Basin's activation matching, Ainsworth et al. 2023,
https://arxiv.org/abs/2209.04836).

Groups (see :mod:`hf_vitmerge.alignment`): one residual permutation for the whole network
(statistics: ``residual_features``, by default every LayerNorm output, with the correlations
sign-corrected for negative LayerNorm scales), per block a QK and a VO permutation
that move whole heads with ONE head assignment (two-level Hungarian, both similarities summed),
and an MLP permutation. The released ZipIt! code (``match_tensors_permute``) has no ViT graph and
ignores heads; MuDSC solves the QK and VO head assignments separately.

``reference``: ``"first"`` (default, as in the papers) matches every model to model 0;
``"mean"`` matches model ``m`` to the mean of models ``< m`` already aligned (for N > 2).
"""

from __future__ import annotations

from ..alignment import (
    QKFeatures,
    Reference,
    ResidualFeatures,
    activation_similarities,
    aligned_result,
    alignment_units,
    load_states,
    solve_unit,
)
from .registry import merge_method


@merge_method("permute", kind="model", needs_data=True, reference="https://arxiv.org/abs/2305.03053")
def permute(
    ctx,
    *,
    reference: Reference = "first",
    repair: bool = True,
    residual_features: ResidualFeatures = "layernorms",
    qk_features: QKFeatures = "k",
):
    """Permute-then-average: Hungarian matching of activation correlations (head-aware), then averaging."""
    adapter = ctx.adapter
    groups = adapter.groups()
    states = load_states(ctx, adapter.keys)
    sims = activation_similarities(
        ctx, groups, states, residual_features=residual_features, qk_features=qk_features
    )
    transforms = {}
    for unit in alignment_units(groups):
        transforms.update(solve_unit(unit, sims, len(ctx.sources), solver="hungarian", reference=reference))
    info = {
        "alignment": "activation correlation, Hungarian, shared QK/VO head assignment",
        "reference": reference,
        "residual_features": residual_features,
        "qk_features": qk_features,
    }
    return aligned_result(ctx, states, transforms, info, repair=repair)
