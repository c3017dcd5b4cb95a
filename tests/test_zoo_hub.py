"""The hub-tasks suite: its image kinds, its upstream labels, realism figures and reproducible builds."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from hf_vitmerge.zoo import SIZES, SUITES, hub, list_suites
from hf_vitmerge.zoo.builder import build
from hf_vitmerge.zoo.train import ArchSpec, TrainSpec


@pytest.mark.parametrize("kind", hub.KINDS, ids=lambda k: k.name)
def test_kind_draws_every_label_at_the_requested_size(kind):
    images, labels = hub.draw(kind, 160, 16, np.random.default_rng(0), "train")
    assert {im.size for im in images} == {(16, 16)} and {im.mode for im in images} == {"RGB"}
    assert set(labels) == set(range(len(kind.labels)))
    again, labels2 = hub.draw(kind, 160, 16, np.random.default_rng(0), "train")
    assert labels == labels2 and np.array_equal(np.asarray(images[5]), np.asarray(again[5]))


def test_suite_is_registered_with_at_least_8_tasks_of_their_own_labels():
    listed = {s["name"]: s for s in list_suites()}
    assert listed["hub-tasks"]["init"] == "shared" and listed["hub-tasks"]["num_tasks"] >= 8
    tasks = hub.hub_tasks(16, 20, 10, seed=0)
    assert len(tasks) == SUITES["hub-tasks"].num_tasks
    label_sets = [tuple(t.labels) for t in tasks]
    assert len(set(label_sets)) == len(label_sets)


def test_upstream_mixture_has_more_kinds_and_other_labels_than_the_tasks():
    up = hub.upstream_mixture(16, 40, seed=0, group=2, groupings=2)
    task_labels = {label for t in hub.TASK_KINDS for label in t.labels}
    assert not task_labels & set(up.labels)
    assert len(hub.KINDS) > len(hub.TASK_KINDS)
    kinds_seen = {up.labels[y].split("/")[0] for y in up.train_labels}
    assert kinds_seen == {k.name for k in hub.KINDS}
    # coarse labels: a task kind with 8 classes has 4 upstream labels per grouping
    assert sum(name.startswith("road-signs/") for name in up.labels) == 8
    assert "digits/0|1" in up.labels and "digits/1|2" in up.labels and "digits/9|0" in up.labels
    task_kind_labels = [n for n in up.labels if n.split("/")[0] in {k.name for k in hub.TASK_KINDS}]
    assert all("|" in n for n in task_kind_labels)  # every upstream label of a task kind is a group
    one = hub.upstream_mixture(16, 10, seed=0, group=2, groupings=1)
    assert sum(name.startswith("road-signs/") for name in one.labels) == 4


def test_task_kinds_are_told_apart_from_pixels():
    """Each task has its own kind of image: a nearest-centroid rule on colour histograms separates them."""
    tasks = hub.hub_tasks(16, 60, 30, seed=1)

    def feats(images):
        a = np.stack([np.asarray(im, dtype=np.float64) / 255 for im in images])
        return np.concatenate([a.mean((1, 2)), a.std((1, 2))], axis=1)

    centroids = np.stack([feats(t.train_images).mean(0) for t in tasks])
    hits = []
    for k, t in enumerate(tasks):
        d = ((feats(t.test_images)[:, None] - centroids[None]) ** 2).sum(-1)
        hits += list(d.argmin(1) == k)
    assert np.mean(hits) > 0.7


def _micro(name: str = "hub-tasks"):
    """hub-tasks with a deliberately tiny architecture, data and recipe (seconds to build)."""
    size = replace(
        SIZES["tiny"], archs={"hub": ArchSpec(8, 4, 16, 1, 2, 32)}, hub_train=24, hub_test=12, hub_upstream=10
    )
    suite = replace(
        SUITES[name],
        recipes={"tiny": TrainSpec(0, 8, 1e-4, weight_decay=0.0, epochs=1)},
        pretrain_recipes={"tiny": TrainSpec(6, 16, 1e-3, max_shift=1)},
    )
    return suite, size


def test_rebuild_with_same_seed_versions_and_threads_gives_same_accuracies(tmp_path):
    suite, size = _micro()
    infos, weights = [], []
    for folder in ("a", "b"):
        out = tmp_path / folder
        build(suite, size, out, seed=3, quiet=True, overwrite=False)
        infos.append(json.loads((out / "build_info.json").read_text()))
        weights.append((out / "models" / "digits" / "model.safetensors").read_bytes())
    a, b = infos
    for key in ("torch_version", "transformers_version", "hf_vitmerge_version", "torch_num_threads"):
        assert a[key] is not None and a[key] == b[key]
    assert a["torch_num_threads"] == 1  # builds run single-threaded unless told otherwise
    assert a["individual_accuracy"] == b["individual_accuracy"]
    assert len(a["individual_accuracy"]) == suite.num_tasks
    assert a["realism"] == b["realism"]
    assert weights[0] == weights[1]
    real = a["realism"]
    assert -1 <= real["task_vector_cosine_median"] <= real["task_vector_cosine_max"] <= 1
    assert real["task_vector_relative_norm_median"] > 0
    assert 0 <= real["task_identifiability"] <= 1
    readme = (tmp_path / "a" / "README.md").read_text()
    assert "What makes it realistic" in readme and "Reproducibility" in readme and "Regime" in readme
    base_card = (tmp_path / "a" / "base" / "README.md").read_text()  # every model folder has a card
    assert "base_model` of" in base_card and "Pre-training data:" in base_card


def test_another_seed_changes_the_build(tmp_path):
    suite, size = _micro()
    build(suite, size, tmp_path / "a", seed=0, quiet=True, overwrite=False)
    build(suite, size, tmp_path / "b", seed=1, quiet=True, overwrite=False)
    a = (tmp_path / "a" / "models" / "digits" / "model.safetensors").read_bytes()
    b = (tmp_path / "b" / "models" / "digits" / "model.safetensors").read_bytes()
    assert a != b


def test_realism_figures_on_hand_made_task_vectors():
    from transformers import ViTConfig, ViTForImageClassification

    from hf_vitmerge.zoo import realism

    torch.manual_seed(0)
    cfg = ViTConfig(
        image_size=8,
        patch_size=4,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
    )
    base = ViTForImageClassification(cfg)
    a, b = ViTForImageClassification(cfg), ViTForImageClassification(cfg)
    a.load_state_dict(base.state_dict())
    b.load_state_dict(base.state_dict())
    with torch.no_grad():
        a.vit.embeddings.patch_embeddings.projection.weight.add_(1.0)
        b.vit.embeddings.patch_embeddings.projection.weight.add_(2.0)
        a.classifier.weight.add_(5.0)  # the classifier is not part of a task vector
    stats = realism.task_vector_stats(base, [a, b])
    assert stats["task_vector_cosine_median"] == pytest.approx(1.0)
    with torch.no_grad():
        b.vit.embeddings.patch_embeddings.projection.weight.sub_(4.0)  # now -2: opposite direction
    assert realism.task_vector_stats(base, [a, b])["task_vector_cosine_max"] == pytest.approx(-1.0)
