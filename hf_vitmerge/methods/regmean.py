"""RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023,
https://arxiv.org/abs/2212.09849).

Each linear layer is merged by the closed-form minimiser of ``sum_m ||X_m W^T - X_m W_m^T||^2``
over the inputs ``X_m`` that layer sees in model ``m`` on model ``m``'s own data:
``W* = (sum_m W_m G_m)(sum_m G_m)^-1`` with the input Gram ``G_m = X_m^T X_m``. Off-diagonal
Gram entries are shrunk, ``G~ = alpha G + (1 - alpha) diag(G)``, which interpolates between
RegMean (alpha = 1) and a diagonally weighted average (alpha = 0).

Applied to q, k, v (one Gram: their common input, the ln1 output), o (attention output
projection input), fc1 (ln2 output) and fc2 (post-activation MLP hidden), and, when all models
share one label space (``heads: shared``), to the classifier (Gram of the final-LN CLS vector).
Everything else — biases, LayerNorms, embeddings — is simply averaged, as in the paper and
the released code; with separate label spaces each model keeps its own head.

RegMean assumes the models were fine-tuned from one shared initialisation; on independently
initialised models the solve still runs but (like any averaging) the result is usually poor —
align them first (permutation / ZipIt!).

Choices and deviations, each a parameter:

* ``alpha`` = 0.9 (the paper's default for most settings; FusionBench uses 0.95 and the
  vl-merging code 1.0);
* ``normalize_gram`` = true divides each Gram by its number of rows (per-sample mean, as
  FusionBench), so every task weighs the same whatever its token count; the released
  vl-merging code sums (false);
* ``ridge`` = 1e-6: ``ridge * mean(diag(sum G~))`` is added to the diagonal before the solve,
  so that few samples or dead features (a singular Gram) stay finite; the solve is a float64
  ``torch.linalg.solve`` (the paper's code inverts the matrix).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from ..errors import ConfigError
from ..stats import collect_model_stats, source_cache_key
from .base import MergeResult, read_heads
from .registry import merge_method

# role -> statistics point kind whose Gram is that layer's input Gram
_INPUT_POINT = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "vo", "fc1": "fc1_in", "fc2": "mlp"}


def regmean_solve(
    weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], alpha: float = 0.9, ridge: float = 1e-6
) -> torch.Tensor:
    """``(sum_m W_m G~_m)(sum_m G~_m + lambda I)^-1`` in float64, returned in the weights' dtype.

    ``weights``: ``[out, in]`` matrices; ``grams``: ``[in, in]`` input Grams (one per model);
    ``G~ = alpha G + (1 - alpha) diag(G)``; ``lambda = ridge * mean(diag(sum_m G~_m))``.
    If every Gram is zero there is nothing to weigh by and the plain average is returned.
    """
    if len(weights) != len(grams) or not weights:
        raise ValueError(f"regmean: need one Gram per weight, got {len(weights)} weights, {len(grams)} Grams")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"regmean: alpha must be in [0, 1], got {alpha}")
    if ridge < 0:
        raise ConfigError(f"regmean: ridge must be non-negative, got {ridge}")
    dim = weights[0].shape[1]
    for w, g in zip(weights, grams, strict=True):
        if w.ndim != 2 or w.shape != weights[0].shape or g.shape != (dim, dim):
            raise ValueError(
                f"regmean: weight {tuple(w.shape)} and Gram {tuple(g.shape)} do not match "
                f"(expected [out, {dim}] and [{dim}, {dim}])"
            )
    total = torch.zeros(dim, dim, dtype=torch.float64)
    rhs = torch.zeros(weights[0].shape, dtype=torch.float64)
    for w, g in zip(weights, grams, strict=True):
        g = g.to(torch.float64)
        g = alpha * g + (1.0 - alpha) * torch.diag(g.diagonal())
        total += g
        rhs += w.to(torch.float64) @ g
    scale = float(total.diagonal().mean())
    if scale == 0.0:
        return torch.stack([w.to(torch.float64) for w in weights]).mean(0).to(weights[0].dtype)
    total.diagonal().add_(ridge * scale)
    # W* total = rhs  <=>  total^T W*^T = rhs^T, and total is symmetric
    merged = torch.linalg.solve(total, rhs.T).T
    return merged.to(weights[0].dtype)


def regmean_points(num_layers: int, with_head: bool) -> list[str]:
    """Statistics points RegMean needs (input Grams of every merged linear layer)."""
    points = ["residual"] if with_head else []
    for i in range(num_layers):
        points += [f"attn_in.{i}", f"vo.{i}", f"fc1_in.{i}", f"mlp.{i}"]
    return points


@merge_method("regmean", kind="model", needs_data=True, reference="https://arxiv.org/abs/2212.09849")
def regmean(
    ctx,
    *,
    alpha: Annotated[float, Field(ge=0, le=1)] = 0.9,
    ridge: Annotated[float, Field(ge=0)] = 1e-6,
    normalize_gram: bool = True,
):
    """RegMean: per linear layer, the weights that best reproduce every model's outputs on its
    own data (closed form from input Grams); other parameters averaged."""
    adapter = ctx.adapter
    num_layers = adapter.spec.num_layers
    merge_head = ctx.heads_mode == "shared" and bool(adapter.classifier_keys)
    points = regmean_points(num_layers, merge_head)
    calib = ctx.config.calibration

    start = time.perf_counter()
    grams: list[dict[str, torch.Tensor]] = []
    samples = []
    for i, source in enumerate(ctx.sources):
        data = ctx.calibration_data(i)
        stats = collect_model_stats(
            source.load_model(),
            data,
            source.image_processor(),
            points,
            batch_size=calib.batch_size,
            device=ctx.device,
            mixed_precision=calib.mixed_precision,
            cache_dir=calib.cache_dir,
            cache_key=source_cache_key(source),
            quiet=ctx.quiet,
        )
        grams.append({p: st.gram(normalize=normalize_gram) for p, st in stats.items()})
        samples.append(len(data))
    ctx.timings["stats_seconds"] = round(time.perf_counter() - start, 3)

    readers = [s.tensors() for s in ctx.sources]
    try:
        solved: dict[str, tuple[str, int | None]] = {}
        for i in range(num_layers):
            for role, kind in _INPUT_POINT.items():
                solved[adapter.key(role, "weight", i)] = (kind, i)
        if merge_head:
            solved[adapter.key("classifier", "weight")] = ("residual", None)
        backbone: dict[str, torch.Tensor] = {}
        head: dict[str, torch.Tensor] = {}
        for key in adapter.backbone_keys + (adapter.classifier_keys if merge_head else []):
            tensors = [r.get(key).to(torch.float32) for r in readers]
            if key in solved:
                kind, layer = solved[key]
                point = kind if layer is None else f"{kind}.{layer}"
                value = regmean_solve(tensors, [g[point] for g in grams], alpha=alpha, ridge=ridge)
            else:
                value = torch.stack(tensors).mean(0)
            if adapter.info(key).kind == "head":
                head[key] = value
            else:
                backbone[key] = value.contiguous()
    finally:
        for r in readers:
            r.close()

    info = {"regmean_layers": len(solved), "calibration_samples": samples}
    result = MergeResult(backbone=backbone, info=info)
    if merge_head:
        result.shared_head = (
            head[adapter.key("classifier", "weight")],
            head[adapter.key("classifier", "bias")],
        )
    else:
        result.heads = read_heads(ctx.sources)
    return result
