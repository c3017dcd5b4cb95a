"""Cheap checks run before any expensive work: the device exists, the outputs can be written.

Each raises an :class:`~hf_vitmerge.errors.InputError` / :class:`~hf_vitmerge.errors.OutputError`
naming the input and what to do, and leaves nothing behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import InputError, OutputError


def check_device(device: str | None, what: str = "--device") -> None:
    """Refuse a CUDA device on a machine without one (before any model is loaded)."""
    if not device or device == "cpu":
        return
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(
                f"{what} {device}: this machine has no usable CUDA device (torch {torch.__version__}, "
                f"torch.cuda.is_available() is False). Use --device cpu, or install a CUDA build of torch."
            )
        index = device.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise InputError(
                f"{what} {device}: no such CUDA device (this machine has {torch.cuda.device_count()})."
            )
    elif device != "mps":
        raise InputError(f"{what} {device!r}: unknown device; use cpu or cuda (cuda:N for one GPU).")


def check_writable(path: str | os.PathLike, what: str, *, beside: bool = False) -> Path:
    """Refuse an output ``path`` (file or folder) that cannot be created or written.

    Probes the nearest existing folder (with ``beside``, the folder that will hold ``path``)
    with a temporary file that is removed at once, so the check also holds for root and
    read-only mounts; creates nothing that stays.
    """
    path = Path(path).expanduser()
    if path.is_dir() and not beside and not os.access(path, os.W_OK):
        raise OutputError(f"{what} {path}: the folder is not writable. Choose another location.")
    ancestor = path if path.is_dir() and not beside else path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{what} {path}: {ancestor} is a file, not a folder. Choose another location.")
    try:
        with tempfile.TemporaryFile(dir=ancestor, prefix=".hf_vitmerge-write-check-"):
            pass
    except OSError as err:
        raise OutputError(
            f"{what} {path}: cannot write in {ancestor} ({err.strerror or err}). "
            "Choose a writable location, or fix the folder's permissions."
        ) from None
    return path
