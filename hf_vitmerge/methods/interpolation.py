"""Weight interpolation, as used for multimodal merging by Sung et al., "An Empirical Study of
Multimodal Model Merging", EMNLP Findings 2023 (https://arxiv.org/abs/2304.14933).

``theta = sum_m w_m theta_m`` with non-negative weights normalised to sum to one.

Released code (github.com/ylsung/vl-merging @13c3041, ``src/vilt/modules/vilt_module.py``,
``merge_weights``): two experts get ``w_v = r`` and ``w_l = 1 - r`` with ``merge_ratio`` r
(default 0.5, ``src/vilt/config.py``); three experts (top layers) get ``(2/3) r``, ``(2/3)(1 - r)``
and ``1/3``. Here the weights are given directly (``weights: [r, 1 - r]`` reproduces the first case,
``[2r/3, 2(1-r)/3, 1/3]`` the second). Deviation: the paper's model shares its embeddings and
layer-scale tensors, which its code copies unchanged; K separate ViTs have one copy each, so every
tensor (embeddings and final LayerNorm included) is interpolated.
"""

from __future__ import annotations

import torch

from .registry import merge_method


@merge_method("interpolation", reference="https://arxiv.org/abs/2304.14933")
def interpolation(
    tensors: list[torch.Tensor], base: torch.Tensor | None = None, *, weights: list | None = None, **_
) -> torch.Tensor:
    """Weighted interpolation of the models' weights (Sung et al.'s ``merge_weights``).

    ``weights``: one non-negative number per model, normalised to sum to one (default: uniform,
    the paper's ``merge_ratio = 0.5``). A model's ``weight:`` in the config fills this list.
    """
    k = len(tensors)
    if weights is None:
        weights = [1.0] * k
    if len(weights) != k:
        raise ValueError(f"interpolation: got {len(weights)} weights for {k} models; give one per model")
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(
            f"interpolation: weights must be finite, non-negative and not all zero, got {weights}"
        )
    w = w / w.sum()
    out = torch.einsum("k,k...->...", w, torch.stack(tensors).to(torch.float64))
    return out.to(tensors[0].dtype)
