"""Mergeability diagnostics: hand-computed metric values, streamed aggregates, report files."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_vit

from hf_vitmerge import ViTAdapter, reference_results
from hf_vitmerge.diagnostics import (
    cosine_similarity,
    inspect_models,
    l2_distance,
    metrics_markdown,
    soft_sign_dissimilarity,
    stats_metrics,
    tensor_stats,
    trim_topk,
    truncated_soft_sign_dissimilarity,
)

A = torch.tensor([1.0, -2.0, 3.0, 0.0])
B = torch.tensor([1.0, 2.0, -1.5, 0.0])
C = torch.tensor([-1.0, 2.0, 3.0, 0.0])


def test_l2_and_cosine_hand_computed():
    # a - b = [0, -4, 4.5, 0]  ->  sqrt(16 + 20.25)
    assert l2_distance(A, B) == pytest.approx(math.sqrt(36.25))
    # <a, b> = 1 - 4 - 4.5 = -7.5 ; |a|^2 = 14 ; |b|^2 = 1 + 4 + 2.25 = 7.25
    assert cosine_similarity(A, B) == pytest.approx(-7.5 / math.sqrt(14 * 7.25))
    assert math.isnan(cosine_similarity(A, torch.zeros(4)))


def test_ssd_hand_computed():
    # entry 3 is zero in both models and is left out: d = 3
    # ratios |sum| / sum|.|: entry 0: 2/2 = 1, entry 1: 0/4 = 0, entry 2: 1.5/4.5 = 1/3
    assert soft_sign_dissimilarity([A, B]) == pytest.approx(1 - (1 + 0 + 1 / 3) / 3)  # 5/9
    # three models: entry 0: |1+1-1|/3 = 1/3, entry 1: |-2+2+2|/6 = 1/3, entry 2: |3-1.5+3|/7.5 = 3/5
    assert soft_sign_dissimilarity([A, B, C]) == pytest.approx(1 - (1 / 3 + 1 / 3 + 3 / 5) / 3)  # 26/45
    assert soft_sign_dissimilarity([A, A]) == 0.0
    assert soft_sign_dissimilarity([A, -A]) == 1.0
    assert math.isnan(soft_sign_dissimilarity([torch.zeros(3), torch.zeros(3)]))


def test_tssd_hand_computed():
    # top 50% (2 of 4 entries) by magnitude: a -> [0, -2, 3, 0], b -> [0, 2, -1.5, 0]
    torch.testing.assert_close(trim_topk(A, 0.5), torch.tensor([0.0, -2.0, 3.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(trim_topk(B, 0.5), torch.tensor([0.0, 2.0, -1.5, 0.0], dtype=torch.float64))
    # surviving entries 1 and 2: ratios 0/4 = 0 and 1.5/4.5 = 1/3 -> 1 - (1/3)/2 = 5/6
    assert truncated_soft_sign_dissimilarity([A, B], topk=0.5) == pytest.approx(5 / 6)
    # topk 1 keeps everything: TSSD == SSD
    assert truncated_soft_sign_dissimilarity([A, B], topk=1.0) == pytest.approx(
        soft_sign_dissimilarity([A, B])
    )
    # top 25% (1 entry each): a -> [0,0,3,0], b -> [0,2,0,0]: no overlap, no conflict
    assert truncated_soft_sign_dissimilarity([A, B], topk=0.25) == 0.0
    with pytest.raises(ValueError, match="topk"):
        trim_topk(A, 0.0)
    with pytest.raises(ValueError, match="at least two"):
        soft_sign_dissimilarity([A])
    with pytest.raises(ValueError, match="one shape"):
        soft_sign_dissimilarity([A, torch.zeros(3)])


def test_summed_statistics_match_the_pure_functions():
    stacked = torch.stack([A, B, C])
    values, per_pair = stats_metrics(tensor_stats(stacked, 0.5, [(0, 1), (0, 2), (1, 2)]))
    assert per_pair[0]["l2"] == pytest.approx(l2_distance(A, B))
    assert per_pair[2]["cosine"] == pytest.approx(cosine_similarity(B, C))
    assert per_pair[1]["tssd"] == pytest.approx(truncated_soft_sign_dissimilarity([A, C], 0.5))
    assert values["ssd_all"] == pytest.approx(26 / 45)
    assert values["ssd"] == pytest.approx(
        (soft_sign_dissimilarity([A, B]) + soft_sign_dissimilarity([A, C]) + soft_sign_dissimilarity([B, C]))
        / 3
    )
    # statistics of two halves add up to those of the whole
    halves = tensor_stats(stacked[:, :2], 1.0, [(0, 1)]) + tensor_stats(stacked[:, 2:], 1.0, [(0, 1)])
    whole, _ = stats_metrics(tensor_stats(stacked, 1.0, [(0, 1)]))
    summed, _ = stats_metrics(halves)
    for m in ("l2", "cosine", "ssd", "tssd", "ssd_all"):
        assert summed[m] == pytest.approx(whole[m])


@pytest.fixture(scope="module")
def three_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("diag")
    base = make_vit(root / "base", seed=0)
    models = [make_vit(root / f"m{i}", seed=i + 1, base=base, noise=0.02 * (i + 1)) for i in range(3)]
    make_vit(root / "other_labels", labels=("p", "q"), seed=9, base=base)
    return root, base, models


def _task_vectors(models, base, keys):
    sd0 = ViTAdapter.from_model(base).state_dict(base)
    out = []
    for m in models:
        sd = ViTAdapter.from_model(m).state_dict(m)
        out.append(torch.cat([(sd[k] - sd0[k]).reshape(-1).double() for k in keys]))
    return out


def test_inspect_streams_exact_group_and_model_values(three_models, tmp_path):
    root, base, models = three_models
    refs = [root / f"m{i}" for i in range(3)]
    res = inspect_models(refs, base=root / "base", out_dir=tmp_path / "out", topk=0.3)
    assert res["on"] == "task_vectors" and res["pairs"] == [[0, 1], [0, 2], [1, 2]]
    units = {u["name"]: u for u in res["units"]}
    adapter = ViTAdapter.from_model(models[0])
    assert {
        "embeddings",
        "block.0",
        "block.1.attention",
        "block.1.mlp",
        "block.0.norm",
        "final_norm",
        "head",
        "model",
    } <= set(units)

    keys = adapter.block_keys(1, "attention")
    tv = _task_vectors(models, base, keys)
    u = units["block.1.attention"]
    assert u["numel"] == tv[0].numel()
    assert u["pairwise"][1]["l2"] == pytest.approx(l2_distance(tv[0], tv[2]), rel=1e-6)
    assert u["pairwise"][2]["cosine"] == pytest.approx(cosine_similarity(tv[1], tv[2]), rel=1e-5)
    assert u["values"]["ssd_all"] == pytest.approx(soft_sign_dissimilarity(tv), rel=1e-6)

    whole = _task_vectors(models, base, adapter.backbone_keys)
    mean_l2 = sum(l2_distance(whole[a], whole[b]) for a, b in [(0, 1), (0, 2), (1, 2)]) / 3
    assert res["model"]["l2"] == pytest.approx(mean_l2, rel=1e-6)
    # larger noise -> further apart: pair (0, 1) is the closest of the three
    pair_l2 = [p["l2"] for p in units["model"]["pairwise"]]
    assert pair_l2[0] == min(pair_l2)

    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["model"] == res["model"]
    md = (tmp_path / "out" / "metrics.md").read_text()
    assert "| block.1.mlp |" in md and "tssd_all" in md
    assert (tmp_path / "out" / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "out").glob(".*tmp"))


def test_identical_models_on_weights(three_models):
    root, _, _ = three_models
    res = inspect_models([root / "m0", root / "m0"])
    assert res["on"] == "weights" and res["base"] is None
    assert res["model"]["l2"] == 0.0
    assert res["model"]["cosine"] == pytest.approx(1.0)
    assert res["model"]["ssd"] == 0.0 and res["model"]["tssd_all"] == 0.0
    assert "head" in {u["name"] for u in res["units"]}


def test_head_skipped_when_label_spaces_differ(three_models):
    root, _, _ = three_models
    res = inspect_models([root / "m0", root / "other_labels"], base=root / "base")
    assert "head" not in {u["name"] for u in res["units"]}
    assert any("head skipped" in n for n in res["notes"])
    assert "note: head skipped" in metrics_markdown(res)


def test_bad_inputs(three_models):
    root, _, _ = three_models
    with pytest.raises(ValueError, match="at least two models"):
        inspect_models([root / "m0"])
    with pytest.raises(ValueError, match="topk"):
        inspect_models([root / "m0", root / "m1"], topk=1.5)


def test_pairwise_mergeability_on_micro_suite(micro_suite, tmp_path):
    from scipy.stats import spearmanr

    from hf_vitmerge.diagnostics import pairwise_mergeability

    res = pairwise_mergeability(
        micro_suite, out_dir=tmp_path, method_params={"task_arithmetic": {"scaling": 1.0}}
    )
    assert res["num_pairs"] == 3 and res["on"] == "task_vectors"
    assert [r["pair"] for r in res["pairs"]] == [["task0", "task1"], ["task0", "task2"], ["task1", "task2"]]
    individual = reference_results(micro_suite)["individual"]["per_task_accuracy"]
    compared = 0
    for method in ("average", "task_arithmetic"):
        acc = []
        for row in res["pairs"]:
            per_task = row["results"][method]["per_task_accuracy"]
            assert set(per_task) == set(row["pair"])
            # normalized accuracy of the pair = mean of merged / individual over its two tasks
            ratios = [per_task[t] / individual[t] for t in row["pair"] if individual[t] > 0]
            assert row["results"][method]["normalized_accuracy"] == pytest.approx(sum(ratios) / len(ratios))
            acc.append(row["results"][method]["normalized_accuracy"])
        l2 = [r["metrics"]["l2"] for r in res["pairs"]]
        c = res["spearman"][method]["l2"]
        expected = spearmanr(l2, acc).statistic
        if math.isnan(expected):  # constant accuracies: no correlation, reported as null
            assert c["rho"] is None and c["predictive_rho"] is None
        else:
            compared += 1
            assert c["rho"] == pytest.approx(expected)
            assert c["predictive_rho"] == pytest.approx(-expected)
    assert compared > 0, "no method had a defined correlation: the check above compared nothing"
    by_method = [[r["results"][m]["per_task_accuracy"] for r in res["pairs"]] for m in res["methods"]]
    assert by_method[0] != by_method[1]  # the two methods' merges are told apart
    assert (tmp_path / "mergeability.json").is_file()
    assert "best predictor" in (tmp_path / "mergeability.md").read_text()
