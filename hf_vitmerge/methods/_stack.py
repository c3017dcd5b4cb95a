"""The stacked inputs of a tensorwise method (private helper, not a method module).

The engine hands a tensorwise method its K input tensors as a :class:`TensorStack`: a plain
list of tensors (the documented interface, so methods written against ``list[Tensor]`` keep
working) that also carries them as one contiguous ``[K, *shape]`` float32 buffer. The buffer
belongs to the engine for this one call, so a method may overwrite it in place (e.g. subtract
the base to form task vectors) instead of allocating ``torch.stack(tensors)``.
"""

from __future__ import annotations

import torch


class TensorStack(list):
    """``list[Tensor]`` of K inputs that are rows of ``self.stacked`` (scratch: may be overwritten)."""

    def __init__(self, stacked: torch.Tensor):
        super().__init__(stacked.unbind(0))
        self.stacked = stacked


def stacked(tensors) -> torch.Tensor:
    """The ``[K, *shape]`` inputs as a tensor the caller may modify in place: the engine's buffer
    when given a :class:`TensorStack`, else a fresh ``torch.stack`` (the inputs stay untouched)."""
    if isinstance(tensors, TensorStack):
        return tensors.stacked
    return torch.stack(list(tensors))
