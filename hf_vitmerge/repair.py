"""REPAIR for merged ViTs: restore the per-feature activation statistics that averaging loses.

Averaging matched features shrinks their spread (two features that are not perfectly
correlated average to a smaller standard deviation), so merged q/k/v/fc1 outputs have
0.6-0.8 of the originals' standard deviation, attention logits shrink and attention flattens.
ZipIt! resets BatchNorm statistics after every merge; REPAIR (Jordan et al., "REPAIR:
REnormalizing Permuted Activations for Interpolation Repair", ICLR 2023,
https://arxiv.org/abs/2211.08403) does the same for networks without BatchNorm by rescaling and
shifting each merged feature. A ViT has no BatchNorm to reset, so the correction is folded into
the producing ``nn.Linear``:

* targets: for every merged output feature ``j`` of q, k, v, o, fc1 and fc2 of a merged block,
  the matching-weighted average of the inputs' feature statistics,
  ``mu*_j = sum_m (M_m mu_m)_j`` and ``sigma*_j = sum_m (M_m sigma_m)_j`` (``M_m`` is the merge
  matrix of the feature's group: QK for q/k, VO for v, MLP for fc1, the residual for o/fc2),
  with ``mu_m``, ``sigma_m`` measured over every token of the calibration images;
* correction: ``y' = (y - mu_j) sigma*_j / sigma_j + mu*_j``, i.e. row ``j`` of the weight times
  ``s_j = sigma*_j / sigma_j`` and the bias ``s_j (b_j - mu_j) + mu*_j``;
* order: block by block, and within a block q/k/v, then o, then fc1, then fc2, each measured on
  the merged model with every earlier correction already applied, so after the pass every
  corrected feature has exactly its target mean and standard deviation on the calibration data.

The model keeps its class and parameter set (a plain ``ViTForImageClassification``, a
multi-head or a partial-zip model). For a pure permutation of a model with itself the targets
are the model's own statistics, so the model is left unchanged.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .arch import _BLOCK_MODULES, _get_path

# Output features repaired per block, in the order they can be corrected.
STAGES: tuple[tuple[str, ...], ...] = (("q", "k", "v"), ("o",), ("fc1",), ("fc2",))
ROLES: tuple[str, ...] = tuple(r for stage in STAGES for r in stage)
# role -> merge group (name prefix) whose merge matrix maps the inputs' features to the merged ones
GROUP_OF = {"q": "qk", "k": "qk", "v": "vo", "o": "residual", "fc1": "mlp", "fc2": "residual"}
_MIN_STD = 1e-8


class _Stop(Exception):
    """Raised by a hook once everything a pass needs has been captured (skips the rest of the model)."""


def block_module(block: nn.Module, role: str) -> nn.Linear:
    """The ``nn.Linear`` of ``role`` inside one transformer block (transformers 4.x or 5.x layout)."""
    for path in _BLOCK_MODULES[role]:
        mod = _get_path(block, path)
        if isinstance(mod, nn.Module):
            return mod
    raise KeyError(f"this block has no module for role {role!r}")


class _Moments:
    """Per-feature float64 sums over every token (mean and population std, nothing else kept)."""

    def __init__(self):
        self.n, self.s, self.ss = 0, None, None

    def add(self, y: torch.Tensor) -> None:
        f = y.detach().reshape(-1, y.shape[-1]).to(torch.float64)
        if self.s is None:
            self.s, self.ss = f.sum(0), (f * f).sum(0)
        else:
            self.s += f.sum(0)
            self.ss += (f * f).sum(0)
        self.n += f.shape[0]

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        mu = self.s / self.n
        var = (self.ss / self.n - mu * mu).clamp_min(0.0)
        return mu.cpu(), var.sqrt().cpu()


def _measure(
    forward: Callable[[torch.Tensor], object],
    batches: Sequence[torch.Tensor],
    modules: Mapping[tuple[str, int], nn.Module],
    stop_after: bool,
) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
    """Mean and std of every token's output of each module over ``batches``; with ``stop_after``
    the forward pass is cut once all the modules have fired (later layers are not run)."""
    moments = {k: _Moments() for k in modules}
    fired: set = set()

    def hook_for(key):
        def hook(_mod, _inp, out):
            moments[key].add(out[0] if isinstance(out, tuple) else out)
            fired.add(key)
            if stop_after and len(fired) == len(modules):
                raise _Stop

        return hook

    handles = [m.register_forward_hook(hook_for(k)) for k, m in modules.items()]
    try:
        with torch.inference_mode():
            for px in batches:
                fired.clear()
                with contextlib.suppress(_Stop):
                    forward(px)
    finally:
        for h in handles:
            h.remove()
    return {k: m.mean_std() for k, m in moments.items()}


def pixel_batches(ctx, processor, batch_size: int, device: str) -> list[torch.Tensor]:
    """The calibration images of every task (concatenated, task order), preprocessed once."""
    from .stats import _images

    out = []
    for i in range(len(ctx.sources)):
        data = ctx.calibration_data(i)
        for start in range(0, len(data), batch_size):
            images = _images(data, start, min(start + batch_size, len(data)))
            out.append(processor(images=images, return_tensors="pt")["pixel_values"].to(device))
    return out


def input_statistics(ctx, layers: Sequence[int], batch_size: int) -> list[dict]:
    """Every input model's per-feature mean/std of q, k, v, o, fc1 and fc2 outputs of ``layers``
    on the calibration images of all tasks (each model with its own processor)."""
    device = ctx.device
    out = []
    for source, model in zip(ctx.sources, ctx.models(), strict=True):
        adapter = source.adapter
        model.to(device).eval()
        batches = pixel_batches(ctx, source.image_processor(), batch_size, device)
        modules = {(r, i): adapter.module(model, r, i) for i in layers for r in ROLES}
        out.append(_measure(lambda px, model=model: model(pixel_values=px), batches, modules, False))
        model.to("cpu")
    return out


def repair_targets(
    stats: Sequence[Mapping], transforms: Mapping[str, tuple[list, list]], layers: Sequence[int]
) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
    """``(mu*, sigma*)`` of every merged feature: the merge-matrix-weighted average of the inputs'."""
    targets = {}
    for i in layers:
        for role in ROLES:
            group = GROUP_OF[role] if GROUP_OF[role] == "residual" else f"{GROUP_OF[role]}.{i}"
            ms = transforms[group][0]
            mu = sum(m.to(torch.float64) @ st[(role, i)][0] for m, st in zip(ms, stats, strict=True))
            sd = sum(m.to(torch.float64) @ st[(role, i)][1] for m, st in zip(ms, stats, strict=True))
            targets[(role, i)] = (mu, sd)
    return targets


