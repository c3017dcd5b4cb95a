"""The ViT adapter: every parameter classified exactly once, merge groups, 4.x checkpoint keys."""

from __future__ import annotations

import shutil
from collections import Counter

import pytest
import torch
from conftest import make_vit, tiny_config
from transformers import ViTForImageClassification, ViTModel

from hf_vitmerge.arch import IncompatibleModelError, ViTAdapter, check_compatible

CONFIGS = [
    {},
    {"qkv_bias": False},
    {"patch_size": 8},
    {"hidden_size": 48, "num_attention_heads": 6, "intermediate_size": 96, "num_hidden_layers": 3},
    {"image_size": 24, "patch_size": 6},
]


@pytest.mark.parametrize("overrides", CONFIGS)
def test_every_parameter_classified_exactly_once(overrides):
    model = ViTForImageClassification(tiny_config(**overrides))
    adapter = ViTAdapter.from_model(model)
    live = {id(p): name for name, p in model.named_parameters()}
    mapped = Counter(id(adapter.parameter(model, k)) for k in adapter.keys)
    assert set(mapped) == set(live), "adapter keys must cover exactly the model's parameters"
    assert max(mapped.values()) == 1
    kinds = Counter(p.kind for p in adapter.params)
    assert sum(kinds.values()) == len(live)
    for p in adapter.params:
        assert tuple(adapter.parameter(model, p.key).shape) == p.shape, p.key
    cfg = model.config
    assert kinds["attention"] == cfg.num_hidden_layers * (8 if cfg.qkv_bias else 5)
    assert kinds["mlp"] == cfg.num_hidden_layers * 4
    assert kinds["norm"] == cfg.num_hidden_layers * 4 + 2
    assert kinds["embeddings"] == 4 and kinds["head"] == 2


@pytest.mark.parametrize("overrides", CONFIGS)
def test_canonical_keys_are_checkpoint_keys(overrides, tmp_path):
    from safetensors import safe_open

    model = ViTForImageClassification(tiny_config(**overrides))
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        file_keys = set(f.keys())
    adapter = ViTAdapter.from_model(model)
    assert file_keys == set(adapter.keys)
    for name, _ in model.named_parameters():  # in-memory names map back to canonical keys
        assert adapter.canonical_key(name) in file_keys, name


def test_bare_backbone_with_pooler():
    model = ViTModel(tiny_config(), add_pooling_layer=True)
    adapter = ViTAdapter.from_model(model)
    assert adapter.prefix == "" and adapter.num_labels is None
    assert {id(p) for p in model.parameters()} == {id(adapter.parameter(model, k)) for k in adapter.keys}
    assert adapter.key("pooler", "weight") in adapter.keys_of_kind("head")


@pytest.mark.parametrize("overrides", CONFIGS)
def test_merge_groups_touch_each_axis_once_and_match_shapes(overrides):
    model = ViTForImageClassification(tiny_config(**overrides))
    adapter = ViTAdapter.from_model(model)
    seen = Counter()
    for g in adapter.groups():
        for key, axis in g.touches():
            assert adapter.info(key).shape[axis] == g.size, (g.name, key, axis)
            seen[(key, axis)] += 1
        if g.kind in ("qk", "vo"):
            assert g.num_heads == model.config.num_attention_heads and g.head_dim * g.num_heads == g.size
    assert max(seen.values()) == 1, "a (parameter, axis) pair belongs to one group only"
    # every parameter's every feature axis is covered, except the spatial axes of the patch kernel, the
    # token axis of the position embedding and the classifier's label axis
    covered = {k for k, _ in seen}
    assert covered == set(adapter.keys) - {adapter.key("classifier", "bias")}
    cfg = model.config
    names = [g.name for g in adapter.groups()]
    assert names[0] == "residual" and len(names) == 1 + 3 * cfg.num_hidden_layers


