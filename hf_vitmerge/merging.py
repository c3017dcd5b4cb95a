"""The merge pipeline: load and validate models -> (statistics) -> merge maths -> assemble.

``merge()`` is the Python entry point; ``run_merge()`` (in :mod:`hf_vitmerge.api`) adds
evaluation, the model card, atomic saving and ``push_to_hub``.
"""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .arch import ViTAdapter
from .config import MergeConfig, load_config
from .data import DataError, TaskData, check_data_path, load_task_data
from .errors import ConfigError, InputError
from .loading import ModelSource, resolve_model
from .methods import MethodSpec, get_method


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
        ``[K, *shape]`` float32 buffer (:mod:`hf_vitmerge.streaming`; the next tensor is read in a
        background thread while the method runs on this one), which the method receives
        as a :class:`~hf_vitmerge.methods._stack.TensorStack` (a ``list[Tensor]``). Returns
        ``{key: merged tensor}``; with ``sink``, each merged tensor is passed to ``sink(key, tensor)``
        as soon as it is produced (and must be copied there: its memory may be reused) and the
        returned dict is empty, so the merged tensors are never held twice.
        """
        from .methods._stack import TensorStack
        from .streaming import StackBuffers, StreamReader, file_order

        readers = [StreamReader(s) for s in self.sources]
        base_reader = StreamReader(self.base) if self.base is not None else None
        weights = [m.weight for m in self.config.models]
        if (
            any(w is not None for w in weights)
            and "weights" in spec.defaults
            and params.get("weights") is None
        ):
            params = {**params, "weights": [1.0 if w is None else w for w in weights]}
        out: dict[str, torch.Tensor] = {}
        ordered = file_order(keys, readers[0])
        shapes = {key: readers[0].shape(key) for key in ordered}
        largest = max((_numel(s) for s in shapes.values()), default=0)
        # two buffer sets: the next tensor is read (in a thread; preadv releases the GIL) while
        # the method works on this one
        buffers = [StackBuffers(len(readers)), StackBuffers(len(readers))]
        for b in buffers:
            b.reserve(largest)

        def read(i: int):
            key = ordered[i]
            stack, base = buffers[i % 2].views(shapes[key])
            for reader, row in zip(readers, stack, strict=True):
                reader.read_into(key, row)
            if base_reader is None or key not in base_reader or base_reader.shape(key) != shapes[key]:
                base = None
            else:
                base_reader.read_into(key, base)
            return stack, base

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_vitmerge-read")
        try:
            pending = pool.submit(read, 0) if ordered else None
            for i, key in enumerate(tqdm(ordered, desc=f"{spec.name}", disable=self.quiet, unit="tensor")):
                stack, base = pending.result()
                pending = pool.submit(read, i + 1) if i + 1 < len(ordered) else None
                if spec.needs_base and base is None:
                    raise ValueError(f"{spec.name}: the base model has no tensor {key} of matching shape")
                merged = spec.fn(TensorStack(stack), base, key=key, generator=self.generator(key), **params)
                if sink is not None:
                    sink(key, merged)
                else:
                    out[key] = merged.clone() if buffers[i % 2].owns(merged) else merged.contiguous()
                del merged, stack, base
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            for r in readers + ([base_reader] if base_reader else []):
                r.close()
        return out


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _task_names(config: MergeConfig, sources: list[ModelSource]) -> list[str]:
    """Explicit ``task:`` names must be unique; names derived from folders get a suffix if repeated."""
    explicit = [e.task for e in config.models if e.task]
    dup = sorted({n for n in explicit if explicit.count(n) > 1})
    if dup:
        raise ConfigError(
            f"task names {dup} are used by more than one model; give each model a distinct `task:`"
        )
    names: list[str] = []
    for entry, src in zip(config.models, sources, strict=True):
        name = entry.task or Path(src.ref.rstrip("/")).name
        candidate, n = name, 2
        while candidate in names or (not entry.task and candidate in explicit):
            candidate, n = f"{name}-{n}", n + 1
        names.append(candidate)
    return names


def resolve_heads(mode: str, label_lists: list[list[str]]) -> str:
    same = all(labels == label_lists[0] for labels in label_lists)
    if mode == "auto":
        return "shared" if same else "union"
    if mode == "shared" and not same:
        raise ConfigError(
            "heads: shared needs every model to have the same labels (id2label), but they differ. "
            "Use `heads: union` or `heads: multi` for models with their own label spaces."
        )
    return mode


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


def prepare(config: MergeConfig | dict | str, quiet: bool = False) -> MergeContext:
    """Load config and models; no merging yet.

    Everything that can be known before the expensive work is checked here, cheapest first:
    the device, every data path, the models (config, weights present and finite, compatible),
    the heads, and, for methods that use data, each task's calibration split (columns, labels
    in range for its model).
    """
    from .arch import check_compatible
    from .checks import check_device

    config = load_config(config)
    check_device(config.device)
    for i, entry in enumerate(config.models):
        if entry.data is not None:
            check_data_path(entry.data.path, f"models.{i}.data.path")
    sources = [resolve_model(m.model, m.revision) for m in config.models]
    base = resolve_model(config.base_model, config.base_revision) if config.base_model else None
    _check_distinct(sources, base)
    check_compatible({s.ref: s.adapter for s in sources + ([base] if base else [])})
    names = _task_names(config, sources)
    for s, n in zip(sources, names, strict=True):
        s.name = n
    heads_mode = resolve_heads(config.heads, [s.labels for s in sources])
    ctx = MergeContext(
        config=config, sources=sources, base=base, task_names=names, heads_mode=heads_mode, quiet=quiet
    )
    if _needs_data(config):
        for i, entry in enumerate(config.models):
            if entry.data is not None:
                ctx.calibration_data(i)  # cached on the context; fails here, not mid-merge
    return ctx


def _needs_data(config: MergeConfig) -> bool:
    names = [config.method] + [g.method for g in (config.groups or {}).values()]
    return any(get_method(n).needs_data for n in names if n != "per_group")


def _check_distinct(sources: list[ModelSource], base: ModelSource | None) -> None:
    """The same folder (or Hub snapshot) twice, under two spellings, is one model merged with itself."""
    seen: dict[Path, str] = {}
    for s in sources:
        key = s.path.resolve()
        if key in seen:
            raise InputError(
                f"models {seen[key]!r} and {s.ref!r} are the same model ({key}); list each model once"
            )
        seen[key] = s.ref
    if base is not None and base.path.resolve() in seen:
        raise InputError(
            f"base_model {base.ref!r} is also listed as a model to merge ({seen[base.path.resolve()]!r}); "
            "the base model is the pre-trained starting point, not one of the fine-tuned inputs"
        )


def execute(ctx: MergeContext) -> tuple[torch.nn.Module, dict]:
    """Run the configured method and assemble the merged model. Returns (model, info)."""
    config = ctx.config
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    if config.groups:
        from .methods.per_group import merge_per_group

        result = merge_per_group(ctx)
    else:
        spec = get_method(config.method)
        params = spec.validate_params(config.parameters)
        result = tensorwise_result(ctx, spec, params) if spec.kind == "tensorwise" else spec.fn(ctx, **params)
    info = dict(result.info)
    info.setdefault(
        "merge_seconds", round(time.perf_counter() - start - ctx.timings.get("stats_seconds", 0.0), 3)
    )
    info.update(ctx.timings)
    model = result.model if result.model is not None else assemble(ctx, result)
    model.eval()
    ctx.release_models()
    return model, info


def tensorwise_result(ctx: MergeContext, spec: MethodSpec, params: dict) -> MergeResult:
    """Apply a tensorwise method to the backbone and, for shared labels, to the classifier.

    The merged model is allocated first and every merged tensor is copied into it as soon as it
    is produced, so a merge holds one model plus one tensor's working set."""
    adapter = ctx.adapter
    keys = list(adapter.backbone_keys)
    info: dict = {}
    head_keys = adapter.classifier_keys
    merge_head = ctx.heads_mode == "shared" and bool(head_keys)
    if merge_head and ctx.base is not None and spec.needs_base:
        base_labels = ctx.base.adapter.num_labels
        if base_labels != adapter.num_labels:
            merge_head = False
            info["head_note"] = "base model has another label space: classifier heads were averaged"
    model = empty_merged_model(ctx)
    target = ViTAdapter.from_model(model)
    canonical = {k: k for k in keys}
    if merge_head:
        w, b = target.key("classifier", "weight"), target.key("classifier", "bias")
        canonical.update(zip(head_keys, (w, b), strict=True))

    @torch.no_grad()
    def write(key: str, tensor: torch.Tensor) -> None:
        target.parameter(model, canonical[key]).copy_(tensor)

    ctx.run_tensorwise(spec, params, keys + (head_keys if merge_head else []), sink=write)
    result = MergeResult(info=info)
    if not merge_head:
        result.heads = read_heads(ctx.sources)
    _fill_heads(ctx, model, result)
    result.model = model
    return result


