"""Evaluation: the shipped `evaluate` module, per-task / joint / normalized accuracy, references."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import evaluate
import numpy as np
import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification

from hf_vitmerge import evaluate_model, merge, reference_results
from hf_vitmerge.evaluation import METRIC_PATH, label_positions, load_metric
from hf_vitmerge.suite import SuiteError, load_suite


def test_metric_module_loads_by_path_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = evaluate.load(str(METRIC_PATH))
    out = metric.compute(
        predictions=[0, 1, 1, 2],
        references=[0, 1, 0, 2],
        tasks=[0, 0, 1, 1],
        task_names=["a", "b"],
        individual={"a": 1.0, "b": 0.8},
    )
    assert out["per_task_accuracy"] == {"a": 1.0, "b": 0.5}
    assert out["avg_task_accuracy"] == 0.75
    assert out["normalized_accuracy"] == pytest.approx((1.0 / 1.0 + 0.5 / 0.8) / 2)
    assert out["accuracy"] == 0.75


# ----------------------------------------------------------------------------- independent oracle
# Plain transformers forward passes on the datasets read with `datasets`, and numpy: nothing from
# hf_vitmerge.evaluation (or its data loader) is used to compute the expected scores.
def _oracle_logits(model, processor_dir, test_dir) -> tuple[np.ndarray, np.ndarray]:
    ds = datasets.load_from_disk(str(test_dir))
    proc = AutoImageProcessor.from_pretrained(processor_dir)
    pixels = proc(images=[im.convert("RGB") for im in ds["image"]], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model.eval()(pixel_values=pixels).logits
    return logits.double().numpy(), np.asarray(ds["label"])


def _oracle_tasks(suite_path):
    root = Path(suite_path).parent
    spec = json.loads(Path(suite_path).read_text())
    return [(t["name"], t["labels"], root / t["model"], root / t["test"]) for t in spec["tasks"]]


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def _oracle_individual(suite_path) -> dict[str, float]:
    out = {}
    for name, _, model_dir, test_dir in _oracle_tasks(suite_path):
        model = AutoModelForImageClassification.from_pretrained(model_dir)
        z, y = _oracle_logits(model, model_dir, test_dir)
        out[name] = float((z.argmax(1) == y).mean())
    return out


def test_individual_models_score_their_own_task(micro_suite):
    expected = _oracle_individual(micro_suite)
    assert len(set(expected.values())) > 1  # the tasks' scores differ: a mix-up would show
    ref = reference_results(micro_suite)["individual"]
    assert ref["per_task_accuracy"] == pytest.approx(expected)
    assert ref["avg_task_accuracy"] == pytest.approx(np.mean(list(expected.values())))
    suite = load_suite(micro_suite)
    for task in suite.tasks:
        res = evaluate_model(task.model, suite, normalize=False)
        assert res["per_task_accuracy"][task.name] == pytest.approx(expected[task.name])
        # the other tasks' labels are not all in this model: no per-task score
        others = [t for t in suite.task_names if t != task.name]
        assert all(res["per_task_accuracy"][t] is None for t in others)
        # ... and each counts as 0 in the mean over the suite's tasks (only one of three is done)
        assert res["avg_task_accuracy"] == pytest.approx(expected[task.name] / len(suite.tasks))
        alone = evaluate_model(task.model, suite, tasks=[task.name], normalize=False)
        assert alone["avg_task_accuracy"] == pytest.approx(expected[task.name])


def test_scores_match_an_independent_computation(micro_suite):
    suite = load_suite(micro_suite)
    merged = merge([str(t.model) for t in suite.tasks], "average", tasks=suite.task_names, quiet=True)
    res = evaluate_model(merged, suite)
    names = [merged.config.id2label[i] for i in range(merged.config.num_labels)]
    tasks = _oracle_tasks(micro_suite)
    # each task's columns in the union head: "task:label" where names collide, else "label"
    cols = [
        [names.index(f"{n}:{lab}") if f"{n}:{lab}" in names else names.index(lab) for lab in labels]
        for n, labels, _, _ in tasks
    ]
    all_cols = np.concatenate(cols)
    individual = _oracle_individual(micro_suite)
    per_task, joint_hits, n = {}, 0, 0
    for (name, _, _, test_dir), own in zip(tasks, cols, strict=True):
        # the processor of the first task model, as evaluate_model uses for an in-memory model
        z, y = _oracle_logits(merged, tasks[0][2], test_dir)
        per_task[name] = float((z[:, own].argmax(1) == y).mean())
        joint = np.concatenate([_log_softmax(z[:, c]) for c in cols], 1)
        joint_hits += int((all_cols[joint.argmax(1)] == np.asarray(own)[y]).sum())
        n += len(y)
    assert res["per_task_accuracy"] == pytest.approx(per_task)
    assert res["avg_task_accuracy"] == pytest.approx(np.mean(list(per_task.values())))
    assert res["joint_accuracy"] == pytest.approx(joint_hits / n)
    # tasks whose individual model scores 0 cannot be normalised and are left out
    ratios = [per_task[t] / individual[t] for t in per_task if individual[t] > 0]
    assert res["normalized_accuracy"] == pytest.approx(np.mean(ratios))


def test_colliding_label_names_are_resolved_per_task(micro_suite):
    suite = load_suite(micro_suite)
    # task0 and task2 both have a label "1": the merged union model names them task0:1 and task2:1
    merged = merge([str(t.model) for t in suite.tasks], "average", tasks=suite.task_names, quiet=True)
    labels = [merged.config.id2label[i] for i in range(merged.config.num_labels)]
    assert "task0:1" in labels and "task2:1" in labels
    assert label_positions(labels, suite.task("task2")) == [labels.index("task2:1"), labels.index("5")]


def test_ensemble_reference_joint(micro_suite):
    # The ensemble: each task model's logits are one block of the joint rule; per task it is the
    # task's own model.
    tasks = _oracle_tasks(micro_suite)
    models = [AutoModelForImageClassification.from_pretrained(m) for _, _, m, _ in tasks]
    offsets = np.cumsum([0] + [len(labels) for _, labels, _, _ in tasks])
    hits, n = 0, 0
    for ti, (_, _, _, test_dir) in enumerate(tasks):
        blocks = []
        for (_, _, model_dir, _), model in zip(tasks, models, strict=True):
            z, y = _oracle_logits(model, model_dir, test_dir)
            blocks.append(_log_softmax(z))
        hits += int((np.concatenate(blocks, 1).argmax(1) == y + offsets[ti]).sum())
        n += len(y)
    ref = reference_results(micro_suite)
    assert ref["ensemble"]["joint_accuracy"] == pytest.approx(hits / n)
    assert ref["ensemble"]["per_task_accuracy"] == pytest.approx(_oracle_individual(micro_suite))
    assert load_metric() is load_metric()


def test_bad_suite(tmp_path):
    with pytest.raises(SuiteError, match="does not exist"):
        load_suite(tmp_path / "suite.json")
    (tmp_path / "suite.json").write_text('{"name": "x"}')
    with pytest.raises(SuiteError, match="required field"):
        load_suite(tmp_path / "suite.json")
