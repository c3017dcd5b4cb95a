"""Isotropic merging (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common
and Task-Specific Subspaces", ICML 2025, https://arxiv.org/abs/2502.04959).

* **Iso-C** (``iso_c``): per linear layer, take the sum of the task matrices
  ``sum_k tau_k = U S V^T`` and flatten its spectrum: ``U (mean(S) I) V^T``. A flat spectrum
  stops the few dominant directions (shared by many tasks) from drowning the directions that
  only one task needs.
* **Iso-CTS** (``iso_cts``): keep the top ``common_space_fraction`` of the rank of that sum as
  a common subspace, fill the rest with each task's own top directions after projecting out the
  common subspace (an equal share per task), orthogonalise the joint U and V (polar factor) and
  flatten the spectrum over all of them.

Every other parameter gets the mean of its task vectors; the merged task vector is added to
the base with ``scaling`` (alpha). Reference implementation: ``iso_c`` / ``iso_cts`` in
github.com/danielm1405/iso-merging (``src/utils/iso.py``), whose code searches alpha on
validation data over 0.1 .. 3.0; FusionBench ships alpha = 1.0 and ``common_space_fraction``
= 0.8, the defaults here.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from ..arch import ParamInfo
from ._subspace import is_task_matrix, svd_merge, top_singular
from .registry import Grid, merge_method
from .task_arithmetic import task_vectors_

Alpha = Annotated[float, Field(ge=0), Grid(0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)]


def flatten_spectrum(matrix: torch.Tensor) -> torch.Tensor:
    """``U (mean(S) I) V^T`` for ``matrix = U S V^T``: same singular vectors, equal singular values."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u * s.mean()) @ vh


def iso_c_task_matrix(task_mats: torch.Tensor) -> torch.Tensor:
    """The Iso-C merged task matrix of a ``[K, out, in]`` stack."""
    return flatten_spectrum(task_mats.sum(0))


def subspace_sizes(rank: int, num_tasks: int, common_fraction: float) -> tuple[int, int]:
    """(common directions, directions per task): the task-specific part divides evenly by K."""
    common = int(rank * common_fraction)
    per_task = round((rank - common) / num_tasks)
    return rank - per_task * num_tasks, per_task


def iso_cts_task_matrix(task_mats: torch.Tensor, common_fraction: float = 0.8) -> torch.Tensor:
    """The Iso-CTS merged task matrix of a ``[K, out, in]`` stack."""
    num = task_mats.shape[0]
    common, per_task = subspace_sizes(min(task_mats.shape[1:]), num, common_fraction)
    u_c, s_c, vh_c = top_singular(task_mats.sum(0), common)
    us, ss, vhs = [u_c], [s_c], [vh_c]
    if per_task > 0:
        for tau in task_mats:
            u, s, vh = top_singular(tau - u_c @ (u_c.T @ tau), per_task)
            us.append(u)
            ss.append(s)
            vhs.append(vh)
    merged = svd_merge(us, ss, vhs)
    return flatten_spectrum(merged)


@merge_method("iso_c", reference="https://arxiv.org/abs/2502.04959")
def iso_c(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    scaling: Alpha = 1.0,
    param: ParamInfo | None = None,
    **_,
) -> torch.Tensor:
    """Iso-C: per layer, the summed task matrix with its singular values made equal (isotropic)."""
    tvs = task_vectors_(tensors, base)  # in the engine's buffer: no [K, *param] copy
    if is_task_matrix(tvs[0], param):
        return base + scaling * iso_c_task_matrix(tvs)
    return base + scaling * tvs.mean(0)


@merge_method("iso_cts", reference="https://arxiv.org/abs/2502.04959")
def iso_cts(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    scaling: Alpha = 1.0,
    common_space_fraction: Annotated[float, Field(ge=0, le=1), Grid(0.6, 0.7, 0.8, 0.9)] = 0.8,
    param: ParamInfo | None = None,
    **_,
) -> torch.Tensor:
    """Iso-CTS: Iso-C's common subspace plus each task's own directions, all with one flat spectrum."""
    tvs = task_vectors_(tensors, base)  # in the engine's buffer: no [K, *param] copy
    if is_task_matrix(tvs[0], param):
        return base + scaling * iso_cts_task_matrix(tvs, common_space_fraction)
    return base + scaling * tvs.mean(0)