def read_heads(sources: Sequence[ModelSource]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    heads = []
    for s in sources:
        reader = s.tensors()
        w, b = (reader.get(k).to(torch.float32) for k in s.adapter.classifier_keys)
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


def empty_merged_model(ctx: MergeContext) -> torch.nn.Module:
    """The merged ``PreTrainedModel`` (labels and heads per ``ctx.heads_mode``), allocated but not filled."""
    from transformers import ViTConfig, ViTForImageClassification

    from .modeling import ViTMultiHeadConfig, ViTMultiHeadForImageClassification

    cfg = merged_config_dict(ctx)
    mode = ctx.heads_mode
    labels = ctx.label_lists[0] if mode == "shared" else union_labels(ctx.task_names, ctx.label_lists)
    id2label = dict(enumerate(labels))
    label2id = {v: k for k, v in id2label.items()}
    if mode == "multi":
        config = ViTMultiHeadConfig(
            **cfg,
            id2label=id2label,
            label2id=label2id,
            task_names=ctx.task_names,
            task_num_labels=[len(x) for x in ctx.label_lists],
        )
        return _empty_model(ViTMultiHeadForImageClassification, config)
    config = ViTConfig(**cfg, id2label=id2label, label2id=label2id)
    return _empty_model(ViTForImageClassification, config)


def _head(ctx: MergeContext, result: MergeResult) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The single classifier of a shared/union model (None when a merged one is already in place)."""
    if ctx.heads_mode == "shared":
        if result.shared_head is not None or result.heads is None:
            return result.shared_head
        return (
            torch.stack([h[0] for h in result.heads]).mean(0),
            torch.stack([h[1] for h in result.heads]).mean(0),
        )
    return torch.cat([h[0] for h in result.heads]), torch.cat([h[1] for h in result.heads])


@torch.no_grad()
def _fill_heads(ctx: MergeContext, model: torch.nn.Module, result: MergeResult) -> None:
    """Copy the classifier(s) of ``result`` into ``model``."""
    if ctx.heads_mode == "multi":
        for lin, (w, b) in zip(model.heads, result.heads, strict=True):
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        return
    head = _head(ctx, result)
    if head is not None:
        model.classifier.weight.copy_(head[0])
        model.classifier.bias.copy_(head[1])


def assemble(ctx: MergeContext, result: MergeResult) -> torch.nn.Module:
    """Build the merged ``PreTrainedModel`` from canonical tensors and heads."""
    model = empty_merged_model(ctx)
    adapter = ViTAdapter.from_model(model)
    tensors = dict(result.backbone)
    if ctx.heads_mode != "multi":
        w, b = adapter.key("classifier", "weight"), adapter.key("classifier", "bias")
        tensors[w], tensors[b] = _head(ctx, result)
    adapter.load_state_dict(model, tensors)
    if ctx.heads_mode == "multi":
        _fill_heads(ctx, model, result)
    return model


def _empty_model(cls, config) -> torch.nn.Module:
    """Instantiate without random initialisation (every tensor is overwritten by the merge)."""
    with torch.device("meta"):
        model = cls(config)
    return model.to_empty(device="cpu")


def merge(
    models: Sequence[str | os.PathLike] | MergeConfig | dict | str | os.PathLike,
    method: str = "average",
    *,
    base_model: str | None = None,
    revisions: Sequence[str | None] | None = None,
    tasks: Sequence[str] | None = None,
    data: Sequence[dict | str | None] | None = None,
    heads: str = "auto",
    seed: int = 0,
    device: str = "cpu",
    calibration: dict | None = None,
    out_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    **parameters,
) -> PreTrainedModel:
    """Merge ViTs and return the merged model, a ``transformers.PreTrainedModel``.

    ``models`` is a list of at least two Hub ids / folders, or a whole config (dict, YAML
    path, ``MergeConfig``), in which case the other merge arguments are ignored. Method
    parameters are keyword arguments, e.g. ``merge(ids, "task_arithmetic", base_model=b,
    scaling=0.4)``. ``revisions``, ``tasks`` and ``data`` are lists parallel to ``models``.

    With ``out_dir`` the complete model folder is written too, atomically (weights, config,
    image processor, ``merge_config.yaml`` and the model card), ready for
    ``pipeline("image-classification", model=out_dir)``; an existing non-empty folder is
    refused unless ``overwrite``. The input models are released when the merge is done; the
    result carries only ``merge_info`` (timings and method facts).
    """
    config = _merge_config(
        models, method, base_model, revisions, tasks, data, heads, seed, device, calibration, parameters
    )
    if out_dir is None:
        ctx = prepare(config, quiet=quiet)
        model, info = execute(ctx)
    else:
        from .api import run_merge

        run = run_merge(config, out_dir, overwrite=overwrite, quiet=quiet)
        model, info = run.model, run.info
    model.merge_info = info
    return model


def _merge_config(
    models, method, base_model, revisions, tasks, data, heads, seed, device, calibration, parameters
):
    """The validated config of a ``merge()`` call (argument errors name the argument)."""
    if isinstance(models, (MergeConfig, dict)) or (
        isinstance(models, (str, os.PathLike)) and str(models).endswith((".yaml", ".yml"))
    ):
        return load_config(models)
    if isinstance(models, (str, os.PathLike)):
        raise InputError(
            f"merge(models=...) got the single string {str(models)!r}: pass a list of at least two model ids "
            f"or folders, e.g. merge([{str(models)!r}, 'other/model'], ...), or a config (YAML path, dict)"
        )
    if not isinstance(models, Sequence):
        raise InputError(
            f"merge(models=...) must be a list of model ids or folders, got {type(models).__name__}"
        )
    models = list(models)
    if len(models) < 2:
        raise InputError(f"merge() needs at least two models to merge, got {len(models)}: {models}")
    for name, values in (("revisions", revisions), ("tasks", tasks), ("data", data)):
        if values is None:
            continue
        if isinstance(values, (str, os.PathLike, dict)) or not isinstance(values, Sequence):
            raise InputError(f"merge({name}=...) must be a list with one entry per model, got {values!r}")
        if len(values) != len(models):
            raise InputError(
                f"merge() got {len(values)} {name} for {len(models)} models: give one per model "
                f"(None where there is none)"
            )
    entries = []
    for i, ref in enumerate(models):
        entry: dict = {"model": str(ref)}
        if revisions is not None:
            entry["revision"] = revisions[i]
        if tasks is not None:
            entry["task"] = tasks[i]
        if data is not None and data[i] is not None:
            entry["data"] = {"path": str(data[i])} if isinstance(data[i], (str, os.PathLike)) else data[i]
        entries.append(entry)
    return load_config(
        {
            "method": method,
            "base_model": base_model,
            "models": entries,
            "parameters": parameters,
            "heads": heads,
            "seed": seed,
            "device": device,
            "calibration": calibration or {},
        }
    )
