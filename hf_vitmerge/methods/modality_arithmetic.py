"""Modality arithmetic (Sung et al., "An Empirical Study of Multimodal Model Merging", EMNLP
Findings 2023, https://arxiv.org/abs/2304.14933): task arithmetic whose origin is the *seed*
pre-trained model, ``theta = theta_seed + lambda * sum_m (theta_m - theta_seed)``.

Default ``scaling`` (lambda) = 0.75: the value in the modality-arithmetic example of the released
README (github.com/ylsung/vl-merging @13c3041, ``sum_task_vectors=True sum_lambda=0.75``); the
code's config default is ``sum_lambda = 1`` (``src/vilt/config.py``).

Deviation from the released code, on purpose. ``sum_task_vectors`` in
``src/vilt/modules/vilt_module.py`` does ``later_weight = central_weight[k]`` and then
``later_weight += lambda * (theta_m - central_weight[k])`` for each modality m. ``+=`` on a torch
tensor is in place, so ``later_weight`` *is* the seed tensor: the seed is overwritten after the
first modality, and each later modality's vector is measured from the already-updated seed. For two
experts the code computes ``(1 - l)^2 theta_0 + l (1 - l) theta_v + l theta_l`` (order-dependent),
not the formula. Example: theta_0 = 1, theta_v = 3, theta_l = 5, lambda = 0.75 gives 4.375 in the
code and 5.5 by the formula. This implementation computes the formula and never modifies the base
(seed) tensor; ``tests/test_vlmerge_methods.py`` checks both facts.
"""

from __future__ import annotations

import torch

from .registry import merge_method
from .task_arithmetic import task_arithmetic


@merge_method("modality_arithmetic", needs_base=True, reference="https://arxiv.org/abs/2304.14933")
def modality_arithmetic(
    tensors: list[torch.Tensor], base: torch.Tensor | None = None, *, scaling: float = 0.75, **_
) -> torch.Tensor:
    """Seed model plus ``scaling`` times the sum of the models' vectors from the seed.

    ``base_model`` is the seed (modality-agnostic) pre-trained model. The formula equals
    ``task_arithmetic``; what differs is the paper's default lambda (0.75) and the setting (the
    inputs are modality- or domain-specific continuations of one seed model), so this method is
    ``task_arithmetic`` under the paper's name, reference and default.
    """
    if base is None:
        raise ValueError("modality_arithmetic needs the seed model as `base_model`")
    return task_arithmetic(tensors, base, scaling=scaling)
