"""Weight averaging ("model soups", Wortsman et al., 2022, https://arxiv.org/abs/2203.05482)."""

from __future__ import annotations

import torch

from ._stack import stacked
from .registry import merge_method


@merge_method("average", reference="https://arxiv.org/abs/2203.05482", aliases=("linear",))
def average(
    tensors: list[torch.Tensor], base: torch.Tensor | None = None, *, weights: list | None = None, **_
) -> torch.Tensor:
    """Uniform (or weighted) average of the models' weights.

    ``weights`` (optional) gives one non-negative weight per model; they are normalised to
    sum to one, so a single model with weight 1 is returned unchanged.
    """
    if weights is None:
        return stacked(tensors).sum(0).div_(len(tensors))
    if len(weights) != len(tensors):
        raise ValueError(f"average: got {len(weights)} weights for {len(tensors)} models")
    w = torch.tensor(weights, dtype=tensors[0].dtype)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"average: weights must be non-negative and not all zero, got {weights}")
    w = w / w.sum()
    x = stacked(tensors)
    return (w @ x.reshape(len(tensors), -1)).reshape(x.shape[1:])
