"""Weight averaging ("model soups", Wortsman et al., 2022, https://arxiv.org/abs/2203.05482)."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from ..errors import ConfigError
from ._stack import stacked
from .registry import Setting, merge_method

# One non-negative number per model (a model's `weight:` in the config fills it).
Weights = list[Annotated[float, Field(ge=0)]] | None


def check_weights(params: dict, setting: Setting) -> None:
    """A ``weights`` list has one entry per model and is not all zero."""
    weights = params.get("weights")
    if weights is None:
        return
    if len(weights) != setting.num_models:
        raise ValueError(
            f"`weights` has {len(weights)} entries for {setting.num_models} models; give one per model"
        )
    if not any(w > 0 for w in weights):
        raise ValueError(f"`weights` must not be all zero, got {weights}")


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
        raise ConfigError(f"{method}: got {len(weights)} weights for {k} models; give one per model")
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ConfigError(f"{method}: weights must be finite, non-negative and not all zero, got {weights}")
    w = w / w.sum()
    out = torch.einsum("k,k...->...", w, stacked(tensors).to(torch.float64))
    return out.to(tensors[0].dtype)


@merge_method(
    "average", reference="https://arxiv.org/abs/2203.05482", aliases=("linear",), check=check_weights
)
def average(
    tensors: list[torch.Tensor], base: torch.Tensor | None = None, *, weights: Weights = None, **_
) -> torch.Tensor:
    """Uniform (or weighted) average of the models' weights.

    ``weights`` (optional) gives one non-negative weight per model; they are normalised to
    sum to one, so a single model with weight 1 is returned unchanged.
    """
    return weighted_average(tensors, weights)
