"""The types every merge method shares: the method's result, the merge context, and small helpers.

A model-level method receives a :class:`MergeContext` and returns a :class:`MergeResult`;
:mod:`hf_vitmerge.merging` runs the method and assembles the merged model from the result.
"""

from __future__ import annotations

import os
import queue
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..arch import ViTAdapter
from ..config import MergeConfig
from ..data import DataError, TaskData, load_task_data
from ..errors import ConfigError, HFVitMergeError
from ..loading import ModelSource
from ..streaming import StackBuffers, StreamReader, file_order
from ..threads import intra_op_threads, usable_cores
from ._stack import TensorStack
from .registry import MethodSpec, Setting


@dataclass
class MergeResult:
    """What a model-level method returns.

    Either ``backbone`` (canonical tensors of every non-head parameter) with ``heads`` (one
    ``(weight, bias)`` per input model, expressed in the merged residual basis) and/or a
    ``shared_head``; or a complete custom ``model`` (partial zip, gated).
    """

    backbone: dict[str, torch.Tensor] | None = None
    heads: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    shared_head: tuple[torch.Tensor, torch.Tensor] | None = None
    model: torch.nn.Module | None = None
    info: dict = field(default_factory=dict)


@dataclass
class MergeContext:
    """Everything a merge method may need, loaded lazily."""

    config: MergeConfig
    sources: list[ModelSource]
    base: ModelSource | None
    task_names: list[str]
    heads_mode: str  # shared | union | multi (resolved)
    quiet: bool = False
    timings: dict = field(default_factory=dict)
    _data: dict = field(default_factory=dict, repr=False)

    @property
    def adapter(self) -> ViTAdapter:
        return self.sources[0].adapter

    @property
    def seed(self) -> int:
        return self.config.seed

    def setting(self) -> Setting:
        """The merge's setting, with the models read (see :class:`~hf_vitmerge.methods.registry.Setting`)."""
        return Setting(
            num_models=len(self.sources),
            has_base=self.base is not None,
            num_layers=self.adapter.spec.num_layers,
        )

    @property
    def device(self) -> str:
        return self.config.device

    @property
    def label_lists(self) -> list[list[str]]:
        return [s.labels for s in self.sources]

    def models(self) -> list[torch.nn.Module]:
        return [s.load_model() for s in self.sources]

    def release_models(self) -> None:
        """Drop the input models loaded for the merge (their memory goes back once the merge is done)."""
        for s in [*self.sources, *([self.base] if self.base is not None else [])]:
            s._model = None

    def generator(self, key: str = "") -> torch.Generator:
        """A generator seeded by the merge seed and a name, independent of call order."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(key.encode()))

    def calibration_data(self, index: int, split: str | None = None) -> TaskData:
        """Calibration data of model ``index`` (``samples_per_task`` examples, seeded)."""
        entry = self.config.models[index].data
        if entry is None:
            raise ConfigError(
                f"method {self.config.method!r} needs calibration data, but model "
                f"{self.sources[index].ref!r} has no `data:` entry in the config. Add one per model."
            )
        cache_key = (index, split or entry.split)
        if cache_key not in self._data:
            try:
                data = load_task_data(
                    entry.path,
                    split or entry.split,
                    image_column=entry.image_column,
                    label_column=entry.label_column,
                    revision=entry.revision,
                    num_labels=len(self.sources[index].labels),
                )
            except DataError as err:
                raise DataError(f"models.{index} (model {self.sources[index].ref!r}): {err}") from None
            self._data[cache_key] = data.subset(self.config.calibration.samples_per_task, seed=self.seed)
        return self._data[cache_key]

    def run_tensorwise(
        self, spec: MethodSpec, params: dict, keys: Sequence[str], sink: Callable | None = None
    ) -> dict[str, torch.Tensor]:
        """Stream ``keys`` from every input's weight files through a tensorwise method.

        Each tensor of every input is read once, in file order, straight into a reusable
        ``[K, *shape]`` float32 buffer (:mod:`hf_vitmerge.streaming`), which the method receives
        as a :class:`~hf_vitmerge.methods._stack.TensorStack` (a ``list[Tensor]``). Tensors are
        read and merged by :func:`engine_workers` threads at once, each with its own buffer set
        and one intra-op thread, so one tensor is read while others are merged and the method runs
        on every core; the result does not depend on the order (each key's random generator is
        seeded from the key). Returns
        ``{key: merged tensor}``; with ``sink``, each merged tensor is passed to ``sink(key, tensor)``
        as soon as it is produced (a tensor of its own, never a view of the engine's buffers: the
        sink may keep it) and the returned dict is empty, so the merged tensors are never held twice.

        NaN/inf: each merged tensor is checked (one reduction over 1/K of what was read); if it is
        not finite, its inputs are read again, checked, and the bad one is named
        (``ModelLoadError``), so no second pass over every input is needed (``prepare`` skips it).
        """
        readers = [StreamReader(s) for s in self.sources]
        base_reader = StreamReader(self.base) if self.base is not None else None
        weights = [m.weight for m in self.config.models]
        if (
            any(w is not None for w in weights)
            and "weights" in spec.defaults
            and params.get("weights") is None
        ):
            params = {**params, "weights": [1.0 if w is None else w for w in weights]}
        ordered = file_order(keys, readers[0])
        shapes = {key: readers[0].shape(key) for key in ordered}
        largest = max((_numel(s) for s in shapes.values()), default=0)
        workers = engine_workers()
        # one buffer set per worker: a worker reads its tensor (preadv releases the GIL) while
        # another runs the method on its own
        free: queue.SimpleQueue[StackBuffers] = queue.SimpleQueue()
        for _ in range(workers):
            buffers = StackBuffers(len(readers))
            buffers.reserve(largest)
            free.put(buffers)

        def work(key: str) -> torch.Tensor:
            buffers = free.get()
            try:
                stack, base = _read_stack(key, shapes[key], buffers, readers, base_reader)
                if spec.needs_base and base is None:
                    raise ValueError(f"{spec.name}: the base model has no tensor {key} of matching shape")
                merged = spec.fn(
                    TensorStack(stack),
                    base,
                    key=key,
                    param=self.adapter.info(key),
                    generator=self.generator(key),
                    **params,
                )
                if not bool(torch.isfinite(merged.sum())) and not bool(torch.isfinite(merged).all()):
                    _refuse_nonfinite(spec.name, key, self.sources, self.base)
                merged = merged.clone() if buffers.owns(merged) else _compact(merged)
            finally:
                free.put(buffers)
            if sink is not None:
                sink(key, merged)
            return merged

        out: dict[str, torch.Tensor] = {}
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hf_vitmerge-merge")
        try:
            with intra_op_threads(1 if workers > 1 else torch.get_num_threads()):
                futures = [pool.submit(work, key) for key in ordered]  # started in file order
                progress = tqdm(futures, desc=f"{spec.name}", disable=self.quiet, unit="tensor")
                for key, future in zip(ordered, progress, strict=True):
                    merged = future.result()
                    if sink is None:
                        out[key] = merged
                    del merged
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            for r in readers + ([base_reader] if base_reader else []):
                r.close()
        return out


def _read_stack(
    key: str, shape, buffers: StackBuffers, readers: list[StreamReader], base_reader: StreamReader | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read ``key`` from every input into ``buffers`` (and from the base, when it has that tensor
    with the same shape; else the base is None)."""
    stack, base = buffers.views(shape)
    for reader, row in zip(readers, stack, strict=True):
        reader.read_into(key, row)
    if base_reader is None or key not in base_reader or base_reader.shape(key) != shape:
        return stack, None
    base_reader.read_into(key, base)
    return stack, base


