"""WUDI-Merging (Cheng et al., "Whoever Started the Interference Should End It: Guiding Data-Free
Model Merging via Task Vectors", ICML 2025, https://arxiv.org/abs/2503.08099).

The rows of a linear layer's task matrix ``tau_k`` span (approximately) the inputs that task k
feeds that layer, so the interference the merged task matrix ``tau`` causes on task k's inputs
can be measured with ``tau_k`` itself, without data. Per linear layer WUDI minimises

    L(tau) = sum_k || (tau - tau_k) tau_k^T ||_F^2 / ||tau_k||_F^2

from ``tau = sum_k tau_k`` with a bounded number of Adam steps (the reference: 300 steps),
and adds the result to the base. ``L`` is quadratic, so its gradient is
``2 (tau A - B)`` with ``A = sum_k tau_k^T tau_k / ||tau_k||^2`` and
``B = sum_k tau_k tau_k^T tau_k / ||tau_k||^2``, computed once per layer: each step costs one
``[out, in] x [in, in]`` product instead of K of them, and the iterates are those of the
reference's autograd loop.

Reference implementation: ``get_redundant_task_vector`` in github.com/nathanielyvo/WUDI-Merging
(``vit/wudi_main.py``). Deviations, on purpose: (1) the step size. The reference uses Adam with
an absolute ``lr = 1e-5``, tuned for CLIP fine-tunes whose task vectors are tiny; Adam moves
each entry by about ``lr`` per step whatever the gradient's scale, so here ``lr`` is by default
relative, ``lr_scale`` times the RMS entry of the layer's summed task vector (an absolute
``lr`` can still be given). (2) The reference merges only the linear layers and leaves every
other parameter at the base; here those parameters get the mean of their task vectors, as
TSV-M and Iso-C do.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from ..arch import ParamInfo
from ._subspace import is_task_matrix
from .registry import Grid, merge_method
from .task_arithmetic import task_vectors_


def interference_terms(task_mats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` (``[in, in]``) and ``B`` (``[out, in]``) of the quadratic WUDI loss of a ``[K, out, in]``
    stack, accumulated one task at a time (one ``[in, in]`` Gram matrix alive, not K of them:
    on ViT-B's fc2 the K = 8 stack of Grams alone would be 302 MB)."""
    tiny = torch.finfo(task_mats.dtype).tiny
    a = task_mats.new_zeros(task_mats.shape[2], task_mats.shape[2])
    b = task_mats.new_zeros(task_mats.shape[1:])
    for tau in task_mats:
        gram = (tau.T @ tau).div_(tau.pow(2).sum().clamp_min(tiny))
        a.add_(gram)
        b.addmm_(tau, gram)
    return a, b


def wudi_loss(merged: torch.Tensor, task_mats: torch.Tensor) -> torch.Tensor:
    """The reference's loss, written out directly (for checks; the solver uses ``A`` and ``B``)."""
    inner = (merged.unsqueeze(0) - task_mats) @ task_mats.transpose(1, 2)
    return (inner.pow(2).sum((1, 2)) / task_mats.pow(2).sum((1, 2))).sum()


def wudi_task_matrix(
    task_mats: torch.Tensor, steps: int = 300, lr: float | None = None, lr_scale: float = 0.01
) -> torch.Tensor:
    """The WUDI merged task matrix of a ``[K, out, in]`` stack after ``steps`` Adam steps."""
    a, b = interference_terms(task_mats)
    init = task_mats.sum(0)
    if lr is None:
        lr = lr_scale * float(init.pow(2).mean().sqrt())
    merged = torch.nn.Parameter(init.clone())
    if steps == 0 or lr == 0:
        return merged.detach()
    optimizer = torch.optim.Adam([merged], lr=lr)
    for _ in range(steps):
        merged.grad = 2 * (merged.detach() @ a - b)
        optimizer.step()
    return merged.detach()


@merge_method("wudi", reference="https://arxiv.org/abs/2503.08099", aliases=("wudi_merging",))
def wudi(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    scaling: Annotated[float, Field(ge=0), Grid(0.5, 0.75, 1.0, 1.25, 1.5)] = 1.0,
    steps: Annotated[int, Field(ge=0)] = 300,
    lr: Annotated[float, Field(gt=0)] | None = None,
    lr_scale: Annotated[float, Field(gt=0), Grid(0.001, 0.003, 0.01, 0.03, 0.1)] = 0.01,
    param: ParamInfo | None = None,
    **_,
) -> torch.Tensor:
    """WUDI: per linear layer, minimise the merged task vector's interference on each task's own subspace.

    ``steps`` Adam steps (reference: 300) from the sum of the task matrices; ``lr`` absolute
    step size (reference: 1e-5, for CLIP-sized task vectors) or, by default, ``lr_scale`` times
    the RMS entry of the summed task matrix. ``scaling`` multiplies the result (reference: 1).
    """
    tvs = task_vectors_(tensors, base)  # in the engine's buffer: no [K, *param] copy
    if is_task_matrix(tvs[0], param):
        return base + scaling * wudi_task_matrix(tvs, steps, lr, lr_scale)
    return base + scaling * tvs.mean(0)
