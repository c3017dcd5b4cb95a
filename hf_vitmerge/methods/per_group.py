"""Per-layer-group recipes: a different merge method (and parameters) for each kind of layer.

A config's ``groups:`` maps ``embeddings``, ``attention``, ``mlp``, ``norm`` and ``head`` to
``{method, parameters}``; the top-level ``method``/``parameters`` are the default for groups not
listed (``method: per_group`` means "no default": every group present must then be listed).
Groups follow ``ViTAdapter`` kinds: ``norm`` is every LayerNorm (both per block and the final one).

* tensorwise methods stream only their group's keys (``MergeContext.run_tensorwise``);
* model-level methods run once per distinct recipe, and each group takes its own keys from the
  returned backbone. A method that builds its own model (gated, partial zip) cannot be one
  group's recipe, and nor can one that changes the residual basis (alignment: its heads differ
  from the inputs' heads) unless it is the recipe of every backbone group.
* heads: with ``heads: shared`` the classifier is merged by the ``head`` recipe; otherwise every
  model keeps its own head (union / multi-head assembly) and a ``head`` recipe is ignored (noted in
  the info).

The merged model's ``merge_info["per_group"]`` says which method produced which group.
"""

from __future__ import annotations

import torch

from ..arch import KINDS
from ..errors import ConfigError
from .base import MergeContext, MergeResult, read_heads
from .registry import MethodSpec, get_method

BACKBONE_KINDS = tuple(k for k in KINDS if k != "head")


def _recipes(ctx: MergeContext) -> dict[str, tuple[MethodSpec, dict]]:
    """Validated ``(spec, params)`` per group kind that this model has."""
    config = ctx.config
    groups = config.groups or {}
    default = None
    if config.method != "per_group":
        spec = get_method(config.method)
        default = (spec, spec.validate_params(config.parameters))
    elif config.parameters:
        raise ConfigError(
            "parameters: with `method: per_group` there is no default method to take them; "
            "put parameters under each `groups.<group>.parameters`"
        )
    needed = [k for k in BACKBONE_KINDS if ctx.adapter.keys_of_kind(k)]
    if ctx.heads_mode == "shared" and ctx.adapter.classifier_keys:
        needed.append("head")
    out: dict[str, tuple[MethodSpec, dict]] = {}
    missing = []
    for kind in needed:
        if kind in groups:
            spec = get_method(groups[kind].method)
            try:
                out[kind] = (spec, spec.validate_params(groups[kind].parameters))
            except ValueError as err:
                raise ConfigError(f"groups.{kind}: {err}") from None
        elif default is not None:
            out[kind] = default
        else:
            missing.append(kind)
    if missing:
        raise ConfigError(
            f"groups: `method: per_group` has no default, so every group needs a recipe; missing {missing}. "
            "List them under `groups:` or set a top-level `method:` as the default."
        )
    return out


def _recipe_id(spec: MethodSpec, params: dict) -> str:
    return f"{spec.name}{sorted(params.items())!r}"


def _same_heads(
    a: list[tuple[torch.Tensor, torch.Tensor]], b: list[tuple[torch.Tensor, torch.Tensor]]
) -> bool:
    return len(a) == len(b) and all(
        wa.shape == wb.shape and torch.allclose(wa, wb) and torch.allclose(ba, bb)
        for (wa, ba), (wb, bb) in zip(a, b, strict=True)
    )


def merge_per_group(ctx: MergeContext) -> MergeResult:
    """Merge each layer group with its own recipe and combine the pieces (see module docstring)."""
    recipes = _recipes(ctx)
    info = _recipe_info(ctx, recipes)
    model_results = _run_model_recipes(ctx, recipes, info)
    own_heads = read_heads(ctx.sources)
    _check_one_basis(recipes, model_results, own_heads)
    result = MergeResult(backbone=_merge_backbone(ctx, recipes, model_results), info=info)
    if "head" not in recipes:
        # each model's own head; a single basis-changing model-level method supplies heads in its basis
        backbone_rids = {_recipe_id(*recipes[k]) for k in recipes if k != "head"}
        heads = own_heads
        if len(backbone_rids) == 1 and next(iter(backbone_rids)) in model_results:
            heads = model_results[next(iter(backbone_rids))].heads or own_heads
        result.heads = heads
        return result
    _merge_head(ctx, recipes["head"], model_results, own_heads, result)
    return result