def engine_workers() -> int:
    """Threads of the tensorwise engine: ``$HF_VITMERGE_MERGE_THREADS`` if set, else the usable CPU
    cores, at least 2 (reading overlaps the method's work) and at most 4 (each holds one
    ``[K, *shape]`` buffer set)."""
    if os.environ.get("HF_VITMERGE_MERGE_THREADS"):
        return max(1, int(os.environ["HF_VITMERGE_MERGE_THREADS"]))
    return max(2, min(4, usable_cores()))


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous tensor that owns exactly its storage (a copy if it is a view into more)."""
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _refuse_nonfinite(
    method: str, key: str, sources: Sequence[ModelSource], base: ModelSource | None
) -> None:
    """Name the input whose NaN/inf reached the merged tensor ``key`` (reading it again, checked)."""
    for source in [*sources, *([base] if base is not None else [])]:
        reader = source.tensors()
        try:
            if key in reader:
                reader.get_finite(key)  # raises ModelLoadError
        finally:
            reader.close()
    raise HFVitMergeError(
        f"{method}: the merged tensor {key} holds NaN or infinite values although every input's is "
        "finite (an overflow in the method?). Try other parameters (a smaller scaling) or another method."
    )


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def union_labels(task_names: list[str], label_lists: list[list[str]]) -> list[str]:
    """Union of all labels in task order; names that collide across tasks become ``task:label``."""
    owners: dict[str, set[str]] = {}
    for task, labels in zip(task_names, label_lists, strict=True):
        for label in labels:
            owners.setdefault(label, set()).add(task)
    out = []
    for task, labels in zip(task_names, label_lists, strict=True):
        out += [f"{task}:{lab}" if len(owners[lab]) > 1 else lab for lab in labels]
    return out


def read_heads(sources: Sequence[ModelSource]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    heads = []
    for s in sources:
        reader = s.tensors()
        w, b = (reader.get_finite(k).to(torch.float32) for k in s.adapter.classifier_keys)
        heads.append((w, b))
        reader.close()
    return heads


def merged_config_dict(ctx: MergeContext) -> dict:
    """The first input's config without its label space (the caller adds the new one)."""
    cfg = ctx.sources[0].config.to_dict()
    for k in (
        "id2label",
        "label2id",
        "architectures",
        "num_labels",
        "_name_or_path",
        "auto_map",
        "transformers_version",
    ):
        cfg.pop(k, None)
    return cfg
