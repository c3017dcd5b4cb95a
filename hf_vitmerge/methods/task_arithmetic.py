"""Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023,
https://arxiv.org/abs/2212.04089): ``theta = theta_base + lambda * sum_k (theta_k - theta_base)``."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from ._stack import stacked
from .registry import Grid, merge_method

# lambda: the papers pick it on validation data from [0, 1] (this grid serves `scaling: auto`).
Scaling = Annotated[float, Field(ge=0), Grid(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)]


def task_vectors(tensors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """Stacked task vectors ``theta_k - theta_base`` (shape ``[K, *param]``); a new tensor."""
    return torch.stack(list(tensors)) - base.unsqueeze(0)


def task_vectors_(tensors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """:func:`task_vectors` computed in the engine's input buffer when it hands one over
    (:class:`~hf_vitmerge.methods._stack.TensorStack`): ``tensors`` must not be used afterwards."""
    return stacked(tensors).sub_(base.unsqueeze(0))


@merge_method("task_arithmetic", needs_base=True, reference="https://arxiv.org/abs/2212.04089")
def task_arithmetic(
    tensors: list[torch.Tensor], base: torch.Tensor | None = None, *, scaling: Scaling = 0.3, **_
) -> torch.Tensor:
    """Add the sum of the task vectors, scaled by ``scaling`` (lambda), to the base model.

    The paper picks lambda on validation data from [0, 1]; 0.3 is the common default for
    8 or more tasks (FusionBench, TIES paper). With K models and ``scaling = 1/K`` this equals
    plain averaging.
    """
    return task_vectors_(tensors, base).sum(0).mul_(scaling).add_(base)
