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

Like TIES, the method runs fused over cache-sized column chunks (:func:`_consensus_fused`): the
task vectors, the multi-task vector, the K masks and their count exist one chunk at a time, so
no ``[K, *param]`` temporary is allocated (the unfused masks took 4-5 of them per tensor: on 8
ViT-B/16 checkpoints +1174 MB of anonymous memory over the I/O floor, fused +146 MB;
BENCHMARKS.md). The arithmetic is the same, operation for operation, as the
unfused helpers :func:`tall_masks`, :func:`consensus_mask` and :func:`disjoint_sum`.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from ._stack import stacked
from .registry import Grid, merge_method
from .ties import _CHUNK, trim_cuts, trim_elect_chunk

_DEFAULT_SCALING = {"task_arithmetic": 0.3, "ties": 1.0}


def _check(params: dict, setting) -> None:
    if params["k"] > setting.num_models:
        raise ValueError(
            f"consensus: `k` is {params['k']}, but only {setting.num_models} tasks can agree on a weight; "
            f"give k <= {setting.num_models} (the paper uses 2)"
        )


def _resolve(params: dict, _setting) -> dict:
    """``scaling`` left unset: the masked method's own default."""
    return {"scaling": _DEFAULT_SCALING[params["over"]]}


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


def _consensus_fused(
    stack: torch.Tensor,
    base: torch.Tensor,
    k: int,
    mask_lambda: float,
    over: str,
    scaling: float,
    density: float,
    out: torch.Tensor,
) -> None:
    """``out = base + scaling * consensus_mask * merged(stack - base)``, one column chunk at a time
    (``[K, chunk]`` scratch; the input stack is read, never written):

    1. ``t = x - base``;
    2. over task_arithmetic: ``merged = multi = sum_k t``; over TIES: trim ``h`` (the row
       thresholds of the whole tensor), elected sign ``e``, agreeing magnitudes
       ``a = relu(e * h)``, ``multi = e * sum_k a`` (disjoint sum), ``merged = multi / count``
       (disjoint mean);
    3. with ``k > 0``: ``count_t(|t| > mask_lambda * |multi - t|) >= k`` masks ``merged``.
    """
    cuts = trim_cuts(stack, density, base) if over == "ties" else None
    num = stack.shape[0]
    flat, base_flat, out_flat = stack.reshape(num, -1), base.reshape(-1), out.view(-1)
    n = flat.shape[1]
    width = min(_CHUNK, n)
    scratch = torch.empty(2, num, width, dtype=flat.dtype, device=flat.device)
    keep = torch.empty(num, width, dtype=torch.bool, device=flat.device)
    for start in range(0, n, width):
        stop = min(start + width, n)
        t, h = scratch[0, :, : stop - start], scratch[1, :, : stop - start]
        torch.sub(flat[:, start:stop], base_flat[start:stop], out=t)
        if over == "task_arithmetic":
            merged = multi = t.sum(0)
        else:
            elected, total, count = trim_elect_chunk(t, cuts, h)  # TIES's step; t stays intact
            multi = total.mul_(elected)
            merged = multi / count
        if k > 0:
            # the TALL masks |t| > lambda * |multi - t|, counted over tasks
            distance = torch.sub(multi, t, out=h).abs_().mul_(mask_lambda)
            mask = torch.gt(t.abs_(), distance, out=keep[:, : stop - start])
            merged = merged * (mask.sum(0) >= k)
        torch.add(base_flat[start:stop], merged.mul_(scaling), out=out_flat[start:stop])


@merge_method(
    "consensus",
    reference="https://arxiv.org/abs/2405.07813",
    aliases=("tall_masks",),
    check=_check,
    resolve=_resolve,
)
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
    lam = _DEFAULT_SCALING[over] if scaling is None else scaling
    out = torch.empty_like(base)
    _consensus_fused(stacked(tensors), base, k, mask_lambda, over, lam, density, out)
    return out
