"""Git Re-Basin weight matching (Ainsworth et al., "Git Re-Basin: Merging Models modulo
Permutation Symmetries", ICLR 2023, https://arxiv.org/abs/2209.04836): permutations that
maximise the inner products of the models' weights, found by coordinate descent over the
merge groups, then averaging. No data needed.

Each group's similarity between feature ``i`` of model ``a`` and feature ``j`` of model ``b`` is
the inner product of everything the feature touches (its rows in the producing layers, its
columns in the consuming layers, its LayerNorm / bias entries), with the other axes mapped
into the merged basis by the current permutations of the neighbouring groups (the paper's
Eq. 5-6 for N models, every model matched to the first). Sweeps visit the units (residual,
each block's QK+VO with one head assignment, each MLP) in a seeded random order and stop when
a sweep changes nothing or after ``max_sweeps`` (the paper: random order until convergence).
The classifier takes part in the residual similarity only when all models share labels.
Heads: the QK and VO similarities vote on one head assignment (two-level Hungarian), as the
ViT needs for function preservation; the paper covers MLPs/CNNs only.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from ..alignment import (
    Reference,
    aligned_result,
    alignment_units,
    axis_owners,
    identity_transforms,
    load_states,
    solve_unit,
    weight_similarity,
)
from ..errors import ConfigError
from .registry import merge_method


@merge_method("weight_matching", kind="model", needs_data=False, reference="https://arxiv.org/abs/2209.04836")
def weight_matching(
    ctx, *, max_sweeps: Annotated[int, Field(ge=1)] = 100, reference: Reference = "first", repair: bool = True
):
    """Git Re-Basin weight matching (coordinate descent on weight inner products), then averaging."""
    if max_sweeps < 1:
        raise ConfigError(f"weight_matching: max_sweeps must be >= 1, got {max_sweeps}")
    adapter = ctx.adapter
    groups = adapter.groups()
    states = load_states(ctx, adapter.keys)
    shared = ctx.heads_mode == "shared"
    sim_states = (
        states
        if shared
        else [{k: v for k, v in st.items() if adapter.info(k).kind != "head"} for st in states]
    )
    owners = axis_owners(groups)
    num = len(ctx.sources)
    transforms = identity_transforms(groups, num)
    units = alignment_units(groups)
    gen = ctx.generator("weight_matching")
    sweeps = 0
    while sweeps < max_sweeps:
        sweeps += 1
        changed = False
        for u in torch.randperm(len(units), generator=gen).tolist():
            unit = units[u]
            sims = {g.name: weight_similarity(sim_states, g, owners, transforms, "inner") for g in unit}
            new = solve_unit(unit, sims, num, solver="hungarian", reference=reference)
            for name, (ms, _us) in new.items():
                if any(not torch.equal(a, b) for a, b in zip(ms, transforms[name][0], strict=True)):
                    changed = True
            transforms.update(new)
        if not changed:
            break
    info = {"alignment": "weight inner products, Hungarian, coordinate descent", "sweeps": sweeps}
    if repair and any(m.data is None for m in ctx.config.models):
        # REPAIR needs calibration images; weight matching itself does not, so it runs without.
        repair = False
        info["repair_note"] = "skipped: not every model has calibration `data:`"
    return aligned_result(ctx, states, transforms, info, repair=repair)
