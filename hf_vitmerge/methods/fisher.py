"""Fisher merging (Matena & Raffel, "Merging Models with Fisher-Weighted Averaging",
NeurIPS 2022, https://arxiv.org/abs/2111.09832).

Each model's parameters are weighted by its diagonal Fisher information, estimated on that
model's own calibration data:

    F_m = E_x E_{y ~ p_m(y|x)} [ (d/d theta log p_m(y|x; theta_m))^2 ]
    theta = sum_m F_m * theta_m / sum_m F_m          (F_m floored at ``fisher_floor``)

Details, and where they differ from the released code (github.com/mmatena/model_merging):

* Gradients are per example (``torch.func.vmap`` over ``grad``), squared and accumulated in
  float64, then divided by the number of examples.
* ``fisher_labels: sampled`` (default) draws one label per example from the model's own
  predictive distribution, the paper's Monte-Carlo estimate of the true Fisher. ``empirical``
  uses the dataset's labels (the "empirical Fisher"; falls back to sampled when the data has
  no label column). The released code also offers the exact expectation over all classes,
  which costs one backward pass per class; it is not implemented here.
* ``fisher_floor`` (1e-6, as in the released code) keeps parameters with zero Fisher in every
  model from dividing by zero; where all Fishers are floored the result is the plain average.
* Heads: with one shared label space the classifier is Fisher-merged like the backbone; with
  different label spaces every model keeps its own head.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Annotated, Literal

import torch
from pydantic import Field

from ..errors import ConfigError
from .base import MergeContext, MergeResult, read_heads
from .registry import merge_method

_PER_SAMPLE_BUDGET = 2**28  # bytes of per-example gradients held at once (chunks the vmap)


@contextmanager
def _eager_attention(model: torch.nn.Module):
    """Run with eager attention: SDPA's backward has no vmap batching rule (slow fallback)."""
    previous = getattr(model.config, "_attn_implementation", None)
    switch = previous not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(previous)


def diagonal_fisher(
    model: torch.nn.Module,
    keys_to_params: dict[str, torch.nn.Parameter],
    batches,
    *,
    labels: str = "sampled",
    generator: torch.Generator | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Diagonal Fisher (float64) of ``keys_to_params`` over ``batches`` of ``(pixel_values, labels|None)``.

    ``labels="sampled"`` draws y ~ p(y|x) from the model (with ``generator``); ``"empirical"``
    uses the batch labels. Returns the per-key Fisher and the number of examples it averages.
    """
    from torch.func import functional_call, grad, vmap

    names = {id(p): n for n, p in model.named_parameters()}
    wanted = {k: names[id(p)] for k, p in keys_to_params.items()}
    params = {n: p.detach() for n, p in model.named_parameters()}
    trainable = {n: params[n] for n in wanted.values()}
    chunk = max(1, _PER_SAMPLE_BUDGET // (4 * sum(p.numel() for p in keys_to_params.values())))
    device = next(iter(keys_to_params.values())).device

    def log_prob(trainable: dict, x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, {**params, **trainable}, (x.unsqueeze(0),)).logits
        return (torch.log_softmax(logits, -1)[0] * onehot).sum()

    per_example = vmap(grad(log_prob), in_dims=(None, 0, 0))
    fisher = {k: torch.zeros(p.shape, dtype=torch.float64, device=device) for k, p in keys_to_params.items()}
    count = 0
    with _eager_attention(model):
        for pixels, data_labels in batches:
            pixels = pixels.to(device)
            if labels == "empirical" and data_labels is not None:
                ys = data_labels.to(device)
            else:
                with torch.no_grad():
                    probs = torch.softmax(model(pixel_values=pixels).logits.double(), -1).cpu()
                ys = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(device)
            onehot = torch.nn.functional.one_hot(ys, model.config.num_labels).to(pixels.dtype)
            for start in range(0, len(pixels), chunk):
                grads = per_example(trainable, pixels[start : start + chunk], onehot[start : start + chunk])
                for key, name in wanted.items():
                    fisher[key] += grads[name].double().square().sum(0)
            count += len(pixels)
    if count == 0:
        raise ValueError("fisher: no calibration examples")
    return {k: (f / count).cpu() for k, f in fisher.items()}, count


@merge_method("fisher", kind="model", needs_data=True, reference="https://arxiv.org/abs/2111.09832")
def fisher(
    ctx: MergeContext,
    *,
    fisher_labels: Literal["sampled", "empirical"] = "sampled",
    fisher_floor: Annotated[float, Field(gt=0)] = 1e-6,
) -> MergeResult:
    """Fisher-weighted averaging: each parameter is averaged with weights given by each model's diagonal Fisher.

    Needs calibration data for every model (``data:`` per model); ``calibration.samples_per_task``
    examples each. ``fisher_labels`` is ``sampled`` (labels drawn from the model, the paper's
    estimator) or ``empirical`` (the data's labels).
    """
    if fisher_labels not in ("sampled", "empirical"):
        raise ConfigError(f"fisher: fisher_labels must be 'sampled' or 'empirical', got {fisher_labels!r}")
    if fisher_floor <= 0:
        raise ConfigError(f"fisher: fisher_floor must be positive, got {fisher_floor}")
    adapter = ctx.adapter
    merge_head = ctx.heads_mode == "shared"
    keys = adapter.backbone_keys + (adapter.classifier_keys if merge_head else [])
    numerator = {k: torch.zeros(adapter.info(k).shape, dtype=torch.float64) for k in keys}
    denominator = {k: torch.zeros(adapter.info(k).shape, dtype=torch.float64) for k in keys}
    batch_size = ctx.config.calibration.batch_size
    samples = []
    start = time.perf_counter()
    for i, source in enumerate(ctx.sources):
        model = source.load_model().to(ctx.device).eval()
        data = ctx.calibration_data(i)
        processor = source.image_processor()
        with_labels = fisher_labels == "empirical" and data.label_column is not None
        batches = (
            (b if with_labels else (b, None))
            for b in data.batches(processor, batch_size, with_labels=with_labels)
        )
        model_adapter = source.adapter
        live = {k: model_adapter.parameter(model, k) for k in keys}
        fisher_i, n = diagonal_fisher(
            model, live, batches, labels=fisher_labels, generator=ctx.generator(f"fisher/{i}")
        )
        samples.append(n)
        for k in keys:
            f = fisher_i[k].clamp_(min=fisher_floor)
            numerator[k] += f * live[k].detach().cpu().double()
            denominator[k] += f
        del fisher_i, live
    ctx.timings["stats_seconds"] = round(time.perf_counter() - start, 3)
    merged = {k: (numerator[k] / denominator[k]).float() for k in keys}
    result = MergeResult(
        backbone={k: merged[k] for k in adapter.backbone_keys},
        info={
            "fisher_labels": fisher_labels,
            "fisher_samples": dict(zip(ctx.task_names, samples, strict=True)),
        },
    )
    if merge_head:
        w, b = adapter.classifier_keys
        result.shared_head = (merged[w], merged[b])
    else:
        result.heads = read_heads(ctx.sources)
    return result
