"""Model cards: valid front matter read back by huggingface_hub, every required field, results."""

from __future__ import annotations

import hashlib

import pytest
import yaml
from conftest import make_dataset, make_vit
from hub_server import validate_metadata
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
    # only Hub ids may stand in `base_model`: every input here is a local folder
    assert data.base_model is None and getattr(data, "base_model_relation", None) is None
    assert validate_metadata(data.to_dict()) == []
    assert data.pipeline_tag == "image-classification" and data.library_name == "transformers"
    assert {"hf_vitmerge", "merge", "vit", "ties"} <= set(data.tags)
    meta = data.to_dict()["hf_vitmerge"]
    assert meta["method"] == "ties" and meta["seed"] == 7
    assert meta["parameters"] == {**get_method("ties").defaults, "density": 0.5}  # defaults filled in
    # local inputs: listed with the sha256 of their weights, no commit
    sha = hashlib.sha256((zoo / "shape" / "model.safetensors").read_bytes()).hexdigest()
    assert meta["inputs"][0] == {
        "task": "shape",
        "model": str(zoo / "shape"),
        "local": True,
        "weights_sha256": {"model.safetensors": sha},
    }
    base_sha = hashlib.sha256((zoo / "base" / "model.safetensors").read_bytes()).hexdigest()
    assert meta["base_model"]["weights_sha256"] == {"model.safetensors": base_sha}
    # model-index only names Hub datasets: these results (no suite on the Hub) stay in the text
    assert data.eval_results is None and "model-index" not in card.content
    text = card.text
    assert f"| shape | `{zoo / 'shape'}` | local folder; weights sha256 model.safetensors `{sha}` |" in text
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
    assert card.data.base_model is None and getattr(card.data, "base_model_relation", None) is None
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
    # the Hub input is the only base model; the local one is not there
    assert card.data.base_model == ["org/vit-colour"] and card.data.base_model_relation == "merge"
    assert validate_metadata(card.data.to_dict()) == []
    assert f"| colour | `org/vit-colour` | v1 (`{sha}`) |" in card.text
    assert "| shape | `" + str(zoo / "data") + "` | train | 4 |" in card.text
    assert "Merge time: 1.5 s (+ 2.0 s collecting statistics)" in card.text


def test_template_is_shipped_with_the_package():
    assert TEMPLATE.is_file() and "{{ card_data }}" in TEMPLATE.read_text()


def test_hub_metadata_rules_reject_local_paths_and_bad_model_index():
    """The test Hub applies the Hub's rules, so the card tests above can fail."""
    assert validate_metadata({"base_model": ["org/vit", "google/vit-base-patch16-224"]}) == []
    assert validate_metadata({"base_model": "/tmp/zoo/models/inverted"})
    assert validate_metadata({"base_model": ["org/vit", "./models/a"]})
    assert validate_metadata({"datasets": ["/data/digits"]})
    bad_index = [
        {
            "name": "m",
            "results": [
                {
                    "task": {"type": "image-classification"},
                    "dataset": {"type": "/tmp/data/test", "name": "t"},
                    "metrics": [{"type": "accuracy", "value": 0.9}],
                }
            ],
        }
    ]
    assert any("dataset.type" in e for e in validate_metadata({"model-index": bad_index}))
    bad_index[0]["results"][0]["dataset"]["type"] = "org/digits"
    assert validate_metadata({"model-index": bad_index}) == []
    del bad_index[0]["results"][0]["metrics"]
    assert validate_metadata({"model-index": bad_index})