def _recipe_info(ctx: MergeContext, recipes: dict) -> dict:
    """What the card records: each group's method and parameters, and how heads were treated."""
    info: dict = {
        "per_group": {
            kind: {"method": spec.name, "parameters": params} for kind, (spec, params) in recipes.items()
        }
    }
    if ctx.heads_mode != "shared":
        info["per_group"]["head"] = {"method": f"own heads (heads: {ctx.heads_mode})", "parameters": {}}
        if ctx.config.groups and "head" in ctx.config.groups:
            info["head_note"] = (
                f"groups.head ignored: with heads: {ctx.heads_mode} each model keeps its own head"
            )
    return info


def _run_model_recipes(ctx: MergeContext, recipes: dict, info: dict) -> dict[str, MergeResult]:
    """Run each distinct model-level recipe once; they must return backbone tensors."""
    model_results: dict[str, MergeResult] = {}
    for kind, (spec, params) in recipes.items():
        rid = _recipe_id(spec, params)
        if spec.kind == "model" and rid not in model_results:
            result = spec.fn(ctx, **params)
            if result.model is not None or result.backbone is None:
                raise ConfigError(
                    f"groups.{kind}: method {spec.name!r} builds a complete custom model and cannot merge "
                    "one layer group; use it as the only method"
                )
            model_results[rid] = result
            if result.info:
                info.setdefault("group_info", {})[spec.name] = result.info
    return model_results


def _check_one_basis(recipes: dict, model_results: dict[str, MergeResult], own_heads) -> None:
    """Refuse to combine a basis-changing (aligning) method's groups with other methods' groups."""
    all_rids = {_recipe_id(*r) for r in recipes.values()}
    for rid, result in model_results.items():
        if result.heads is not None and not _same_heads(result.heads, own_heads) and len(all_rids) > 1:
            name = rid.split("[", 1)[0]
            raise ConfigError(
                f"method {name!r} changes the models' residual basis (its heads differ from the inputs' heads), "
                "so its groups cannot be combined with groups merged by other methods"
            )


def _merge_backbone(ctx: MergeContext, recipes: dict, model_results: dict[str, MergeResult]) -> dict:
    """Every backbone group's tensors, from its tensorwise method or its model-level result."""
    backbone: dict[str, torch.Tensor] = {}
    for kind in BACKBONE_KINDS:
        if kind not in recipes:
            continue
        spec, params = recipes[kind]
        keys = ctx.adapter.keys_of_kind(kind)
        if spec.kind == "tensorwise":
            backbone.update(ctx.run_tensorwise(spec, params, keys))
        else:
            merged = model_results[_recipe_id(spec, params)].backbone
            absent = [k for k in keys if k not in merged]
            if absent:
                raise ValueError(f"groups.{kind}: method {spec.name!r} returned no tensor for {absent[:3]}")
            backbone.update({k: merged[k] for k in keys})
    return backbone


def _merge_head(ctx: MergeContext, recipe, model_results, own_heads, result: MergeResult) -> None:
    """The classifier under ``groups.head``: a shared merged head, or the heads for assembly."""
    spec, params = recipe
    adapter = ctx.adapter
    if spec.kind == "model":
        merged = model_results[_recipe_id(spec, params)]
        if merged.shared_head is not None:
            result.shared_head = merged.shared_head
        else:
            result.heads = merged.heads or own_heads  # assemble averages them for a shared head
        return
    if spec.needs_base and ctx.base is not None and ctx.base.adapter.num_labels != adapter.num_labels:
        result.info["head_note"] = (
            f"groups.head: base model has another label space, so {spec.name!r} cannot merge the "
            "classifier: heads were averaged"
        )
        result.info["per_group"]["head"] = {"method": "average (fallback)", "parameters": {}}
        result.heads = own_heads
        return
    head_keys = adapter.classifier_keys
    merged_head = ctx.run_tensorwise(spec, params, head_keys)
    result.shared_head = (merged_head[head_keys[0]], merged_head[head_keys[1]])