@torch.no_grad()
def _fold(linear: nn.Linear, mu: torch.Tensor, sd: torch.Tensor, t_mu: torch.Tensor, t_sd: torch.Tensor):
    """Fold ``y' = (y - mu) * t_sd / sd + t_mu`` into the linear layer; returns the scales."""
    ok = sd > _MIN_STD
    scale = torch.where(ok, t_sd / torch.where(ok, sd, torch.ones_like(sd)), torch.ones_like(sd))
    w = linear.weight.to(torch.float64) * scale[:, None].to(linear.weight.device)
    bias = linear.bias.to(torch.float64) if linear.bias is not None else torch.zeros_like(mu)
    b = scale.to(bias.device) * (bias - mu.to(bias.device)) + t_mu.to(bias.device)
    linear.weight.copy_(w.to(linear.weight.dtype))
    if linear.bias is None:
        raise ValueError("repair needs a bias on every repaired linear layer (ViT's have one)")
    linear.bias.copy_(b.to(linear.bias.dtype))
    return scale


def repair_blocks(
    forward: Callable[[torch.Tensor], object],
    blocks: Sequence[nn.Module],
    layers: Sequence[int],
    targets: Mapping[tuple[str, int], tuple[torch.Tensor, torch.Tensor]],
    batches: Sequence[torch.Tensor],
) -> dict:
    """Correct the merged ``blocks`` (``blocks[k]`` is block ``layers[k]``) stage by stage so each
    repaired output matches its target statistics; ``forward(pixels)`` runs the merged model."""
    scales = []
    for block, i in zip(blocks, layers, strict=True):
        for stage in STAGES:
            modules = {(r, i): block_module(block, r) for r in stage}
            current = _measure(forward, batches, modules, True)
            for key, mod in modules.items():
                scales.append(_fold(mod, *current[key], *targets[key]))
    scale = torch.cat(scales) if scales else torch.ones(1)
    return {
        "repair_scale_median": round(float(scale.median()), 4),
        "repair_scale_min": round(float(scale.min()), 4),
        "repair_scale_max": round(float(scale.max()), 4),
    }


