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

import numpy as np
import torch
from pydantic import Field

from ..errors import ConfigError
from ._stack import stacked
from .registry import AUTO, Grid, merge_method
from .ties import ties_task_vector_

_DEFAULT_SCALING = {"task_arithmetic": 0.3, "ties": 1.0}


_LEVELS = 1 << 16  # drop decisions compare 16 random bits with round(drop_rate * 2**16)
_CHUNK = 1 << 19  # entries per chunk of one task vector (2 MB: long enough ops for two engine threads)


def _drop_levels(drop_rate: float) -> int:
    """How many of the 2**16 values of a drop decision drop the entry."""
    return round(drop_rate * _LEVELS)


def _rescale(drop_rate: float) -> float:
    """The survivors' factor: the inverse of the exact survival probability."""
    return _LEVELS / (_LEVELS - _drop_levels(drop_rate))


class _DropBits:
    """The 16-bit random values that decide DARE's drops, one per entry of the flattened
    ``[K, *shape]`` stack in order, from numpy's SFC64 generator seeded from ``generator``. Drawn
    in chunks, they are the same stream as one draw of the whole stack (SFC64 yields 64-bit words,
    four values each; a partly used word carries over to the next chunk)."""

    def __init__(self, generator: torch.Generator):
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        self._bits = np.random.Generator(np.random.SFC64(seed)).bit_generator
        self._left = np.empty(0, dtype=np.uint16)

    def take(self, count: int) -> np.ndarray:
        fresh = self._bits.random_raw(max(0, count - len(self._left) + 3) // 4).view(np.uint16)
        values = np.concatenate([self._left, fresh]) if len(self._left) else fresh
        self._left = values[count:].copy()
        return values[:count]


def _keep_mask(shape: torch.Size, drop_rate: float, generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """A ``[*shape]`` float32 mask (1 = kept, 0 = dropped) and the survivors' rescaling factor.

    Each entry is dropped when its 16 random bits (:class:`_DropBits`) fall below
    ``round(drop_rate * 2**16)``; the comparison writes float32 directly, as torch's bool-to-float
    conversion is slow on CPU. The rescaling is the inverse of the exact survival probability, so
    the expectation is unchanged exactly."""
    numel = 1
    for s in shape:
        numel *= s
    keep = np.empty(numel, dtype=np.float32)
    np.greater_equal(_DropBits(generator).take(numel), _drop_levels(drop_rate), out=keep, casting="unsafe")
    return torch.from_numpy(keep).reshape(shape), _rescale(drop_rate)


def _dropped_task_vectors(
    stack: torch.Tensor, base: torch.Tensor, drop_rate: float, generator: torch.Generator, accumulate: bool
) -> torch.Tensor | None:
    """Form ``keep_k * (x_k - base)`` for the ``[K, *shape]`` inputs, one cache-sized chunk of one
    row at a time (the masks of :func:`_keep_mask`, never materialised whole). With
    ``accumulate``, return their sum over K; else write them into ``stack`` in place."""
    num = stack.shape[0]
    flat, base_flat = stack.reshape(num, -1), base.reshape(-1)
    n = flat.shape[1]
    width = min(_CHUNK, n)
    levels = _drop_levels(drop_rate)
    bits = _DropBits(generator) if levels else None
    scratch = torch.empty(width, dtype=flat.dtype, device=flat.device)
    keep = np.empty(width, dtype=np.float32)
    total = torch.zeros(n, dtype=flat.dtype, device=flat.device) if accumulate else None
    for k in range(num):
        for start in range(0, n, width):
            stop = min(start + width, n)
            t = scratch[: stop - start]
            torch.sub(flat[k, start:stop], base_flat[start:stop], out=t)
            if bits is not None:
                mask = keep[: stop - start]
                np.greater_equal(bits.take(stop - start), levels, out=mask, casting="unsafe")
                t.mul_(torch.from_numpy(mask).to(t.device))
            if total is not None:
                total[start:stop].add_(t)
            else:
                flat[k, start:stop].copy_(t)
    return total


def _check_drop_rate(drop_rate: float) -> None:
    if not 0.0 <= drop_rate < 1.0:
        raise ConfigError(f"dare: drop_rate must be in [0, 1), got {drop_rate}")
    if _drop_levels(drop_rate) >= _LEVELS:
        raise ConfigError(f"dare: drop_rate {drop_rate} is too close to 1 (resolution 2**-16)")


def _check(params: dict, _setting) -> None:
    if params["combine"] == "task_arithmetic" and params["density"] != 1.0:
        raise ValueError("dare: `density` only applies to `combine: ties`")
    if params["drop_rate"] != AUTO:
        _check_drop_rate(params["drop_rate"])


def _resolve(params: dict, _setting) -> dict:
    """``scaling`` left unset: the combining method's own default."""
    return {"scaling": _DEFAULT_SCALING[params["combine"]]}


def drop_and_rescale(task_vecs: torch.Tensor, drop_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Zero each entry with probability ``drop_rate`` and rescale the survivors by ``1/(1-drop_rate)``
    (a new tensor)."""
    _check_drop_rate(drop_rate)
    if drop_rate == 0.0:
        return task_vecs
    keep, scale = _keep_mask(task_vecs.shape, drop_rate, generator)
    return (task_vecs * keep.to(task_vecs.device)).mul_(scale)


@merge_method(
    "dare", needs_base=True, reference="https://arxiv.org/abs/2311.03099", check=_check, resolve=_resolve
)
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
        raise ConfigError(f"dare: combine must be one of {sorted(_DEFAULT_SCALING)}, got {combine!r}")
    if combine == "task_arithmetic" and density != 1.0:
        raise ConfigError("dare: density only applies to combine: ties")
    _check_drop_rate(drop_rate)
    generator = ctx.get("generator") or torch.Generator().manual_seed(0)
    lam = _DEFAULT_SCALING[combine] if scaling is None else float(scaling)
    # the rescaling is a positive constant: it commutes with the sum and with every TIES step
    # (magnitude ranks, signs, disjoint mean), so it is folded into lambda
    lam *= _rescale(drop_rate)
    inputs = stacked(tensors)
    if combine == "task_arithmetic":
        total = _dropped_task_vectors(inputs, base, drop_rate, generator, accumulate=True)
        return torch.add(base, total.view(base.shape), alpha=lam)
    _dropped_task_vectors(inputs, base, drop_rate, generator, accumulate=False)
    return ties_task_vector_(inputs, density).mul_(lam).add_(base)
