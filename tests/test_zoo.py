"""The embedded benchmark zoo: data generators, registry, cache rules, and one real tiny build."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hf_vitmerge.zoo import SIZES, SUITES, build_suite, digits, list_suites, shapes
from hf_vitmerge.zoo.builder import fingerprint
from hf_vitmerge.zoo.train import (
    ArchSpec,
    TrainSpec,
    derive_seed,
    deterministic_torch,
    new_model,
    train_classifier,
)


def _arrays(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


def test_list_suites_matches_registry():
    listed = {s["name"]: s for s in list_suites()}
    assert set(listed) == {"digits-split", "digits-split5", "digits-domains", "shapes-tasks", "hub-tasks"}
    assert listed["digits-split"]["init"] == "independent" and listed["digits-split"]["num_tasks"] == 2
    assert listed["digits-split5"]["num_tasks"] == 5
    assert listed["digits-domains"]["init"] == "shared" and listed["digits-domains"]["num_tasks"] >= 5
    assert listed["shapes-tasks"]["init"] == "shared" and listed["shapes-tasks"]["num_tasks"] >= 10
    for s in listed.values():
        assert s["description"]


@pytest.mark.parametrize("name", ["digits-split", "digits-split5", "digits-domains"])
def test_registered_task_counts_match_generated_tasks(name):
    suite = SUITES[name]
    arch = SIZES["tiny"].archs[suite.family]
    assert len(suite.tasks(SIZES["tiny"], arch, 0)) == suite.num_tasks


def test_unknown_suite_or_size_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match="digits-split5"):
        build_suite("mnist", tmp_path / "x")
    with pytest.raises(ValueError, match="tiny, small, base"):
        build_suite("digits-split", tmp_path / "x", size="huge")
    assert not (tmp_path / "x").exists()


def test_digit_label_split_tasks():
    tasks = digits.label_split_tasks([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], 16, seed=0)
    assert [t.name for t in tasks] == ["digits-0to4", "digits-5to9"]
    assert tasks[1].labels == ["5", "6", "7", "8", "9"]
    total = sum(len(t.train_images) + len(t.test_images) for t in tasks)
    assert total == 1797
    for t in tasks:
        assert set(t.train_labels) == set(t.test_labels) == set(range(5))
        assert 0.2 < len(t.test_images) / (len(t.train_images) + len(t.test_images)) < 0.3
        im = t.train_images[0]
        assert im.mode == "RGB" and im.size == (16, 16)
    two = digits.label_split_tasks([[0, 1], [2, 3]], 16, seed=0)
    assert [t.name for t in two] == ["digits-01", "digits-23"]


def test_digit_split_is_seeded():
    _, targets = digits.digit_arrays(16)
    a, b = digits.split_indices(targets, 0), digits.split_indices(targets, 0)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], digits.split_indices(targets, 1)[1])
    assert not set(a[0]) & set(a[1])


def test_digit_domains_change_the_inputs_and_keep_labels():
    original = digits.original_digits(16, seed=0)
    names = list(digits.DOMAINS)
    tasks = digits.domain_tasks(names, 16, seed=0)
    base = _arrays(original.test_images).astype(float)
    for t in tasks:
        assert t.labels == digits.DIGIT_LABELS
        assert t.test_labels == original.test_labels
        x = _arrays(t.test_images).astype(float)
        assert x.shape == base.shape
        assert np.abs(x - base).mean() > 10, t.name  # a real change of the input distribution
    again = digits.domain_tasks(names, 16, seed=0)
    for t, u in zip(tasks, again, strict=True):
        assert np.array_equal(_arrays(t.train_images), _arrays(u.train_images))


@pytest.mark.parametrize("task", shapes.SHAPE_TASKS, ids=lambda t: t.name)
def test_shape_generators(task):
    images, labels = shapes.draw_samples(task, 120, 24, np.random.default_rng(0))
    assert all(im.mode == "RGB" and im.size == (24, 24) for im in images)
    assert set(labels) == set(range(len(task.labels)))
    again, labels2 = shapes.draw_samples(task, 120, 24, np.random.default_rng(0))
    assert labels == labels2 and np.array_equal(_arrays(images), _arrays(again))
    other, _ = shapes.draw_samples(task, 120, 24, np.random.default_rng(1))
    assert not np.array_equal(_arrays(images), _arrays(other))


def test_shape_tasks_have_own_label_spaces():
    assert len(shapes.SHAPE_TASKS) >= 10
    assert len({t.name for t in shapes.SHAPE_TASKS}) == len(shapes.SHAPE_TASKS)
    assert len({t.labels for t in shapes.SHAPE_TASKS}) == len(shapes.SHAPE_TASKS)
    mix = shapes.source_mixture(24, 5, seed=0)
    assert mix.labels == [t.name for t in shapes.SHAPE_TASKS]
    assert mix.train_labels == [k for k in range(len(shapes.SHAPE_TASKS)) for _ in range(5)]


def test_shape_colour_labels_match_pixels():
    task = next(t for t in shapes.SHAPE_TASKS if t.name == "shape-color")
    images, labels = shapes.draw_samples(task, 60, 24, np.random.default_rng(3))
    palette = np.array(list(shapes.PALETTE.values()), dtype=float)
    for im, label in zip(images, labels, strict=True):
        px = np.asarray(im)[2:-2, 2:-2].reshape(-1, 3).astype(float)  # inside the task's 2-pixel frame
        saturated = px[px.max(1) - px.min(1) > 60]  # the shape; the background is gray
        nearest = np.argmin(((saturated.mean(0) - palette) ** 2).sum(1))
        assert nearest == label


def test_derive_seed_is_stable():
    assert derive_seed(0, "digits-split", 1) == derive_seed(0, "digits-split", 1)
    assert derive_seed(0, "digits-split", 1) != derive_seed(0, "digits-split", 2)
    assert 0 <= derive_seed("x") < 2**31


def test_training_is_deterministic_and_learns():
    arch = ArchSpec(8, 4, 16, 1, 2, 32)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 8, 8, generator=gen)
    y = (x[:, 0].mean((1, 2)) > 0).long()
    spec = TrainSpec(steps=60, batch_size=16, lr=3e-3, max_shift=1)
    states = []
    with deterministic_torch():
        for _ in range(2):
            model = train_classifier(new_model(arch, ["neg", "pos"], 1), x, y, spec, seed=5, quiet=True)
            states.append(model.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    untrained = new_model(arch, ["neg", "pos"], 1)
    assert not torch.equal(untrained.classifier.weight, states[0]["classifier.weight"])


def test_existing_foreign_folder_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        build_suite("digits-split", tmp_path, quiet=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_other_build_is_refused(tmp_path):
    (tmp_path / "suite.json").write_text("{}")
    (tmp_path / "build_info.json").write_text(
        json.dumps({"fingerprint": fingerprint("digits-split", "tiny", 1)})
    )
    with pytest.raises(FileExistsError, match="different zoo build"):
        build_suite("digits-split", tmp_path, seed=0, quiet=True)


def test_cached_build_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_VITMERGE_CACHE", str(tmp_path))
    out = tmp_path / "zoo" / "digits-split-tiny-seed3"
    out.mkdir(parents=True)
    (out / "suite.json").write_text("{}")
    (out / "build_info.json").write_text(json.dumps({"fingerprint": fingerprint("digits-split", "tiny", 3)}))
    assert build_suite("digits-split", seed=3, quiet=True) == out / "suite.json"


@pytest.mark.slow
def test_build_digits_split_tiny(tmp_path):
    from datasets import load_from_disk
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from hf_vitmerge.suite import load_suite

    out = tmp_path / "suite"
    path = build_suite("digits-split", out, size="tiny", seed=0, quiet=True)
    assert path == out / "suite.json"
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "build_info.json",
        "data",
        "models",
        "suite.json",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name != "suite"]  # no temporary folder left behind

    raw = json.loads(path.read_text())
    assert raw["name"] == "digits-split" and raw["init"] == "independent" and raw["base_model"] is None
    assert raw["size"] == "tiny" and raw["seed"] == 0
    suite = load_suite(path)
    assert suite.task_names == ["digits-0to4", "digits-5to9"]
    configs = []
    for entry, task in zip(raw["tasks"], suite.tasks, strict=True):
        assert set(entry) >= {"name", "model", "labels", "train", "test", "image_column", "label_column"}
        for f in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md"):
            assert (task.model / f).is_file()
        model = AutoModelForImageClassification.from_pretrained(task.model).eval()
        assert [model.config.id2label[i] for i in range(len(task.labels))] == list(task.labels)
        processor = AutoImageProcessor.from_pretrained(task.model)
        test = load_from_disk(str(task.test))
        assert len(load_from_disk(str(task.train))) > 2 * len(test)
        pixels = processor(list(test["image"]), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            pred = model(pixel_values=pixels).logits.argmax(-1)
        acc = float((pred == torch.tensor(list(test["label"]))).float().mean())
        assert acc == pytest.approx(entry["individual_accuracy"], abs=1e-6)
        assert acc >= 0.9
        cfg = json.loads((task.model / "config.json").read_text())
        configs.append({k: v for k, v in cfg.items() if k not in ("id2label", "label2id")})
    assert configs[0] == configs[1]

    # cached: a second call returns at once without touching the files
    stamp = (out / "models" / "digits-0to4" / "model.safetensors").stat().st_mtime_ns
    assert build_suite("digits-split", out, size="tiny", seed=0, quiet=True) == path
    assert (out / "models" / "digits-0to4" / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError):
        build_suite("digits-split", out, size="tiny", seed=1, quiet=True)

    # deterministic: an independent rebuild gives byte-identical weights
    again = build_suite("digits-split", tmp_path / "again", size="tiny", seed=0, quiet=True).parent
    for name in suite.task_names:
        a = (out / "models" / name / "model.safetensors").read_bytes()
        b = (again / "models" / name / "model.safetensors").read_bytes()
        assert a == b, name
