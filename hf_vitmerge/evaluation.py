"""Per-task, joint and normalized accuracy of any model against a suite (INTERFACES.md §4).

Scores are computed by the project's own ``evaluate`` module, shipped in
``hf_vitmerge/metrics/vitmerge_accuracy`` and loaded by path (no Hub access).

* per-task accuracy: argmax within the task's own labels (the task is known);
* joint accuracy: over the union of all tasks' labels, no task given (null when the tasks
  share one label space), scored with **one rule for every model**, merged or reference:
  each task's block of logits goes through its own log-softmax, the blocks are concatenated
  in label order and the argmax is the prediction (:func:`joint_predictions`). A single
  union head is split into its tasks' label blocks first; a multi-head model's blocks are
  already log-probabilities; the ensemble's blocks are its task models' logits (the ZipIt!
  protocol, per-task softmax then argmax, is the same rule);
* normalized accuracy: mean over tasks of merged / individual accuracy;
* throughput (``throughput_img_s``): test images per second through the model's forward
  passes at the evaluation batch size (preprocessing not counted); for the individual
  reference, the task models' forwards on their own test splits.
"""

from __future__ import annotations

import os
import time
from functools import lru_cache
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import TaskData, load_task_data
from .errors import InputError
from .suite import Suite, SuiteTask, load_suite

METRIC_PATH = Path(__file__).parent / "metrics" / "vitmerge_accuracy"


@lru_cache(maxsize=1)
def load_metric():
    """The ``vitmerge_accuracy`` evaluate module, loaded from the package (offline)."""
    import evaluate

    return evaluate.load(str(METRIC_PATH))


def _as_suite(suite: Suite | str | os.PathLike) -> Suite:
    return suite if isinstance(suite, Suite) else load_suite(suite)


def _load(model_or_path, processor=None, trust_remote_code: bool = False):
    """A model object as it is, or a folder / Hub id loaded with the Auto classes.

    Code shipped with the model runs only with ``trust_remote_code``; hf_vitmerge's own merged
    classes are registered with the Auto classes on import and load without it.
    """
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from . import modeling  # noqa: F401  (registers custom merged-model classes)
    from .loading import ModelLoadError, _folder_hint, _looks_like_path

    if isinstance(model_or_path, torch.nn.Module):
        return model_or_path, processor
    path = str(model_or_path)
    local = Path(path).expanduser()
    if not local.is_dir() and (_looks_like_path(path) or local.exists()):
        what = "is a file, not a model folder" if local.exists() else "does not exist"
        raise ModelLoadError(f"model folder {path!r} {what}. {_folder_hint(path)}Check the path.")
    try:
        model = AutoModelForImageClassification.from_pretrained(path, trust_remote_code=trust_remote_code)
        processor = processor or AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        text = str(err)
        if "trust_remote_code" in text:
            raise ModelLoadError(
                f"model {path!r} ships its own Python code, which runs only on request. If you trust it, "
                "pass --trust-remote-code (Python: trust_remote_code=True)."
            ) from None
        where = "folder" if local.is_dir() else "Hub model (not a folder here)"
        hint = "" if local.is_dir() else _folder_hint(path)
        raise ModelLoadError(
            f"model {path!r} could not be loaded as a {where}: "
            f"{text.splitlines()[0].rstrip('.') if text else type(err).__name__}. "
            f"{hint}Check the path or id (offline: is it in the local Hugging Face cache?)."
        ) from err
    return model.eval(), processor


def load_test_data(task: SuiteTask) -> TaskData:
    """A suite task's test split with its labels (checked against the task's label count)."""
    return load_task_data(
        task.test,
        image_column=task.image_column,
        label_column=task.label_column,
        num_labels=len(task.labels),
        require_labels=True,
    )


