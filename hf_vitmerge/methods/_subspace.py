"""Shared maths of the spectral (task-matrix) merges: TSV-M, Iso-C, Iso-CTS and WUDI.

These methods treat each linear layer's task vector ``tau_k = W_k - W_base`` as a matrix and
work on its singular vectors; every other parameter (biases, LayerNorms, embeddings, a shared
classifier) is merged as the mean of its task vectors, as the reference implementations do.
Which tensors are linear-layer matrices is the architecture adapter's call
(:attr:`hf_vitmerge.arch.ParamInfo.is_linear_weight`), never the key's spelling.
"""

from __future__ import annotations

import torch

from ..arch import ParamInfo


def is_task_matrix(tensor: torch.Tensor, param: ParamInfo | None) -> bool:
    """True for the ``[out, in]`` weight of a linear layer.

    ``param`` comes from the adapter when the merge engine streams a model; a direct call
    without it (a bare tensor) counts any 2-D tensor as a matrix.
    """
    if param is not None:
        return param.is_linear_weight
    return tensor.ndim == 2


def orthonormalize(x: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (rows, for a wide ``x``): ``U V^T`` of its SVD.

    This is the polar factor, the orthogonal Procrustes solution: it keeps the directions of
    ``x`` and removes the overlap between them.
    """
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def top_singular(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` leading singular triplets of ``x``: ``U[:, :k]``, ``S[:k]``, ``Vh[:k]`` (copies, so
    the full factors are freed at once: a merge holds K tasks' triplets at a time)."""
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return u[:, :k].clone(), s[:k].clone(), vh[:k].clone()


def svd_merge(us: list[torch.Tensor], ss: list[torch.Tensor], vhs: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-task singular triplets, orthogonalise the joint U and V, rebuild.

    ``U_o diag(S) V_o^T`` with ``U_o = orth([U_1 .. U_K])`` and ``V_o = orth([V_1 .. V_K])``:
    where the tasks' subspaces are already orthogonal this is exactly ``sum_k U_k S_k V_k^T``.
    """
    u = orthonormalize(torch.cat(us, dim=1))
    vh = orthonormalize(torch.cat(vhs, dim=0))
    return u @ torch.diag(torch.cat(ss)) @ vh
