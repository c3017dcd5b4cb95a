"""CPU thread settings shared by the merge engine, the statistics collector and zoo training."""

from __future__ import annotations

import contextlib
import os

import torch


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS reports one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def intra_op_threads(n: int):
    """Run with ``n`` torch intra-op threads, restoring the caller's setting after. Concurrent
    OpenMP teams on few cores spin and stall, so threads that run beside others use few."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