@torch.inference_mode()
def predict_logits(
    model,
    processor,
    task: SuiteTask,
    *,
    batch_size: int = 64,
    device: str = "cpu",
    quiet: bool = True,
    clock: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of ``model`` on a task's test split, and the true labels.

    ``clock`` (a dict) accumulates ``seconds`` spent in the model's forward and ``images``.
    """
    data = load_test_data(task)
    model = model.to(device).eval()
    outs, labels = [], []
    for pixels, y in tqdm(
        data.batches(processor, batch_size, with_labels=True),
        desc=f"eval {task.name}",
        disable=quiet,
        total=-(-len(data) // batch_size),
    ):
        start = time.perf_counter()
        outs.append(model(pixel_values=pixels.to(device)).logits.float().cpu())
        if clock is not None:
            clock["seconds"] = clock.get("seconds", 0.0) + time.perf_counter() - start
            clock["images"] = clock.get("images", 0) + len(pixels)
        labels.append(y)
    return torch.cat(outs), torch.cat(labels)


def label_positions(model_labels: list[str], task: SuiteTask) -> list[int] | None:
    """Index in the model's label space of each of the task's labels (``task:label`` first)."""
    index = {name: i for i, name in enumerate(model_labels)}
    out = []
    for label in task.labels:
        pos = index.get(f"{task.name}:{label}", index.get(label))
        if pos is None:
            return None
        out.append(pos)
    return out


def joint_predictions(blocks: list[torch.Tensor]) -> torch.Tensor:
    """The joint rule: per-block log-softmax, concatenate, argmax (index into the concatenation).

    ``blocks`` holds one ``[n, labels_of_task]`` logit tensor per task, in label order.
    Normalising each block first makes heads with different logit scales comparable, so a
    union head, a multi-head model and an ensemble of task models are scored alike.
    """
    # A block that is all -inf (a routed model ruling a task out) stays -inf instead of NaN.
    scores = torch.cat([torch.log_softmax(b.double(), -1) for b in blocks], -1)
    return scores.nan_to_num(nan=float("-inf")).argmax(-1)


def _model_labels(model) -> list[str]:
    id2label = model.config.id2label
    return [str(id2label[i]) for i in range(len(id2label))]


_CACHE: dict = {}


def individual_accuracies(
    suite: Suite | str, *, batch_size: int = 64, device: str = "cpu"
) -> dict[str, float]:
    """Each task model's accuracy on its own test split (the normalisation reference)."""
    suite = _as_suite(suite)
    key = ("individual", str(suite.path.resolve()))
    if key not in _CACHE:
        metric = load_metric()
        preds, refs, ids, clock = [], [], [], {}
        for ti, task in enumerate(suite.tasks):
            logits, y = predict_logits(
                *_load(task.model), task, batch_size=batch_size, device=device, clock=clock
            )
            preds.append(logits.argmax(-1))
            refs.append(y)
            ids.append(torch.full_like(y, ti))
        scores = metric.compute(
            predictions=torch.cat(preds),
            references=torch.cat(refs),
            tasks=torch.cat(ids),
            task_names=suite.task_names,
        )
        _CACHE[key] = scores["per_task_accuracy"]
        _CACHE[("throughput", *key[1:])] = _throughput(clock)
    return dict(_CACHE[key])


def _throughput(clock: dict) -> float | None:
    return round(clock["images"] / clock["seconds"], 1) if clock.get("seconds") else None


def reference_results(
    suite: Suite | str, *, batch_size: int = 64, device: str = "cpu", quiet: bool = True
) -> dict:
    """Individual and ensemble references (INTERFACES.md §4 ``reference``)."""
    suite = _as_suite(suite)
    individual = individual_accuracies(suite, batch_size=batch_size, device=device)
    throughput = _CACHE.get(("throughput", str(suite.path.resolve())))
    avg = sum(individual.values()) / len(individual)
    joint = None
    if not suite.shared_labels:
        models = [_load(t.model) for t in suite.tasks]
        offsets = [0]
        for t in suite.tasks:
            offsets.append(offsets[-1] + len(t.labels))
        hits = []
        for ti, task in enumerate(tqdm(suite.tasks, desc="ensemble", disable=quiet)):
            blocks, y = [], None
            for m, p in models:
                logits, y = predict_logits(m, p, task, batch_size=batch_size, device=device)
                blocks.append(logits)
            hits.append((joint_predictions(blocks) == (y + offsets[ti])).float())
        joint = float(torch.cat(hits).mean())
    return {
        "individual": {
            "per_task_accuracy": individual,
            "avg_task_accuracy": avg,
            "throughput_img_s": throughput,
        },
        "ensemble": {"per_task_accuracy": individual, "avg_task_accuracy": avg, "joint_accuracy": joint},
    }


def evaluate_model(
    model_or_path,
    suite: Suite | str | os.PathLike,
    *,
    processor=None,
    tasks: list[str] | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    quiet: bool = True,
    normalize: bool = True,
    trust_remote_code: bool = False,
) -> dict:
    """Evaluate a model (object or folder/Hub id) on a suite's test splits.

    Tasks whose labels the model does not have get ``None`` per-task accuracy and count as 0 in
    the average and normalized accuracy (means over every task evaluated: pass ``tasks`` to
    evaluate only some); joint accuracy counts their examples as errors. ``processor`` defaults
    to the model folder's processor, or to the first task model's for an in-memory model.
    """
    from .checks import check_device

    check_device(device)
    suite = _as_suite(suite)
    chosen = [suite.task(n) for n in tasks] if tasks else list(suite.tasks)
    if processor is None and isinstance(model_or_path, torch.nn.Module):
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(chosen[0].model)
    model, processor = _load(model_or_path, processor, trust_remote_code=trust_remote_code)
    labels = _model_labels(model)
    metric = load_metric()
    preds, refs, task_ids, joint_hits = [], [], [], []
    covered, clock = [], {}
    union_positions = [label_positions(labels, t) for t in chosen]
    # The joint rule's blocks: every task the model can answer, each in its own label order.
    blocks = [pos for pos in union_positions if pos is not None]
    joint_cols = torch.tensor([p for pos in blocks for p in pos], dtype=torch.long)
    for ti, task in enumerate(tqdm(chosen, desc="evaluate", disable=quiet)):
        logits, y = predict_logits(model, processor, task, batch_size=batch_size, device=device, clock=clock)
        pos = union_positions[ti]
        if pos is not None:
            covered.append(task.name)
            own = logits[:, pos]
            preds.append(own.argmax(-1))
            refs.append(y)
            task_ids.append(torch.full_like(y, len(covered) - 1))
        if not suite.shared_labels:
            if pos is None:
                joint_hits.append(torch.zeros(len(y)))
            else:
                pred_col = joint_cols[joint_predictions([logits[:, b] for b in blocks])]
                joint_hits.append((pred_col == torch.tensor(pos)[y]).float())
    if not covered:
        raise InputError(
            f"the model's labels ({labels[:5]}...) match none of the tasks of suite {suite.name!r}: "
            "is it a model for this suite?"
        )
    individual = individual_accuracies(suite, batch_size=batch_size, device=device) if normalize else None
    scores = metric.compute(
        predictions=torch.cat(preds),
        references=torch.cat(refs),
        tasks=torch.cat(task_ids),
        task_names=covered,
        individual=individual,
    )
    per_task = {t.name: scores["per_task_accuracy"].get(t.name) for t in chosen}
    share = len(covered) / len(chosen)  # a task the model cannot predict scores 0

    def over_all_tasks(mean: float | None) -> float | None:
        return None if mean is None else mean * share

    return {
        "per_task_accuracy": per_task,
        "avg_task_accuracy": over_all_tasks(scores["avg_task_accuracy"]),
        "normalized_accuracy": over_all_tasks(scores["normalized_accuracy"]),
        "joint_accuracy": float(torch.cat(joint_hits).mean()) if joint_hits else None,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "throughput_img_s": _throughput(clock),
    }
