"""The merge pipeline: load and validate models -> (statistics) -> merge maths -> assemble.

``merge()`` is the Python entry point; ``run_merge()`` (in :mod:`hf_vitmerge.api`) adds
evaluation, the model card, atomic saving and ``push_to_hub``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .arch import ViTAdapter
from .assembly import assemble, empty_merged_model, fill_heads
from .autotune import auto_names, resolve_auto
from .config import MergeConfig, load_config
from .data import check_data_path
from .errors import ConfigError, InputError
from .loading import ModelSource, resolve_model
from .methods import MethodSpec, get_method
from .methods.base import MergeContext, MergeResult, merged_config_dict, read_heads, union_labels

__all__ = [
    "MergeContext",
    "MergeResult",
    "assemble",
    "execute",
    "merged_config_dict",
    "prepare",
    "read_heads",
    "resolve_heads",
    "tensorwise_result",
    "union_labels",
]


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
    # a tensorwise merge checks what it produces (a NaN/inf in a merged tensor names the input it
    # came from, see MergeContext.run_tensorwise), so its inputs are read once; other methods have
    # their weights checked here, before any work
    check = not _streams_every_tensor(config)
    sources = [resolve_model(m.model, m.revision, check_finite=check) for m in config.models]
    base = (
        resolve_model(config.base_model, config.base_revision, check_finite=check)
        if config.base_model
        else None
    )
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


def _streams_every_tensor(config: MergeConfig) -> bool:
    """Whether the merge reads its inputs only through the streaming engine, which checks every
    merged tensor for NaN/inf and names the input behind one (classifiers it does not merge are
    checked as they are read)."""
    return config.groups is None and get_method(config.method).kind == "tensorwise"


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
    auto = None
    if config.groups:
        from .methods.per_group import merge_per_group

        result = merge_per_group(ctx)
    else:
        spec = get_method(config.method)
        params = spec.validate_params(config.parameters)
        if auto_names(params, spec):
            params, auto = resolve_auto(ctx, spec, params, lambda p: _build(ctx, spec, p))
            ctx.config = config = config.model_copy(
                update={"parameters": {**config.parameters, **auto["chosen"]}}
            )
        # parameters whose default depends on others or on the models: record the values used
        resolved = spec.resolved(params, ctx.setting())
        changed = {k: v for k, v in resolved.items() if v != params[k]}
        if changed:
            params = resolved
            ctx.config = config = config.model_copy(update={"parameters": {**config.parameters, **changed}})
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
    if config.heal is not None:
        from .heal import heal_model

        info.update(heal_model(ctx, model, config.heal))
    model.eval()
    ctx.release_models()
    return model, info


def _run_method(ctx: MergeContext, spec: MethodSpec, params: dict) -> MergeResult:
    return tensorwise_result(ctx, spec, params) if spec.kind == "tensorwise" else spec.fn(ctx, **params)


def _build(ctx: MergeContext, spec: MethodSpec, params: dict) -> torch.nn.Module:
    """Merge with concrete ``params`` and assemble the model (used to score ``auto`` candidates)."""
    result = _run_method(ctx, spec, params)
    model = result.model if result.model is not None else assemble(ctx, result)
    return model.eval()


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
        param = target.parameter(model, canonical[key])
        if tensor.shape == param.shape and tensor.dtype == param.dtype:
            param.data = tensor  # the engine's tensor is the merged model's own: no copy
        else:
            param.copy_(tensor)

    ctx.run_tensorwise(spec, params, keys + (head_keys if merge_head else []), sink=write)
    result = MergeResult(info=info)
    if not merge_head:
        result.heads = read_heads(ctx.sources)
    fill_heads(ctx, model, result)
    result.model = model
    return result
