"""Weight averaging ("model soups", Wortsman et al., 2022, https://arxiv.org/abs/2203.05482)."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from .registry import merge_method

# One non-negative number per model (a model's `weight:` in the config fills it).
Weights = list[Annotated[float, Field(ge=0)]] | None


@merge_method("average", reference="https://arxiv.org/abs/2203.05482", aliases=("linear",))
def average(
    tensors: list[torch.Tensor], base: torch.Tensor | None = None, *, weights: Weights = None, **_
) -> torch.Tensor:
    """Uniform (or weighted) average of the models' weights.

    ``weights`` (optional) gives one non-negative weight per model; they are normalised to
    sum to one, so a single model with weight 1 is returned unchanged.
    """
    if weights is None:
        return torch.stack(tensors).mean(0)
    if len(weights) != len(tensors):
        raise ValueError(f"average: got {len(weights)} weights for {len(tensors)} models")
    w = torch.tensor(weights, dtype=tensors[0].dtype)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"average: weights must be non-negative and not all zero, got {weights}")
    w = w / w.sum()
    return torch.einsum("k,k...->...", w, torch.stack(tensors))
