"""DARE, "Drop And REscale" (Yu et al., "Language Models are Super Mario: Absorbing Abilities
from Homologous Models as a Free Lunch", ICML 2024, https://arxiv.org/abs/2311.03099).

Each task vector ``tau_k = theta_k - theta_base`` keeps every entry with probability
``1 - drop_rate`` and is rescaled by ``1 / (1 - drop_rate)``, so its expectation is unchanged.
The sparsified task vectors are then combined with task arithmetic (``combine:
task_arithmetic``, the paper's main setting) or with TIES sign election and disjoint mean
(``combine: ties``, "DARE-TIES").

The random masks come from the per-key ``generator`` the engine passes (seeded from the merge
seed and the tensor's key), so a merge is reproducible for a seed and does not depend on the
order in which tensors are processed.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from .registry import Grid, merge_method
from .task_arithmetic import task_vectors
from .ties import ties_task_vector

_DEFAULT_SCALING = {"task_arithmetic": 0.3, "ties": 1.0}


def drop_and_rescale(task_vecs: torch.Tensor, drop_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Zero each entry with probability ``drop_rate`` and rescale the survivors by ``1/(1-drop_rate)``."""
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"dare: drop_rate must be in [0, 1), got {drop_rate}")
    if drop_rate == 0.0:
        return task_vecs
    keep = torch.rand(task_vecs.shape, generator=generator, dtype=torch.float32) >= drop_rate
    return task_vecs * keep / (1.0 - drop_rate)


@merge_method("dare", needs_base=True, reference="https://arxiv.org/abs/2311.03099")
def dare(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    drop_rate: Annotated[float, Field(ge=0, lt=1), Grid(0.1, 0.3, 0.5, 0.7, 0.9)] = 0.5,
    combine: Literal["task_arithmetic", "ties"] = "task_arithmetic",
    scaling: Annotated[float, Field(ge=0), Grid(0.1, 0.2, 0.3, 0.5, 0.7, 1.0)] | None = None,
    density: Annotated[float, Field(gt=0, le=1)] = 1.0,
    **ctx,
) -> torch.Tensor:
    """DARE: randomly drop ``drop_rate`` of each task vector, rescale, then combine (task arithmetic or TIES).

    ``drop_rate`` defaults to 0.5, not the paper's 0.9: the paper shows DARE holds up when
    fine-tuning deltas are tiny (LLM SFT, |delta| < 0.005) and breaks down as they grow; small
    ViTs fine-tuned per task move their weights much further, and 0.5 keeps the rescaled task
    vectors' noise moderate. ``scaling`` defaults to the combining method's own default (0.3 for
    task arithmetic, 1.0 for TIES). ``density`` is the TIES magnitude trim applied after the drop
    (1.0 = none, as in the paper's DARE-TIES and mergekit's ``dare_ties``); it is ignored by
    task arithmetic.
    """
    if combine not in _DEFAULT_SCALING:
        raise ValueError(f"dare: combine must be one of {sorted(_DEFAULT_SCALING)}, got {combine!r}")
    if combine == "task_arithmetic" and density != 1.0:
        raise ValueError("dare: density only applies to combine: ties")
    generator = ctx.get("generator") or torch.Generator().manual_seed(0)
    lam = _DEFAULT_SCALING[combine] if scaling is None else float(scaling)
    dropped = drop_and_rescale(task_vectors(tensors, base), drop_rate, generator)
    merged = dropped.sum(0) if combine == "task_arithmetic" else ties_task_vector(dropped, density)
    return base + lam * merged
