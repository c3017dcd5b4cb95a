"""``auto`` parameters: a float parameter set to ``auto`` is chosen on held-out data.

The published numbers for task arithmetic, TIES, TSV-M or Iso-C pick their scaling on
validation data; a user merging Hub models should not have to guess it. For each candidate
value in the parameter's grid (declared in the method's schema with ``Grid``), the merge is
run and scored by its mean normalized accuracy on a **validation slice of each task's
calibration split**: the examples that follow the calibration sample in the same seeded
shuffle, so they are disjoint from the images used for activation statistics, and never the
test split (``data.test_split`` and a suite's test folders are not read here). Each task's
accuracy is divided by its own model's accuracy on the same slice. Several ``auto``
parameters are searched jointly over the product of their grids; ties go to the earlier
candidate. The chosen values replace ``auto`` in the config (so ``merge_config.yaml``, the
model card and bench results show numbers), and ``info["auto"]`` records the search.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from types import SimpleNamespace

import torch

from .data import TaskData, load_entry_data
from .errors import ConfigError
from .evaluation import label_positions
from .methods.registry import AUTO, MethodSpec

VALIDATION_SAMPLES = 128  # per task


def auto_names(params: dict, spec: MethodSpec) -> list[str]:
    """The float parameters set to ``auto`` (a string parameter may have ``"auto"`` as a choice)."""
    floats = set(spec.float_parameters())
    return [k for k, v in params.items() if k in floats and isinstance(v, str) and v == AUTO]


def validation_slice(ctx, index: int, samples: int = VALIDATION_SAMPLES) -> tuple[TaskData, bool]:
    """Task ``index``'s validation slice: calibration-split examples after the calibration sample.

    The calibration sample is the first ``samples_per_task`` of a shuffle seeded by the merge
    seed (:meth:`TaskData.subset`); the slice is the next ``samples`` of that shuffle (or the
    last ones, overlapping the calibration sample, when the split is too small). Returns the
    slice and whether it is disjoint from the calibration sample.
    """
    entry = ctx.config.models[index].data
    if entry is None:
        raise ConfigError(
            f"`auto` parameters are chosen on each task's calibration data, but model "
            f"{ctx.sources[index].ref!r} has no `data:` entry in the config. Add one per model, or give a number."
        )
    data = load_entry_data(entry, num_labels=len(ctx.sources[index].labels), require_labels=True)
    n = len(data.dataset)
    size = min(samples, n)
    start = min(ctx.config.calibration.samples_per_task, n - size)
    ds = data.dataset.shuffle(seed=ctx.seed).select(range(start, start + size))
    disjoint = start >= ctx.config.calibration.samples_per_task
    return TaskData(ds, data.image_column, data.label_column, data.source, data.split), disjoint


@torch.inference_mode()
def slice_accuracy(
    model, processor, data: TaskData, positions: list[int], device: str, batch_size: int
) -> float:
    """Accuracy of ``model`` on ``data``, predicting among the logits at ``positions`` only."""
    model = model.to(device).eval()
    hits, total = 0, 0
    cols = torch.tensor(positions)
    for pixels, y in data.batches(processor, batch_size, with_labels=True):
        logits = model(pixel_values=pixels.to(device)).logits.float().cpu()
        hits += int((logits[:, cols].argmax(-1) == y).sum())
        total += len(y)
    return hits / max(total, 1)


class ValidationScorer:
    """Mean normalized accuracy of merged models on the tasks' validation slices."""

    def __init__(self, ctx):
        self.ctx = ctx
        slices = [validation_slice(ctx, i) for i in range(len(ctx.sources))]
        self.slices = [s for s, _ in slices]
        self.disjoint = all(d for _, d in slices)
        self.processors = [s.image_processor() for s in ctx.sources]
        self.batch_size = ctx.config.calibration.batch_size
        self.individual = [
            slice_accuracy(
                s.load_model(), proc, data, list(range(len(s.labels))), ctx.device, self.batch_size
            )
            for s, proc, data in zip(ctx.sources, self.processors, self.slices, strict=True)
        ]

    def __call__(self, model) -> float:
        id2label = model.config.id2label
        model_labels = [str(id2label[i]) for i in range(len(id2label))]
        ratios = []
        for name, src, proc, data, ref in zip(
            self.ctx.task_names, self.ctx.sources, self.processors, self.slices, self.individual, strict=True
        ):
            positions = label_positions(model_labels, SimpleNamespace(name=name, labels=src.labels))
            if positions is None:
                raise ConfigError(f"auto: the merged model has no labels for task {name!r}")
            acc = slice_accuracy(model, proc, data, positions, self.ctx.device, self.batch_size)
            ratios.append(acc / ref if ref > 0 else 0.0)
        return sum(ratios) / len(ratios)


def resolve_auto(
    ctx, spec: MethodSpec, params: dict, build: Callable[[dict], torch.nn.Module]
) -> tuple[dict, dict]:
    """Choose every ``auto`` parameter by grid search; returns (resolved params, search record).

    ``build(params)`` merges and assembles a model for concrete parameters.
    """
    names = auto_names(params, spec)
    grids = [spec.auto_grid(n) for n in names]
    start = time.perf_counter()
    scorer = ValidationScorer(ctx)
    trials = []
    for values in itertools.product(*grids):
        trial = {**params, **dict(zip(names, values, strict=True))}
        score = scorer(build(trial))
        trials.append({**dict(zip(names, values, strict=True)), "score": round(score, 4)})
    best = max(range(len(trials)), key=lambda i: (trials[i]["score"], -i))
    chosen = {n: trials[best][n] for n in names}
    record = {
        "chosen": chosen,
        "validation": f"{min(len(s) for s in scorer.slices)}+ calibration-split images per task, "
        + ("disjoint from" if scorer.disjoint else "overlapping (split too small)")
        + " the calibration sample; test splits not read",
        "trials": trials,
        "seconds": round(time.perf_counter() - start, 3),
    }
    return {**params, **chosen}, record
