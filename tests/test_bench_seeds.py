"""Bench over several seeds and the one joint-accuracy rule (INTERFACES.md section 4)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hf_vitmerge.api import aggregate_seeds, bench, parse_seeds, results_markdown
from hf_vitmerge.evaluation import joint_predictions


def test_joint_rule_normalises_each_block():
    # Task A's head speaks loudly (large logits), task B's softly. The raw argmax over the
    # union always answers with a task-A label; the rule compares per-task log-probabilities.
    a = torch.tensor([[10.0, 9.0], [10.0, 10.0]])  # sample 0: A fairly sure; sample 1: A unsure
    b = torch.tensor([[0.0, 0.1], [3.0, 0.0]])  # sample 1: B sure of its first label
    pred = joint_predictions([a, b])
    logp = [x - np.log(np.exp(x).sum(1, keepdims=True)) for x in (a.numpy(), b.numpy())]
    expect = np.concatenate(logp, 1).argmax(1)
    assert pred.tolist() == expect.tolist() == [0, 2]
    assert torch.cat([a, b], 1).argmax(-1).tolist() == [0, 0]  # what the raw rule would say


def test_joint_rule_is_invariant_to_a_task_head_offset():
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randn(50, 3, generator=g), torch.randn(50, 4, generator=g)]
    shifted = [blocks[0] + 100.0, blocks[1] * 1.0]
    assert torch.equal(joint_predictions(blocks), joint_predictions(shifted))


def test_parse_seeds():
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds(" 3 , 5") == [3, 5]
    assert parse_seeds(4) == [4]
    for bad in ("0,0", "a,1", ""):
        with pytest.raises(ValueError, match="seeds"):
            parse_seeds(bad)


def _run(seed, acc_a, acc_b, joint):
    return {
        "seed": seed,
        "params": {"scaling": 0.3},
        "per_task_accuracy": {"a": acc_a, "b": acc_b},
        "avg_task_accuracy": (acc_a + acc_b) / 2,
        "normalized_accuracy": (acc_a + acc_b) / 2 / 0.5,
        "joint_accuracy": joint,
        "merge_seconds": 1.0 + seed,
        "stats_seconds": 0.0,
        "peak_rss_mb": 100.0,
        "num_parameters": 10,
        "info": {},
    }


def test_aggregate_seeds_means_stds_and_per_seed():
    runs = [_run(0, 0.2, 0.4, 0.1), _run(1, 0.3, 0.5, 0.2), _run(2, 0.4, 0.3, None)]
    res = aggregate_seeds("ta", runs)
    assert res["seeds"] == [0, 1, 2]
    assert res["per_task_accuracy"]["a"] == pytest.approx(0.3)
    avgs = [0.3, 0.4, 0.35]
    assert res["avg_task_accuracy"] == pytest.approx(0.35)
    sd = math.sqrt(sum((v - 0.35) ** 2 for v in avgs) / 2)
    assert res["avg_task_accuracy_std"] == pytest.approx(sd)
    assert res["normalized_accuracy_std"] == pytest.approx(sd / 0.5)
    assert res["joint_accuracy"] is None  # one seed had no joint accuracy
    assert [r["seed"] for r in res["per_seed"]] == [0, 1, 2]
    assert res["per_seed"][1]["per_task_accuracy"] == {"a": 0.3, "b": 0.5}
    assert res["merge_seconds"] == pytest.approx(2.0)
    report = {
        "suite": "s",
        "hf_vitmerge_version": "0",
        "seeds": [0, 1, 2],
        "reference": {
            "individual": {"per_task_accuracy": {"a": 0.5, "b": 0.5}, "avg_task_accuracy": 0.5},
            "ensemble": {
                "per_task_accuracy": {"a": 0.5, "b": 0.5},
                "avg_task_accuracy": 0.5,
                "joint_accuracy": 0.4,
            },
        },
        "results": [res],
    }
    assert f"0.350 ± {sd:.3f}" in results_markdown(report)
    # per-task columns too: task a over seeds 0.2, 0.3, 0.4
    assert res["per_task_accuracy_std"]["a"] == pytest.approx(0.1)
    assert "| 0.300 ± 0.100 |" in results_markdown(report)


def test_single_run_keeps_its_shape():
    res = aggregate_seeds("ta", [_run(0, 0.2, 0.4, 0.1)], with_seeds=False)
    assert "per_seed" not in res and "seed" not in res and res["avg_task_accuracy"] == pytest.approx(0.3)


def test_bench_repeats_a_random_method_per_seed(micro_suite, tmp_path):
    out = tmp_path / "b.json"
    report = bench(
        micro_suite,
        "dare[drop_rate=0.7;scaling=1.0]",
        seeds="0,1",
        json_path=out,
        samples_per_task=8,
        quiet=True,
    )
    res = report["results"][0]
    assert res["seeds"] == [0, 1] and len(res["per_seed"]) == 2
    a, b = (r["per_task_accuracy"] for r in res["per_seed"])
    # DARE drops at random: the two seeds' merges differ, so their scores are not all equal
    assert a != b or res["per_seed"][0]["joint_accuracy"] != res["per_seed"][1]["joint_accuracy"]
    assert json.loads(out.read_text())["results"][0]["per_seed"][0]["seed"] == 0
    for key in ("avg_task_accuracy", "normalized_accuracy", "joint_accuracy"):
        assert res[key] == pytest.approx(sum(r[key] for r in res["per_seed"]) / 2)


def test_bench_validates_every_spec_first(micro_suite):
    with pytest.raises(ValueError, match="no_such_method"):
        bench(micro_suite, "average,no_such_method", seeds="0", quiet=True)
