"""The Python API as a Hugging Face user meets it: argument checks, a typed result that holds
no input model, one call for a complete folder, and pipeline() on every folder written."""

from __future__ import annotations

import gc

import pytest
import torch
import yaml
from conftest import assert_complete_merged_folder, make_vit
from PIL import Image

import hf_vitmerge as hv
from hf_vitmerge.errors import HFVitMergeError, InputError


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    base = make_vit(root / "base", labels=("x", "y"), seed=0)
    for i, labels in enumerate([("cat", "dog"), ("car", "bus", "van"), ("cat", "owl")]):
        make_vit(root / f"m{i}", labels=labels, seed=10 + i, base=base)
    return root


def _models(root):
    return [str(root / f"m{i}") for i in range(3)]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda r: hv.merge("org/vit-a"), r"single string 'org/vit-a'.*list of at least two"),
        (lambda r: hv.merge([str(r / "m0")]), "at least two models"),
        (lambda r: hv.merge([]), "at least two models"),
        (lambda r: hv.merge(_models(r), revisions=["main"]), "got 1 revisions for 3 models"),
        (lambda r: hv.merge(_models(r), tasks=["a", "b"]), "got 2 tasks for 3 models"),
        (lambda r: hv.merge(_models(r), data="./data"), "data=.*one entry per model"),
        (lambda r: hv.merge([str(r / "m0"), str(r / "m0") + "/"]), "listed twice"),
    ],
)
def test_merge_checks_its_arguments(trio, call, match):
    with pytest.raises(InputError, match=match) as info:
        call(trio)
    assert isinstance(info.value, ValueError) and isinstance(info.value, HFVitMergeError)


def test_merge_returns_a_pretrained_model_and_releases_the_inputs(trio):
    from transformers import PreTrainedModel, ViTForImageClassification

    gc.collect()
    before = {id(o) for o in gc.get_objects() if issubclass(type(o), ViTForImageClassification)}
    model = hv.merge(_models(trio), "average", heads="union", quiet=True)
    assert isinstance(model, PreTrainedModel) and model.config.num_labels == 7
    assert hv.merge.__annotations__["return"] in ("PreTrainedModel", PreTrainedModel)
    assert not hasattr(model, "merge_context") and "merge_seconds" in model.merge_info
    gc.collect()
    alive = [
        o for o in gc.get_objects() if issubclass(type(o), ViTForImageClassification) and id(o) not in before
    ]
    assert alive == [model]


def test_model_level_merge_releases_the_models_it_loaded(micro_suite, tmp_path):
    """zipit loads every input model: none of them outlives the merge, even while the run
    (which keeps its context for the card) is alive."""
    from transformers import ViTForImageClassification

    root = micro_suite.parent
    gc.collect()
    before = {id(o) for o in gc.get_objects() if issubclass(type(o), ViTForImageClassification)}
    config = {
        "method": "zipit",
        "models": [
            {
                "model": str(root / "models" / f"task{i}"),
                "data": {"path": str(root / "data" / f"task{i}" / "train")},
            }
            for i in range(2)
        ],
        "calibration": {"samples_per_task": 8, "batch_size": 8},
    }
    run = hv.run_merge(config, tmp_path / "zip", quiet=True)
    gc.collect()
    alive = [
        o for o in gc.get_objects() if issubclass(type(o), ViTForImageClassification) and id(o) not in before
    ]
    assert alive in ([], [run.model])
    assert all(s._model is None for s in run.context.sources)


def test_one_call_writes_a_complete_folder_that_pipeline_loads(trio, tmp_path):
    from transformers import pipeline

    folder = tmp_path / "merged"
    model = hv.merge(
        _models(trio),
        "task_arithmetic",
        base_model=str(trio / "base"),
        scaling=0.3,
        out_dir=folder,
        quiet=True,
    )
    assert_complete_merged_folder(folder)
    classifier = pipeline("image-classification", model=str(folder))
    preds = classifier(Image.new("RGB", (16, 16), (10, 200, 30)), top_k=model.config.num_labels)
    assert {p["label"] for p in preds} == set(model.config.id2label.values())
    with pytest.raises(InputError, match="already exists"):
        hv.merge(_models(trio), "average", out_dir=folder, quiet=True)


def test_save_merged_writes_the_folder_of_an_earlier_merge(trio, tmp_path):
    """``merge()`` without ``out_dir``, then ``save_merged``: the same complete folder (card with
    the method and the parameters used, resolved where left unset), refused when it exists."""
    from transformers import ViTForImageClassification, pipeline

    model = hv.merge(_models(trio), "dare", base_model=str(trio / "base"), quiet=True)
    folder = tmp_path / "later"
    run = hv.save_merged(model, folder)
    assert run.path == folder and run.push_url is None
    assert_complete_merged_folder(folder)
    saved = yaml.safe_load((folder / "merge_config.yaml").read_text())
    assert saved["method"] == "dare" and saved["parameters"]["scaling"] == 0.3  # dare's default over TA
    assert "scaling: 0.3" in (folder / "README.md").read_text()
    reloaded = ViTForImageClassification.from_pretrained(folder)
    for (name, p), q in zip(model.state_dict().items(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    pipeline("image-classification", model=str(folder))
    with pytest.raises(InputError, match="already exists"):
        hv.save_merged(model, folder)
    hv.save_merged(model, folder, overwrite=True)
    with pytest.raises(InputError, match="not returned by hf_vitmerge.merge"):
        hv.save_merged(ViTForImageClassification.from_pretrained(folder), tmp_path / "other")
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("heads", ["union", "multi"])
def test_run_merge_folders_work_in_pipeline(micro_suite, tmp_path, heads):
    from transformers import pipeline

    root = micro_suite.parent
    config = {
        "method": "average",
        "models": [str(root / "models" / f"task{i}") for i in range(3)],
        "heads": heads,
    }
    run = hv.run_merge(config, tmp_path / heads, quiet=True)
    classifier = pipeline("image-classification", model=str(run.path), trust_remote_code=heads == "multi")
    preds = classifier(Image.new("RGB", (16, 16)), top_k=3)
    assert len(preds) == 3 and all(0.0 <= p["score"] <= 1.0 for p in preds)
    scores = classifier.model(pixel_values=torch.zeros(1, 3, 16, 16)).logits
    assert scores.shape[-1] == 7