def repair_model(ctx, model: nn.Module, transforms: Mapping, stop: int | None = None) -> dict:
    """REPAIR a merged model in place (full merge, or the trunk of a partial zip stopping at
    ``stop``); returns facts for the card (timing, scale range)."""
    start = time.perf_counter()
    batch_size = ctx.config.calibration.batch_size
    device = ctx.device
    if stop is None:
        from .arch import ViTAdapter

        adapter = ViTAdapter.from_model(model)
        layers = list(range(adapter.spec.num_layers))
        blocks = [adapter.block(model, i) for i in layers]
    else:
        layers = list(range(stop))
        blocks = list(model.trunk.layers)
    info: dict = {}
    batches = pixel_batches(ctx, ctx.sources[0].image_processor(), batch_size, device)
    if layers:
        stats = input_statistics(ctx, layers, batch_size)
        targets = repair_targets(stats, transforms, layers)
        model.to(device).eval()
        info.update(repair_blocks(lambda px: model(pixel_values=px), blocks, layers, targets, batches))
    if stop is not None:
        info.update(refit_unmerge(ctx, model, stop, batch_size, batches))
    model.to("cpu")
    return {"repair": True, **info, "repair_seconds": round(time.perf_counter() - start, 3)}


def _split_point(adapter, model: nn.Module, stop: int) -> nn.Module:
    """The module whose input is a model's residual stream after ``stop`` blocks."""
    if stop < adapter.spec.num_layers:
        return adapter.block(model, stop)
    return adapter.module(model, "final_ln")


def _capture_inputs(forward, batches, module: nn.Module) -> torch.Tensor:
    """Every token's input to ``module`` over ``batches`` (``[tokens, d]``, float64, CPU); the
    forward pass is cut right after."""
    rows = []

    def hook(_mod, inputs):
        rows.append(inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64).cpu())
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.inference_mode():
            for px in batches:
                with contextlib.suppress(_Stop):
                    forward(px)
    finally:
        handle.remove()
    return torch.cat(rows)


def refit_unmerge(ctx, model: nn.Module, stop: int, batch_size: int, batches, ridge: float = 1e-9) -> dict:
    """Refit a partial zip's residual unmerges by least squares: ``U_m = argmin E||x_m - U x*||^2``
    over every token of the calibration images, where ``x*`` is the merged trunk's output and
    ``x_m`` model ``m``'s own residual after ``stop`` blocks (ridge ``ridge * mean diag``). The
    zip's 0/1 unmerge ignores that the merged features are averages; this is its best linear
    replacement (the layer has no bias, so the fit is uncentred)."""
    device = ctx.device
    model.to(device).eval()
    merged = _capture_inputs(lambda px: model(pixel_values=px), batches, model.tails[0].unmerge)
    gram = merged.T @ merged
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    errors = []
    for m, (source, original) in enumerate(zip(ctx.sources, ctx.models(), strict=True)):
        original.to(device).eval()
        own = pixel_batches(ctx, source.image_processor(), batch_size, device)
        target = _capture_inputs(
            lambda px, o=original: o(pixel_values=px), own, _split_point(source.adapter, original, stop)
        )
        original.to("cpu")
        u = torch.linalg.solve(gram, merged.T @ target).T  # [d, d]: x_m ~ U x*
        unmerge = model.tails[m].unmerge
        before = (merged @ unmerge.weight.detach().to(torch.float64).cpu().T - target).pow(2).mean()
        with torch.no_grad():
            unmerge.weight.copy_(u.to(unmerge.weight.dtype))
        after = (merged @ u.T - target).pow(2).mean()
        errors.append((float(before), float(after), float(target.pow(2).mean())))
    return {
        "unmerge_refit": "least squares",
        "unmerge_rel_error_before": round(sum(e[0] / e[2] for e in errors) / len(errors), 4),
        "unmerge_rel_error_after": round(sum(e[1] / e[2] for e in errors) / len(errors), 4),
    }
