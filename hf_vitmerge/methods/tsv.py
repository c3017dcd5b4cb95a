"""TSV-Merge (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model
Merging", CVPR 2025, https://arxiv.org/abs/2412.00081).

Per linear layer, each task matrix ``tau_k = W_k - W_base`` is compressed to its top
``keep * rank`` singular triplets (the paper keeps ``1/K`` of the rank, so the K tasks fill the
layer's rank exactly); the concatenated left and right singular vectors of all tasks are
orthogonalised (polar factor, the Procrustes solution) to remove the interference between
tasks, and ``U_o diag(S) V_o^T`` is added to the base with ``scaling`` (alpha). Every other
parameter gets the mean of its task vectors, as in the reference code.

Reference implementations: github.com/AntoAndGar/task_singular_vectors and the compact
``compute_and_sum_svd_mem_reduction`` in github.com/danielm1405/iso-merging
(``src/utils/TSVM_utils.py``). Deviations, on purpose: each task keeps at least one singular
triplet (the reference keeps ``int(rank / K)``, which is zero when K exceeds a layer's rank);
the joint U and V hold only the kept columns (the reference pads them with zero columns, which
the zero singular values then cancel).
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from ..arch import ParamInfo
from ._subspace import is_task_matrix, svd_merge, top_singular
from .registry import Grid, merge_method
from .task_arithmetic import task_vectors_

# alpha: the paper uses 1.0; its code searches 0.1 .. 3.0 on validation data.
Alpha = Annotated[float, Field(ge=0), Grid(0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)]


def tsv_task_matrix(task_mats: torch.Tensor, keep: float | None = None) -> torch.Tensor:
    """The TSV-M merged task matrix of a ``[K, out, in]`` stack."""
    num = task_mats.shape[0]
    rank = min(task_mats.shape[1:])
    k = max(1, int(rank * (1.0 / num if keep is None else keep)))
    triplets = [top_singular(t, k) for t in task_mats]
    return svd_merge(*(list(parts) for parts in zip(*triplets, strict=True)))


@merge_method("tsv", reference="https://arxiv.org/abs/2412.00081", aliases=("tsv_merge", "tsvm"))
def tsv(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    scaling: Alpha = 1.0,
    keep: Annotated[float, Field(gt=0, le=1)] | None = None,
    param: ParamInfo | None = None,
    **_,
) -> torch.Tensor:
    """TSV-Merge: per layer, keep each task's top singular vectors, orthogonalise them across tasks, add.

    ``scaling`` (alpha) multiplies the merged task vector (paper: 1.0). ``keep``: the fraction
    of each task matrix's rank kept (default ``1/K``, the paper's choice).
    """
    tvs = task_vectors_(tensors, base)  # in the engine's buffer: no [K, *param] copy
    if is_task_matrix(tvs[0], param):
        return base + scaling * tsv_task_matrix(tvs, keep)
    return base + scaling * tvs.mean(0)