# The key set of a ViTForImageClassification checkpoint written by transformers 4.x
# (modeling_vit.py of 4.x: ViTSelfAttention query/key/value, ViTSelfOutput dense, ViTIntermediate
# and ViTOutput dense), written out by hand, with the shape of each tensor for TINY.
def _v4_checkpoint_shapes(layers: int = 2, h: int = 32, inter: int = 64, patch: int = 4, labels: int = 3):
    tokens = (16 // patch) ** 2 + 1
    shapes = {
        "vit.embeddings.cls_token": (1, 1, h),
        "vit.embeddings.position_embeddings": (1, tokens, h),
        "vit.embeddings.patch_embeddings.projection.weight": (h, 3, patch, patch),
        "vit.embeddings.patch_embeddings.projection.bias": (h,),
        "vit.layernorm.weight": (h,),
        "vit.layernorm.bias": (h,),
        "classifier.weight": (labels, h),
        "classifier.bias": (labels,),
    }
    for i in range(layers):
        p = f"vit.encoder.layer.{i}."
        for name in ("attention.attention.query", "attention.attention.key", "attention.attention.value"):
            shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (h, h), (h,)
        shapes[p + "attention.output.dense.weight"], shapes[p + "attention.output.dense.bias"] = (h, h), (h,)
        shapes[p + "intermediate.dense.weight"], shapes[p + "intermediate.dense.bias"] = (inter, h), (inter,)
        shapes[p + "output.dense.weight"], shapes[p + "output.dense.bias"] = (h, inter), (h,)
        for ln in ("layernorm_before", "layernorm_after"):
            shapes[p + ln + ".weight"], shapes[p + ln + ".bias"] = (h,), (h,)
    return shapes


def _write_v4_checkpoint(folder, seed: int) -> dict[str, torch.Tensor]:
    """A model folder as transformers 4.x saved it: 4.x keys, a 4.x config.json."""
    import json

    from safetensors.torch import save_file
    from transformers import ViTImageProcessor

    g = torch.Generator().manual_seed(seed)
    tensors = {k: 0.2 * torch.randn(shape, generator=g) for k, shape in _v4_checkpoint_shapes().items()}
    for k in tensors:  # LayerNorm weights near one, as in a trained model
        if "layernorm" in k and k.endswith("weight"):
            tensors[k] += 1.0
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = tiny_config().to_dict()
    config.update(architectures=["ViTForImageClassification"], transformers_version="4.46.3")
    (folder / "config.json").write_text(json.dumps(config))
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    return tensors


def test_canonical_keys_are_the_transformers_4x_checkpoint_keys():
    adapter = ViTAdapter.from_model(ViTForImageClassification(tiny_config()))
    assert set(adapter.keys) == set(_v4_checkpoint_shapes())
    for key, shape in _v4_checkpoint_shapes().items():
        assert adapter.info(key).shape == shape, key


def test_a_transformers_4x_checkpoint_merges_and_saves_with_4x_keys(tmp_path):
    from safetensors.torch import load_file

    from hf_vitmerge import merge

    a = _write_v4_checkpoint(tmp_path / "a", seed=1)
    b = _write_v4_checkpoint(tmp_path / "b", seed=2)
    merged = merge([tmp_path / "a", tmp_path / "b"], "average", quiet=True)
    merged.save_pretrained(tmp_path / "out")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(out) == set(a)  # written back with the 4.x keys
    for key in a:
        torch.testing.assert_close(out[key], (a[key] + b[key]) / 2, msg=key)
    # the merge of a checkpoint with itself is the model transformers loads from that folder
    shutil.copytree(tmp_path / "a", tmp_path / "a-copy")  # the same model listed twice is refused
    same = merge([tmp_path / "a", tmp_path / "a-copy"], "average", quiet=True)
    reference = ViTForImageClassification.from_pretrained(tmp_path / "a").eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(same(x).logits, reference(x).logits)


def test_state_dict_round_trip():
    a, b = make_vit(seed=1), make_vit(seed=2)
    adapter = ViTAdapter.from_model(a)
    adapter.load_state_dict(b, adapter.state_dict(a))
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(a(x).logits, b(x).logits)
    with pytest.raises(KeyError, match="missing"):
        adapter.load_state_dict(b, {})


def test_check_compatible_names_models_and_fields():
    a = ViTAdapter.from_config(tiny_config())
    b = ViTAdapter.from_config(tiny_config(hidden_size=48, num_attention_heads=4))
    c = ViTAdapter.from_config(tiny_config(qkv_bias=False))
    with pytest.raises(IncompatibleModelError) as err:
        check_compatible({"model-a": a, "model-b": b, "model-c": c})
    msg = str(err.value)
    # each value is paired with its own model: model-a has 32, model-b has 48
    assert "'model-a' vs 'model-b': hidden_size: 32 vs 48" in msg
    assert "model-c" in msg and "qkv_bias" in msg
    check_compatible({"x": a, "y": ViTAdapter.from_config(tiny_config(labels=("p", "q")))})


def test_non_vit_rejected():
    from transformers import BertConfig

    with pytest.raises(IncompatibleModelError, match="model_type"):
        ViTAdapter.from_config(BertConfig())
