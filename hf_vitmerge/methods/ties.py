"""TIES-Merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models",
NeurIPS 2023, https://arxiv.org/abs/2306.01708).

Three steps on the task vectors ``tau_k = theta_k - theta_base``:

1. **Trim**: keep the top ``density`` fraction of each task vector's entries by magnitude
   (the paper keeps k = 20%, i.e. ``density = 0.2``), zero the rest.
2. **Elect sign**: per entry, the sign of the summed trimmed task vectors (the sign with the
   larger total mass).
3. **Disjoint merge**: per entry, the mean over the task vectors whose trimmed value is
   non-zero and agrees with the elected sign.

``theta = theta_base + scaling * tau_merged``.

Deviations from the released code (github.com/prateeksha-yadav/ties-merging), noted on purpose:

* Trimming is per tensor (as in mergekit and peft), not over the whole flattened model: the
  engine streams one tensor at a time, so the model never has to be in memory at once.
* Exactly ``round(density * n)`` entries are kept (``torch.topk``); the released code keeps
  everything at or above the k-th value, which can keep more on ties.
* An entry whose summed sign is exactly zero gets zero (the released code falls back to the
  model-wide majority sign, which needs the whole model).
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from .registry import Grid, merge_method
from .task_arithmetic import task_vectors


def trim_top_k(task_vecs: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of largest-magnitude entries of each task vector (row of a
    ``[K, *param]`` stack); the others become zero."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"ties: density must be in (0, 1], got {density}")
    flat = task_vecs.reshape(task_vecs.shape[0], -1)
    n = flat.shape[1]
    k = max(1, round(density * n))
    if k >= n:
        return task_vecs.clone()
    idx = flat.abs().topk(k, dim=1).indices
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)
    return (flat * mask).reshape(task_vecs.shape)


def elect_sign(task_vecs: torch.Tensor) -> torch.Tensor:
    """Per entry, the sign of the total mass ``sum_k tau_k`` (-1, 0 or +1)."""
    return torch.sign(task_vecs.sum(0))


def disjoint_mean(task_vecs: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Per entry, the mean of the non-zero task-vector values that agree with ``sign``."""
    agree = (torch.sign(task_vecs) == sign.unsqueeze(0)) & (task_vecs != 0)
    count = agree.sum(0).clamp(min=1)
    return (task_vecs * agree).sum(0) / count


def ties_task_vector(task_vecs: torch.Tensor, density: float = 0.2) -> torch.Tensor:
    """The TIES merged task vector of a ``[K, *param]`` stack: trim, elect sign, disjoint mean."""
    trimmed = trim_top_k(task_vecs, density)
    return disjoint_mean(trimmed, elect_sign(trimmed))


@merge_method(
    "ties", needs_base=True, reference="https://arxiv.org/abs/2306.01708", aliases=("ties_merging",)
)
def ties(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    density: Annotated[float, Field(gt=0, le=1), Grid(0.1, 0.2, 0.3, 0.5)] = 0.2,
    scaling: Annotated[float, Field(ge=0), Grid(0.5, 0.7, 0.8, 0.9, 1.0, 1.2, 1.5)] = 1.0,
    **_,
) -> torch.Tensor:
    """TIES-Merging: trim task vectors to their top-``density`` entries, elect signs, average the agreeing ones.

    Defaults follow the paper: ``density = 0.2`` (k = 20%) and ``scaling = 1.0`` (lambda), the
    paper's value when no validation set is used to tune it. Because the disjoint *mean*
    keeps the merged task vector on the scale of a single one, lambda near 1 is the natural
    choice. FusionBench's 0.3 goes with its disjoint *sum* variant, which is K times larger.
    """
    return base + scaling * ties_task_vector(task_vectors(tensors, base), density)
