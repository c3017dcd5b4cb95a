"""Read checkpoint tensors straight into caller-owned buffers, in file order.

The tensorwise merge engine reads every input tensor exactly once. Memory-mapping a
safetensors file and copying out of the mapping costs a page fault per 4 KiB (and, with
``torch.stack`` over mapped tensors, far more: the stack was 60 % of an 8-model ViT-B average); a
positioned read (``os.preadv``) of the tensor's byte range into a preallocated float32 buffer
costs one system call per tensor and touches each byte once. Keys are visited in the order
of their bytes in the first input's files, so every file is read front to back.

``.bin`` checkpoints and tensors stored in another dtype go through a fallback (read, then
cast into the buffer). Nothing here checks values: the merge engine checks what it merges for
NaN and infinity (1/K of the data; ``MergeContext.run_tensorwise``).
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from .loading import ModelSource

_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}


def _header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


class StreamReader:
    """Canonical tensors of one model, read with ``os.preadv`` into buffers the caller owns.
    Several threads may read from one reader at once."""

    def __init__(self, source: ModelSource):
        self.source = source
        self._lock = threading.Lock()
        self._reader = source.tensors()  # canonical key -> (file, key in file); fallback reads
        self._fds: dict[Path, int] = {}
        self._headers: dict[Path, tuple[int, dict]] = {}
        for file, _ in self._reader._where.values():
            if file.suffix == ".safetensors" and file not in self._headers:
                self._headers[file] = _header(file)

    def __contains__(self, key: str) -> bool:
        return key in self._reader

    def _entry(self, key: str) -> tuple[Path, dict | None, int]:
        file, file_key = self._reader._where[key]
        if file not in self._headers:
            return file, None, 0
        start, header = self._headers[file]
        return file, header[file_key], start

    def shape(self, key: str) -> tuple[int, ...]:
        _, entry, _ = self._entry(key)
        return tuple(entry["shape"]) if entry is not None else tuple(self._reader.get(key).shape)

    def position(self, key: str) -> tuple[str, int]:
        """(file, byte offset): the order keys are read in."""
        file, entry, _ = self._entry(key)
        return str(file), entry["data_offsets"][0] if entry is not None else 0

    def read_into(self, key: str, out: torch.Tensor) -> torch.Tensor:
        """Fill the contiguous float32 CPU tensor ``out`` (the key's shape) with the tensor ``key``."""
        if key not in self._reader:
            self._reader.get(key)  # raises ModelLoadError naming the model and key
        file, entry, data_start = self._entry(key)
        if entry is None or _DTYPES.get(entry["dtype"]) != out.dtype or not out.is_contiguous():
            with self._lock:  # the fallback reader loads and caches files: one thread at a time
                tensor = self._reader.get(key)
            out.copy_(tensor.reshape(out.shape))
        else:
            self._pread(key, file, entry, data_start, out)
        return out

    def _pread(self, key: str, file: Path, entry: dict, data_start: int, out: torch.Tensor) -> None:
        begin, end = entry["data_offsets"]
        if end - begin != out.numel() * out.element_size():
            raise ValueError(
                f"{self.source.ref!r}: tensor {key} has {end - begin} bytes, expected {out.shape}"
            )
        fd = self._fds.get(file)
        if fd is None:  # two engine threads may get here at once: keep one descriptor
            opened = os.open(file, os.O_RDONLY)
            fd = self._fds.setdefault(file, opened)
            if fd != opened:
                os.close(opened)
        view = memoryview(out.numpy()).cast("B")
        done = 0
        while done < len(view):  # preadv may return short reads
            n = os.preadv(fd, [view[done:]], data_start + begin + done)
            if n <= 0:
                raise OSError(f"{self.source.ref!r}: unexpected end of {file.name} reading {key}")
            done += n

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._reader.close()


def file_order(keys: Sequence[str], reader: StreamReader) -> list[str]:
    """``keys`` sorted by where their bytes lie in ``reader``'s files."""
    return sorted(keys, key=reader.position)


class StackBuffers:
    """Reusable float32 buffers: ``[K, *shape]`` for the inputs and ``[*shape]`` for the base."""

    def __init__(self, num_inputs: int):
        self.k = num_inputs
        self._inputs = torch.empty(0)
        self._base = torch.empty(0)

    def reserve(self, numel: int) -> None:
        if self._base.numel() < numel:
            self._inputs = self._base = torch.empty(0)  # free the old ones first
            self._inputs = torch.empty(self.k * numel, dtype=torch.float32)
            self._base = torch.empty(numel, dtype=torch.float32)

    def views(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        numel = 1
        for s in shape:
            numel *= s
        self.reserve(numel)
        return self._inputs[: self.k * numel].view(self.k, *shape), self._base[:numel].view(shape)

    def owns(self, t: torch.Tensor) -> bool:
        ptr = t.untyped_storage().data_ptr()
        return ptr in (self._inputs.untyped_storage().data_ptr(), self._base.untyped_storage().data_ptr())
