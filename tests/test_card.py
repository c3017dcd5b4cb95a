"""Model cards: valid front matter read back by huggingface_hub, every required field, results."""

from __future__ import annotations

import pytest
import yaml
from conftest import make_dataset, make_vit
from huggingface_hub import ModelCard

from hf_vitmerge.card import TEMPLATE, build_model_card, write_model_card
from hf_vitmerge.merging import execute, prepare
from hf_vitmerge.methods import get_method

RESULTS = {
    "per_task_accuracy": {"shape": 0.91, "colour": 0.74},
    "avg_task_accuracy": 0.825,
    "normalized_accuracy": 0.87,
    "joint_accuracy": 0.66,
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    base = make_vit(root / "base", labels=("x", "y"))
    make_vit(root / "shape", labels=("circle", "red"), seed=1, base=base)
    make_vit(root / "colour", labels=("red", "blue"), seed=2, base=base)
    make_dataset(root / "data", 2, n=6)
    return root


def _merged(zoo, run=True, **overrides):
    config = {
        "method": "ties",
        "base_model": str(zoo / "base"),
        "models": [
            {"model": str(zoo / "shape"), "task": "shape"},
            {"model": str(zoo / "colour"), "task": "colour"},
        ],
        "parameters": {"density": 0.5},
        "seed": 7,
        **overrides,
    }
    ctx = prepare(config, quiet=True)
    if not run:  # the card only needs the context (and loads the calibration data itself)
        return ctx, None, {"merge_seconds": 1.5, "stats_seconds": 2.0}
    model, info = execute(ctx)
    return ctx, model, info


def test_card_with_results_reads_back(zoo, tmp_path):
    ctx, model, info = _merged(zoo)
    model.save_pretrained(tmp_path)
    path = write_model_card(tmp_path, ctx, info, RESULTS)
    assert path == tmp_path / "README.md"
    assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    card = ModelCard.load(path)
    data = card.data
    assert data.base_model_relation == "merge"
    assert data.pipeline_tag == "image-classification" and data.library_name == "transformers"
    assert {"hf_vitmerge", "merge", "vit", "ties"} <= set(data.tags)
    assert data.base_model == [str(zoo / "shape"), str(zoo / "colour"), str(zoo / "base")]
    meta = data.to_dict()["hf_vitmerge"]
    assert meta["method"] == "ties" and meta["seed"] == 7
    assert meta["parameters"] == {**get_method("ties").defaults, "density": 0.5}  # defaults filled in
    assert meta["inputs"][0]["commit"] == str(zoo / "shape")  # local folder: its path
    # model-index: one accuracy per task plus the joint accuracy
    values = {(r.dataset_name, r.metric_value) for r in data.eval_results}
    assert ("shape", 0.91) in values and ("colour", 0.74) in values and 0.66 in {v for _, v in values}
    text = card.text
    assert "https://arxiv.org/abs/2306.01708" in text  # the method's paper
    assert "![Per-task accuracy](accuracy.png)" in text
    assert "| shape | 0.9100 |" in text and "| **joint** (union of labels, task unknown) | 0.6600 |" in text
    # label mapping: colliding names are prefixed with their task, and each row names its task
    assert "| 1 | shape:red | shape | red |" in text and "| 2 | colour:red | colour | red |" in text
    # the full config is embedded and parses back to the same config
    embedded = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(embedded) == yaml.safe_load(ctx.config.to_yaml())


def test_card_without_base_model_or_results_is_valid(zoo, tmp_path):
    ctx, model, info = _merged(zoo, method="average", base_model=None, parameters={})
    path = write_model_card(tmp_path, ctx, info)
    assert not (tmp_path / "accuracy.png").exists()
    card = ModelCard.load(path)
    assert card.data.base_model_relation == "merge"
    assert card.data.base_model == [str(zoo / "shape"), str(zoo / "colour")]
    assert card.data.eval_results is None and "model-index" not in card.content
    front = card.content.split("---\n")[1]
    assert isinstance(yaml.safe_load(front), dict)
    assert "## Evaluation" not in card.text


def test_card_records_calibration_data_and_hub_commits(zoo, tmp_path):
    data = {"path": str(zoo / "data")}
    ctx, _, info = _merged(
        zoo,
        run=False,
        method="fisher",
        base_model=None,
        parameters={},
        models=[
            {"model": str(zoo / "shape"), "task": "shape", "data": data},
            {"model": str(zoo / "colour"), "task": "colour", "data": data},
        ],
        calibration={"samples_per_task": 4, "batch_size": 4},
    )
    # a Hub input: the card must carry the resolved commit SHA
    sha = "0123456789abcdef0123456789abcdef01234567"
    ctx.sources[1].ref, ctx.sources[1].revision, ctx.sources[1].commit = "org/vit-colour", "v1", sha
    card = build_model_card(ctx, info)
    meta = card.data.to_dict()["hf_vitmerge"]
    assert meta["calibration"] == [
        {"task": "shape", "data": str(zoo / "data"), "split": "train", "samples": 4},
        {"task": "colour", "data": str(zoo / "data"), "split": "train", "samples": 4},
    ]
    assert meta["inputs"][1] == {"task": "colour", "model": "org/vit-colour", "revision": "v1", "commit": sha}
    assert "org/vit-colour" in card.data.base_model
    assert f"| colour | `org/vit-colour` | {sha} |" in card.text
    assert "| shape | `" + str(zoo / "data") + "` | train | 4 |" in card.text
    assert "Merge time: 1.5 s (+ 2.0 s collecting statistics)" in card.text


def test_template_is_shipped_with_the_package():
    assert TEMPLATE.is_file() and "{{ card_data }}" in TEMPLATE.read_text()
