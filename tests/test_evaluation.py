"""Evaluation: the shipped `evaluate` module, per-task / joint / normalized accuracy, references."""

from __future__ import annotations

import evaluate
import numpy as np
import pytest

from hf_vitmerge import evaluate_model, merge, reference_results
from hf_vitmerge.evaluation import METRIC_PATH, label_positions, load_metric, predict_logits
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


def test_individual_models_score_their_own_task(micro_suite):
    suite = load_suite(micro_suite)
    ref = reference_results(suite)
    task = suite.tasks[1]
    res = evaluate_model(task.model, suite)
    assert res["per_task_accuracy"][task.name] == pytest.approx(
        ref["individual"]["per_task_accuracy"][task.name]
    )
    assert res["normalized_accuracy"] == pytest.approx(1.0)
    # the other tasks' labels are not all in this model: no per-task score
    assert res["per_task_accuracy"]["task0"] is None
    assert 0.0 <= res["joint_accuracy"] <= 1.0


def test_scores_match_a_direct_computation(micro_suite):
    suite = load_suite(micro_suite)
    merged = merge([str(t.model) for t in suite.tasks], "average", tasks=suite.task_names, quiet=True)
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(suite.tasks[0].model)
    res = evaluate_model(merged, suite, processor=proc)
    labels = [merged.config.id2label[i] for i in range(merged.config.num_labels)]
    hits, joint_hits, n = [], 0, 0
    blocks = [label_positions(labels, t) for t in suite.tasks]
    cols = np.array([c for b in blocks for c in b])
    for task in suite.tasks:
        logits, y = predict_logits(merged, proc, task)
        pos = label_positions(labels, task)
        hits.append((logits[:, pos].argmax(-1) == y).float().mean().item())
        # the joint rule, in numpy: log-softmax per task block, concatenate, argmax
        z = logits.double().numpy()
        parts = [z[:, b] - np.log(np.exp(z[:, b]).sum(1, keepdims=True)) for b in blocks]
        joint_hits += (cols[np.concatenate(parts, 1).argmax(1)] == np.array(pos)[y.numpy()]).sum()
        n += len(y)
    assert [res["per_task_accuracy"][t] for t in suite.task_names] == pytest.approx(hits)
    assert res["joint_accuracy"] == pytest.approx(joint_hits / n)
    individual = reference_results(suite)["individual"]["per_task_accuracy"]
    # tasks whose individual model scores 0 cannot be normalised and are left out
    ratios = [h / individual[t] for h, t in zip(hits, suite.task_names, strict=True) if individual[t] > 0]
    expect = sum(ratios) / len(ratios)
    assert res["normalized_accuracy"] == pytest.approx(expect)


def test_colliding_label_names_are_resolved_per_task(micro_suite):
    suite = load_suite(micro_suite)
    # task0 and task2 both have a label "1": the merged union model names them task0:1 and task2:1
    merged = merge([str(t.model) for t in suite.tasks], "average", tasks=suite.task_names, quiet=True)
    labels = [merged.config.id2label[i] for i in range(merged.config.num_labels)]
    assert "task0:1" in labels and "task2:1" in labels
    assert label_positions(labels, suite.task("task2")) == [labels.index("task2:1"), labels.index("5")]


def test_ensemble_reference_joint(micro_suite):
    ref = reference_results(micro_suite)
    assert ref["ensemble"]["per_task_accuracy"] == ref["individual"]["per_task_accuracy"]
    assert 0.0 <= ref["ensemble"]["joint_accuracy"] <= 1.0
    assert load_metric() is load_metric()


def test_bad_suite(tmp_path):
    with pytest.raises(SuiteError, match="does not exist"):
        load_suite(tmp_path / "suite.json")
    (tmp_path / "suite.json").write_text('{"name": "x"}')
    with pytest.raises(SuiteError, match="required field"):
        load_suite(tmp_path / "suite.json")
