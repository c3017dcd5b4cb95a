"""Loading and validation: local folders, the Hub cache offline, revisions, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import make_vit

from hf_vitmerge import IncompatibleModelError, ModelLoadError, load_models, resolve_model

SHA_MAIN = "a" * 40
SHA_V1 = "b" * 40


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """A Hugging Face cache pre-populated like a real download of `org/vit-a` (main and tag v1)."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--vit-a"
    for sha, seed in ((SHA_MAIN, 1), (SHA_V1, 2)):
        make_vit(repo / "snapshots" / sha, seed=seed)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA_MAIN)
    (repo / "refs" / "v1").write_text(SHA_V1)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return cache


def test_local_folder(tmp_path):
    make_vit(tmp_path / "m", seed=0)
    (src,) = load_models([tmp_path / "m"])
    assert src.commit is None and src.labels == ["a", "b", "c"]
    assert src.load_model().config.num_labels == 3
    reader = src.tensors()
    assert reader.get(src.adapter.key("q", "weight", 0)).shape == (32, 32)


def test_hub_ids_resolve_revisions_to_commits_offline(hf_cache):
    a, b = load_models(["org/vit-a", "org/vit-a"], revisions=[None, "v1"], load_weights=False)
    assert a.commit == SHA_MAIN and b.commit == SHA_V1
    assert a.path.name == SHA_MAIN and a.is_hub
    key = a.adapter.key("fc1", "weight", 1)
    assert not (a.tensors().get(key) == b.tensors().get(key)).all(), "revisions must load different weights"
    (c,) = load_models(["org/vit-a"], revisions=SHA_V1, load_weights=False)
    assert c.commit == SHA_V1


def test_hub_id_not_in_cache_offline(hf_cache):
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        resolve_model("org/missing")


def test_incompatible_models_named(tmp_path):
    make_vit(tmp_path / "a")
    make_vit(tmp_path / "b", hidden_size=48, intermediate_size=96)
    make_vit(tmp_path / "c", patch_size=8)
    with pytest.raises(IncompatibleModelError) as err:
        load_models([tmp_path / "a", tmp_path / "b", tmp_path / "c"], load_weights=False)
    msg = str(err.value)
    assert str(tmp_path / "b") in msg and "hidden_size: 32 vs 48" in msg and "intermediate_size" in msg
    assert str(tmp_path / "c") in msg and "patch_size: 4 vs 8" in msg


@pytest.mark.parametrize(
    "field,value,expect",
    [
        ("num_attention_heads", 2, "num_heads"),
        ("num_hidden_layers", 3, "num_layers"),
        ("hidden_act", "relu", "hidden_act"),
        ("num_channels", 1, "num_channels"),
        ("image_size", 32, "image_size"),
    ],
)
def test_each_architecture_field_is_checked(tmp_path, field, value, expect):
    make_vit(tmp_path / "a")
    make_vit(tmp_path / "b", **{field: value})
    with pytest.raises(IncompatibleModelError, match=expect):
        load_models([tmp_path / "a", tmp_path / "b"], load_weights=False)


def test_non_vit_model(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(IncompatibleModelError, match="'bert' model"):
        resolve_model(tmp_path / "bert")


def test_missing_and_corrupt_weights(tmp_path):
    make_vit(tmp_path / "m")
    shutil.copytree(tmp_path / "m", tmp_path / "corrupt")
    data = (tmp_path / "corrupt" / "model.safetensors").read_bytes()
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(data[:200])
    with pytest.raises(ModelLoadError, match="corrupt"):
        resolve_model(tmp_path / "corrupt")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="has no weights"):
        resolve_model(tmp_path / "m")


def test_weights_not_matching_config(tmp_path):
    make_vit(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["qkv_bias"] = False  # checkpoint still has q/k/v biases -> fine; but fewer layers is not
    cfg["num_hidden_layers"] = 3
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="missing"):
        resolve_model(tmp_path / "m")


def test_missing_folder_and_local_revision(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model("./no/such/folder")
    make_vit(tmp_path / "m")
    with pytest.raises(ModelLoadError, match="revision"):
        resolve_model(tmp_path / "m", revision="v2")


@pytest.mark.parametrize("pooler", [True, False])
def test_bare_backbone_with_and_without_pooler(tmp_path, pooler):
    from conftest import tiny_config
    from transformers import ViTModel

    ViTModel(tiny_config(), add_pooling_layer=pooler).save_pretrained(tmp_path / "bb")
    src = resolve_model(tmp_path / "bb")
    assert src.adapter.prefix == "" and src.adapter.num_labels is None
    assert src.adapter.has_pooler is pooler
    assert set(src.adapter.keys) == set(src.tensors().keys())


def test_mistyped_relative_folder_that_looks_like_a_hub_id(hf_cache, tmp_path, monkeypatch):
    make_vit(tmp_path / "models" / "task0", seed=0)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match=r"not a folder here.*Did you mean 'models/task0'"):
        resolve_model("models/taks0")


def test_card_of_a_hub_and_a_local_input_names_only_the_hub_id(hf_cache, tmp_path):
    """run_merge on a Hub model (from the cache) and a local folder: `base_model` holds the Hub id."""
    import yaml
    from hub_server import validate_metadata

    from hf_vitmerge import run_merge

    make_vit(tmp_path / "local", seed=5)
    run = run_merge({"method": "average", "models": ["org/vit-a", str(tmp_path / "local")]}, tmp_path / "out")
    front = yaml.safe_load((run.path / "README.md").read_text().split("---\n")[1])
    assert front["base_model"] == ["org/vit-a"] and front["base_model_relation"] == "merge"
    hub_input, local_input = front["hf_vitmerge"]["inputs"]
    assert hub_input["commit"] == SHA_MAIN and "weights_sha256" not in hub_input
    assert local_input["local"] is True and "commit" not in local_input
    assert validate_metadata(front) == []
