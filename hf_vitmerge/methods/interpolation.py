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

The maths is :func:`~hf_vitmerge.methods.average.average` with weights: this method is ``average``
under the paper's name and reference (one implementation, :func:`weighted_average`).
"""

from __future__ import annotations

import torch

from .average import Weights, check_weights, weighted_average
from .registry import merge_method


@merge_method("interpolation", reference="https://arxiv.org/abs/2304.14933", check=check_weights)
def interpolation(
    tensors: list[torch.Tensor], base: torch.Tensor | None = None, *, weights: Weights = None, **_
) -> torch.Tensor:
    """Weighted interpolation of the models' weights (Sung et al.'s ``merge_weights``).

    ``weights``: one non-negative number per model, normalised to sum to one (default: uniform,
    the paper's ``merge_ratio = 0.5``). A model's ``weight:`` in the config fills this list.
    """
    return weighted_average(tensors, weights, method="interpolation")
