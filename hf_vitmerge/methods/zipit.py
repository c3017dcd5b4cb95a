"""ZipIt! (Stoica et al., "ZipIt! Merging Models from Different Tasks without Training", ICLR 2024,
https://arxiv.org/abs/2305.03053): merge features *within* and across models by a greedy
zip of the activation correlations, and optionally merge only the first blocks ("partial zip").

Per group (see :mod:`hf_vitmerge.alignment`) the ``N * d`` features of the N models are zipped
to ``d`` by :func:`hf_vitmerge.matching.zip_match`, giving merge/unmerge matrices; the merged
weights are ``sum_m M_m W_m U_m^prev`` (the paper's Eq. 8). Attention groups are zipped only
within matched heads: one head assignment (two-level Hungarian on the QK and VO correlations
together) serves QK and VO, so the merged model keeps its head structure.

Parameters:

* ``alpha``, ``beta``: the repeated-matching decay and the within-model merge share (budget
  ``floor(floor((N-1) d / N) * beta)`` per model). Left unset they take a per-mode default:
  full zip 0.7 / 0.5, partial zip 0.5 / 1.0. The full-zip default was chosen by measurement on
  calibration data, never test: the best mean joint accuracy over calibration seeds 0, 1, 2 on
  the train-split validation slice (:func:`hf_vitmerge.autotune.validation_slice`) of
  digits-split tiny, grid alpha {0.3, 0.5, 0.7, 1} x beta {0, 0.25, 0.5, 1}
  (``benchmarks/align_defaults.py``; BENCHMARKS.md, issue 12). The partial-zip default is the
  released code's ImageNet partial-zip setting (not searched; its full zip uses 1.0 / 0, other
  scripts CIFAR 1e-4 / 0.075, multi-dataset 0.7 / 0.15). The paper reports no ViT setting.
  ``beta = 0`` gives greedy permute-then-average.
* ``repair`` (default true): REPAIR after the merge (:mod:`hf_vitmerge.repair`); for a partial
  zip it also refits the residual unmerges by least squares.
* ``residual_features``: ``cls``, ``tokens`` or ``layernorms`` (default): where the residual
  statistics come from (:func:`hf_vitmerge.alignment.residual_points`).
* ``qk_features``: ``k`` (default, as MuDSC's released code) correlates a block's QK features
  on the key projection's outputs; ``qk`` stacks query and key outputs as samples of the same
  features. On the calibration-split validation slices (3 seeds, BENCHMARKS.md, sixth session)
  ``k`` gave +0.013 joint accuracy (zipit), +0.020 (permute) and +0.013 (mudsc) on digits-split
  and +0.002, -0.002 and -0.013 on digits-split5.
* ``stop_block``: ``None`` zips the whole network; an int ``s`` (or a fraction of the depth,
  e.g. 0.5) zips the embeddings and blocks ``< s`` and lets every model keep its own blocks
  ``>= s``, final LayerNorm and head, fed from the merged residual through an explicit per-model
  residual unmerge ``U_res,m`` (``d x d``; the released code's ``SpaceInterceptor``). The result
  is a :class:`~hf_vitmerge.modeling.ViTPartialZipForImageClassification`. For a partial zip the
  residual statistics are taken where the tails start (ln1 output of block ``s``), not at the
  classifier input.

Deviations from the released code: within-model budgets are enforced before each merge
(``beta = 0`` never merges within a model); the residual correlation is sign-corrected for
negative LayerNorm scales; statistics are float64 with zero-variance features masked instead of
dividing by 1e-7.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from ..alignment import (
    QKFeatures,
    ResidualFeatures,
    activation_similarities,
    aligned_result,
    alignment_units,
    build_partial_zip,
    load_states,
    resolve_stop_block,
    solve_unit,
    trunk_groups,
)
from ..errors import ConfigError
from .base import MergeResult
from .registry import Grid, merge_method

# (alpha, beta) used when the parameter is left unset, per mode (see the module docstring; the
# full-zip pair was chosen on calibration-split validation data by benchmarks/align_defaults.py)
FULL_ZIP_DEFAULTS = (0.7, 0.5)
PARTIAL_ZIP_DEFAULTS = (0.5, 1.0)


def _resolve(params: dict, _setting) -> dict:
    """``alpha`` / ``beta`` left unset: the pair of the mode (full or partial zip)."""
    alpha, beta = FULL_ZIP_DEFAULTS if params["stop_block"] is None else PARTIAL_ZIP_DEFAULTS
    return {"alpha": alpha, "beta": beta}


@merge_method(
    "zipit", kind="model", needs_data=True, reference="https://arxiv.org/abs/2305.03053", resolve=_resolve
)
def zipit(
    ctx,
    *,
    alpha: Annotated[float, Field(le=1), Grid(0.3, 0.5, 0.7, 0.9)] | None = None,
    beta: Annotated[float, Field(ge=0, le=1), Grid(0.0, 0.5, 1.0)] | None = None,
    stop_block: Annotated[int, Field(ge=0)] | Annotated[float, Field(gt=0, lt=1)] | None = None,
    repair: bool = True,
    residual_features: ResidualFeatures = "layernorms",
    qk_features: QKFeatures = "k",
):
    """ZipIt!: greedy zip of correlated features within and across models (optionally partial)."""
    adapter = ctx.adapter
    stop = resolve_stop_block(stop_block, adapter.spec.num_layers)
    mode_alpha, mode_beta = FULL_ZIP_DEFAULTS if stop is None else PARTIAL_ZIP_DEFAULTS
    alpha = mode_alpha if alpha is None else float(alpha)
    beta = mode_beta if beta is None else float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"zipit: beta must be in [0, 1], got {beta}")
    if alpha > 1.0:
        raise ConfigError(f"zipit: alpha must be <= 1, got {alpha}")
    if stop is not None and ctx.heads_mode == "shared":
        raise ConfigError(
            "zipit: a partial zip (stop_block) keeps one head per model and needs models with their own "
            "label spaces; for models that share labels use a full zip (stop_block: null)"
        )
    groups = adapter.groups() if stop is None else trunk_groups(adapter.groups(), stop)
    states = load_states(ctx, adapter.keys)
    sims = activation_similarities(
        ctx, groups, states, stop_block=stop, residual_features=residual_features, qk_features=qk_features
    )
    transforms = {}
    for unit in alignment_units(groups):
        transforms.update(solve_unit(unit, sims, len(ctx.sources), solver="zip", alpha=alpha, beta=beta))
    info = {
        "alpha": alpha,
        "beta": beta,
        "stop_block": stop,
        "residual_features": residual_features,
        "qk_features": qk_features,
    }
    if stop is None:
        return aligned_result(ctx, states, transforms, info, repair=repair)
    model = build_partial_zip(ctx, states, transforms, stop)
    if repair:
        from ..repair import repair_model

        info.update(repair_model(ctx, model, transforms, stop=stop))
    return MergeResult(model=model, info=info)
