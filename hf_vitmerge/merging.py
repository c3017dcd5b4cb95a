"""The merge pipeline: load and validate models -> (statistics) -> merge maths -> assemble.

``merge()`` is the Python entry point; ``run_merge()`` (in :mod:`hf_vitmerge.api`) adds
evaluation, the model card, atomic saving and ``push_to_hub``.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .arch import ViTAdapter
from .autotune import auto_names, resolve_auto
from .config import MergeConfig, load_config
from .data import TaskData, load_task_data
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

    def generator(self, key: str = "") -> torch.Generator:
        """A generator seeded by the merge seed and a name, independent of call order."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(key.encode()))

    def calibration_data(self, index: int, split: str | None = None) -> TaskData:
        """Calibration data of model ``index`` (``samples_per_task`` examples, seeded)."""
        entry = self.config.models[index].data
        if entry is None:
            raise ValueError(
                f"method {self.config.method!r} needs calibration data, but model "
                f"{self.sources[index].ref!r} has no `data:` entry in the config. Add one per model."
            )
        cache_key = (index, split or entry.split)
        if cache_key not in self._data:
            data = load_task_data(
                entry.path,
                split or entry.split,
                image_column=entry.image_column,
                label_column=entry.label_column,
                revision=entry.revision,
            )
            self._data[cache_key] = data.subset(self.config.calibration.samples_per_task, seed=self.seed)
        return self._data[cache_key]

    def run_tensorwise(self, spec: MethodSpec, params: dict, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Stream ``keys`` from every input's weight files through a tensorwise method."""
        readers = [s.tensors() for s in self.sources]
        base_reader = self.base.tensors() if self.base is not None else None
        weights = [m.weight for m in self.config.models]
        if (
            any(w is not None for w in weights)
            and "weights" in spec.defaults
            and params.get("weights") is None
        ):
            params = {**params, "weights": [1.0 if w is None else w for w in weights]}
        out: dict[str, torch.Tensor] = {}
        for key in tqdm(keys, desc=f"{spec.name}", disable=self.quiet, unit="tensor"):
            tensors = [r.get(key).to(torch.float32) for r in readers]
            base = None
            if base_reader is not None and key in base_reader:
                base = base_reader.get(key).to(torch.float32)
                if base.shape != tensors[0].shape:
                    base = None
            if spec.needs_base and base is None:
                raise ValueError(f"{spec.name}: the base model has no tensor {key} of matching shape")
            merged = spec.fn(
                tensors, base, key=key, param=self.adapter.info(key), generator=self.generator(key), **params
            )
            out[key] = merged.contiguous()
            del tensors, base
        for r in readers + ([base_reader] if base_reader else []):
            r.close()
        return out


def _task_names(config: MergeConfig, sources: list[ModelSource]) -> list[str]:
    """Explicit ``task:`` names must be unique; names derived from folders get a suffix if repeated."""
    explicit = [e.task for e in config.models if e.task]
    dup = sorted({n for n in explicit if explicit.count(n) > 1})
    if dup:
        raise ValueError(
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
        raise ValueError(
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
    """Load config and models; no merging yet."""
    config = load_config(config)
    from .arch import check_compatible

    sources = [resolve_model(m.model, m.revision) for m in config.models]
    base = resolve_model(config.base_model, config.base_revision) if config.base_model else None
    check_compatible({s.ref: s.adapter for s in sources + ([base] if base else [])})
    names = _task_names(config, sources)
    for s, n in zip(sources, names, strict=True):
        s.name = n
    heads_mode = resolve_heads(config.heads, [s.labels for s in sources])
    return MergeContext(
        config=config, sources=sources, base=base, task_names=names, heads_mode=heads_mode, quiet=quiet
    )


def execute(ctx: MergeContext) -> tuple[torch.nn.Module, dict]:
    """Run the configured method and assemble the merged model. Returns (model, info)."""
    config = ctx.config
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    auto = None
    if config.groups:
        from .methods.per_group import merge_per_group

        result = merge_per_group(ctx)
    else:
        spec = get_method(config.method)
        params = spec.validate_params(config.parameters)
        if auto_names(params):
            params, auto = resolve_auto(ctx, spec, params, lambda p: _build(ctx, spec, p))
            ctx.config = config = config.model_copy(
                update={"parameters": {**config.parameters, **auto["chosen"]}}
            )
        result = _run_method(ctx, spec, params)
    info = dict(result.info)
    if auto is not None:
        info["auto"] = auto  # the search record (model card); the chosen values are in the config
        info["auto_seconds"] = auto["seconds"]
    info.setdefault(
        "merge_seconds", round(time.perf_counter() - start - ctx.timings.get("stats_seconds", 0.0), 3)
    )
    info.update(ctx.timings)
    model = result.model if result.model is not None else assemble(ctx, result)
    model.eval()
    return model, info


def _run_method(ctx: MergeContext, spec: MethodSpec, params: dict) -> MergeResult:
    return tensorwise_result(ctx, spec, params) if spec.kind == "tensorwise" else spec.fn(ctx, **params)


def _build(ctx: MergeContext, spec: MethodSpec, params: dict) -> torch.nn.Module:
    """Merge with concrete ``params`` and assemble the model (used to score ``auto`` candidates)."""
    result = _run_method(ctx, spec, params)
    model = result.model if result.model is not None else assemble(ctx, result)
    return model.eval()


def tensorwise_result(ctx: MergeContext, spec: MethodSpec, params: dict) -> MergeResult:
    """Apply a tensorwise method to the backbone and, for shared labels, to the classifier."""
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
    merged = ctx.run_tensorwise(spec, params, keys + (head_keys if merge_head else []))
    result = MergeResult(backbone={k: merged[k] for k in keys}, info=info)
    if merge_head:
        result.shared_head = (merged[head_keys[0]], merged[head_keys[1]])
    else:
        result.heads = read_heads(ctx.sources)
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


def assemble(ctx: MergeContext, result: MergeResult) -> torch.nn.Module:
    """Build the merged ``PreTrainedModel`` from canonical tensors and heads."""
    from transformers import ViTConfig, ViTForImageClassification

    from .modeling import ViTMultiHeadConfig, ViTMultiHeadForImageClassification

    cfg = merged_config_dict(ctx)
    mode = ctx.heads_mode
    if mode == "shared":
        labels = ctx.label_lists[0]
        if result.shared_head is not None:
            head = result.shared_head
        else:
            head = (
                torch.stack([h[0] for h in result.heads]).mean(0),
                torch.stack([h[1] for h in result.heads]).mean(0),
            )
    else:
        labels = union_labels(ctx.task_names, ctx.label_lists)
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
        model = _empty_model(ViTMultiHeadForImageClassification, config)
        backbone_adapter = ViTAdapter.from_model(model)
        backbone_adapter.load_state_dict(model, result.backbone)
        with torch.no_grad():
            for lin, (w, b) in zip(model.heads, result.heads, strict=True):
                lin.weight.copy_(w)
                lin.bias.copy_(b)
        return model
    config = ViTConfig(**cfg, id2label=id2label, label2id=label2id)
    model = _empty_model(ViTForImageClassification, config)
    if mode == "union":
        head = (torch.cat([h[0] for h in result.heads]), torch.cat([h[1] for h in result.heads]))
    adapter = ViTAdapter.from_model(model)
    tensors = dict(result.backbone)
    tensors[adapter.key("classifier", "weight")], tensors[adapter.key("classifier", "bias")] = head
    adapter.load_state_dict(model, tensors)
    return model


def _empty_model(cls, config) -> torch.nn.Module:
    """Instantiate without random initialisation (every tensor is overwritten by the merge)."""
    with torch.device("meta"):
        model = cls(config)
    return model.to_empty(device="cpu")


def merge(
    models: Sequence[str] | MergeConfig | dict | str,
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
    quiet: bool = False,
    **parameters,
) -> torch.nn.Module:
    """Merge ViTs and return the merged model (not saved).

    ``models`` is a list of Hub ids / folders, or a whole config (dict, YAML path,
    ``MergeConfig``), in which case the other arguments are ignored. Method parameters are
    passed as keyword arguments, e.g. ``merge(ids, "task_arithmetic", base_model=b, scaling=0.4)``.
    The returned model carries ``merge_info`` (timings and method facts).
    """
    if isinstance(models, (MergeConfig, dict)) or (
        isinstance(models, (str, Path)) and str(models).endswith((".yaml", ".yml"))
    ):
        config = load_config(models)
    else:
        entries = []
        for i, ref in enumerate(models):
            entry: dict = {"model": str(ref)}
            if revisions is not None:
                entry["revision"] = revisions[i]
            if tasks is not None:
                entry["task"] = tasks[i]
            if data is not None and data[i] is not None:
                entry["data"] = {"path": data[i]} if isinstance(data[i], str) else data[i]
            entries.append(entry)
        config = load_config(
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
    ctx = prepare(config, quiet=quiet)
    model, info = execute(ctx)
    model.merge_info = info
    model.merge_context = ctx
    return model
