"""What makes a shared-init suite look like Hub fine-tunes, measured on the built models.

- pairwise cosine similarity of the task vectors (fine-tuned minus base, classifier excluded):
  task-arithmetic papers find them close to 0 for Hub fine-tunes of one checkpoint;
- the relative norm of each task vector against the base weights (small for Hub fine-tunes);
- plain averaging's normalized accuracy (each task keeps its own classifier on the averaged backbone,
  the per-task rule of ``bench``);
- task identifiability: the test accuracy of a logistic regression trained on the base model's
  [CLS] features to tell which task an image comes from.
"""

from __future__ import annotations

import copy
import itertools
import statistics
from collections.abc import Sequence

import torch

from .train import accuracy

PixelSplits = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # train x, y, test x, y


def _backbone(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.state_dict().items() if not n.startswith("classifier.")}


def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten().double() for t in state.values()])


def task_vector_stats(base, models: Sequence) -> dict:
    """Median/max pairwise cosine of the task vectors and their median norm relative to the base's."""
    b = _backbone(base)
    base_vec = _flat(b)
    taus = [_flat({n: _backbone(m)[n] - b[n] for n in b}) for m in models]
    cos = [
        float(torch.nn.functional.cosine_similarity(x, y, dim=0)) for x, y in itertools.combinations(taus, 2)
    ]
    rel = [float(t.norm() / base_vec.norm()) for t in taus]
    return {
        "task_vector_cosine_median": round(statistics.median(cos), 4) if cos else None,
        "task_vector_cosine_max": round(max(cos), 4) if cos else None,
        "task_vector_relative_norm_median": round(statistics.median(rel), 5),
    }


def averaging_accuracy(models: Sequence, splits: Sequence[PixelSplits], individual: Sequence[float]) -> dict:
    """Per-task accuracy of the plain average (own classifier per task) and its normalized mean."""
    states = [_backbone(m) for m in models]
    mean = {n: sum(s[n] for s in states) / len(states) for n in states[0]}
    per_task = []
    for model, (_, _, xt, yt) in zip(models, splits, strict=True):
        merged = copy.deepcopy(model)
        merged.load_state_dict({**merged.state_dict(), **mean})
        per_task.append(accuracy(merged, xt, yt))
    normalized = [a / i if i > 0 else 0.0 for a, i in zip(per_task, individual, strict=True)]
    return {
        "averaging_avg_task_accuracy": round(sum(per_task) / len(per_task), 4),
        "averaging_normalized_accuracy": round(sum(normalized) / len(normalized), 4),
    }


@torch.no_grad()
def _features(model, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    out = [
        model.vit(pixel_values=pixels[i : i + batch_size]).last_hidden_state[:, 0]
        for i in range(0, len(pixels), batch_size)
    ]
    return torch.cat(out).double()


def task_identifiability(base, splits: Sequence[PixelSplits], per_task: int = 300, seed: int = 0) -> float:
    """Test accuracy of a logistic regression on the base's [CLS] features predicting the task."""
    from sklearn.linear_model import LogisticRegression

    xs, ys, xts, yts = [], [], [], []
    for k, (x, _, xt, _) in enumerate(splits):
        xs.append(_features(base, x[:per_task]))
        ys += [k] * min(per_task, len(x))
        xts.append(_features(base, xt[:per_task]))
        yts += [k] * min(per_task, len(xt))
    train, test = torch.cat(xs).numpy(), torch.cat(xts).numpy()
    mu, sd = train.mean(0), train.std(0) + 1e-6
    clf = LogisticRegression(max_iter=2000, random_state=seed)
    clf.fit((train - mu) / sd, ys)
    return round(float(clf.score((test - mu) / sd, yts)), 4)


def measure(base, models: Sequence, splits: Sequence[PixelSplits], individual: Sequence[float]) -> dict:
    """All realism figures of a shared-init suite (see the module docstring)."""
    return {
        **task_vector_stats(base, models),
        **averaging_accuracy(models, splits, individual),
        "task_identifiability": task_identifiability(base, splits),
    }
