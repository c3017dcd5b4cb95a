"""Consensus merging with TALL masks (Wang et al., "Localizing Task Information for Improved
Model Merging and Compression", ICML 2024, https://arxiv.org/abs/2405.07813).

For each task t a TALL mask marks the weights that matter to it: those where the task's own
fine-tune is further from the base than from the multi-task model,
``m_t = |tau_t| > mask_lambda * |tau_MTL - tau_t|``, with ``tau_MTL`` the unscaled multi-task
vector of the underlying method (the sum of the task vectors for task arithmetic, the disjoint
*sum* for TIES, as in the released code). The consensus mask keeps the weights that at least
``k`` tasks find important (``k = 2`` drops both "catastrophic" weights, used by no task, and
"selfish" ones, used by one only; ``k = 0`` keeps everything and gives the underlying method
back). The merge is the underlying method's result with its task vector masked:

* ``over: task_arithmetic``: ``theta_base + scaling * mask * sum_k tau_k`` (scaling default 0.3);
* ``over: ties``: ``theta_base + scaling * mask * ties(tau)`` with this package's TIES (disjoint
  mean, ``density``; scaling default 1.0).

Reference implementation: ``construct_consensus_mask`` and ``generate_task_masks`` in
github.com/nik-dim/tall_masks (``src/utils/tallmask_utils.py``). Deviations: the masks are
computed per tensor while the engine streams the models (element-wise, so they are the same as
over the flattened model), with one ``mask_lambda`` for all tasks (the paper picks it per task
on validation data from 0.2 .. 0.6; ``mask_lambda: auto`` picks one on the calibration split);
the default 0.6 is FusionBench's.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from .registry import Grid, merge_method
from .task_arithmetic import task_vectors_
from .ties import disjoint_mean, elect_sign, trim_top_k

_DEFAULT_SCALING = {"task_arithmetic": 0.3, "ties": 1.0}


def tall_masks(task_vecs: torch.Tensor, multi_task: torch.Tensor, mask_lambda: float) -> torch.Tensor:
    """Per task, ``|tau_t| > lambda * |tau_MTL - tau_t|`` (a ``[K, *param]`` boolean stack)."""
    return task_vecs.abs() > mask_lambda * (multi_task.unsqueeze(0) - task_vecs).abs()


def consensus_mask(masks: torch.Tensor, k: int) -> torch.Tensor:
    """Entries that at least ``k`` of the tasks' masks keep."""
    return masks.sum(0) >= k


def disjoint_sum(task_vecs: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Per entry, the sum of the non-zero task-vector values that agree with ``sign``."""
    agree = (torch.sign(task_vecs) == sign.unsqueeze(0)) & (task_vecs != 0)
    return (task_vecs * agree).sum(0)


@merge_method("consensus", reference="https://arxiv.org/abs/2405.07813", aliases=("tall_masks",))
def consensus(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    k: Annotated[int, Field(ge=0)] = 2,
    mask_lambda: Annotated[float, Field(gt=0), Grid(0.2, 0.3, 0.4, 0.5, 0.6)] = 0.6,
    over: Literal["task_arithmetic", "ties"] = "task_arithmetic",
    scaling: Annotated[float, Field(ge=0), Grid(0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 1.5)] | None = None,
    density: Annotated[float, Field(gt=0, le=1)] = 0.2,
    **_,
) -> torch.Tensor:
    """Consensus merging: keep only the weights that at least ``k`` tasks' TALL masks mark as important.

    ``over``: the method whose task vector is masked (task_arithmetic or ties). ``scaling``
    defaults to that method's own default (0.3 / 1.0). ``density`` is TIES's trim (over: ties).
    """
    tvs = task_vectors_(tensors, base)  # in the engine's buffer: no [K, *param] copy
    lam = _DEFAULT_SCALING[over] if scaling is None else scaling
    if over == "task_arithmetic":
        merged = multi_task = tvs.sum(0)
    else:
        trimmed = trim_top_k(tvs, density)
        sign = elect_sign(trimmed)
        multi_task, merged = disjoint_sum(trimmed, sign), disjoint_mean(trimmed, sign)
    if k > 0:
        merged = merged * consensus_mask(tall_masks(tvs, multi_task, mask_lambda), k)
    return base + lam * merged
