"""Weight averaging ("model soups", Wortsman et al., 2022, https://arxiv.org/abs/2203.05482)."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from ._stack import stacked
from .registry import merge_method

# One non-negative number per model (a model's `weight:` in the config fills it).
Weights = list[Annotated[float, Field(ge=0)]] | None


def weighted_average(
    tensors: list[torch.Tensor], weights: list | None, method: str = "average"
) -> torch.Tensor:
    """``sum_k w_k tensors[k]`` with ``weights`` normalised to sum to one (uniform when None).

    Weighted sums are computed in float64 and returned in the inputs' dtype; errors name ``method``.
    """
    if weights is None:
        return stacked(tensors).sum(0).div_(len(tensors))
    k = len(tensors)
    if len(weights) != k:
        raise ValueError(f"{method}: got {len(weights)} weights for {k} models; give one per model")
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"{method}: weights must be finite, non-negative and not all zero, got {weights}")
    w = w / w.sum()
    out = torch.einsum("k,k...->...", w, stacked(tensors).to(torch.float64))
    return out.to(tensors[0].dtype)


@merge_method("average", reference="https://arxiv.org/abs/2203.05482", aliases=("linear",))
def average(
    tensors: list[torch.Tensor], base: torch.Tensor | None = None, *, weights: Weights = None, **_
) -> torch.Tensor:
    """Uniform (or weighted) average of the models' weights.

    ``weights`` (optional) gives one non-negative weight per model; they are normalised to
    sum to one, so a single model with weight 1 is returned unchanged.
    """
    return weighted_average(tensors, weights)
