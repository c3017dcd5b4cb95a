"""The ViT adapter: every parameter classified exactly once, merge groups, both module layouts."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import make_vit, tiny_config
from torch import nn
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


class _V4Attention(nn.Module):
    def __init__(self, att):
        super().__init__()
        self.attention = nn.Module()
        self.attention.query, self.attention.key, self.attention.value = att.q_proj, att.k_proj, att.v_proj
        self.output = nn.Module()
        self.output.dense = att.o_proj


class _V4Layer(nn.Module):
    """The transformers 4.x module layout, built around a 5.x layer's modules."""

    def __init__(self, layer):
        super().__init__()
        self.attention = _V4Attention(layer.attention)
        self.intermediate, self.output = nn.Module(), nn.Module()
        self.intermediate.dense, self.output.dense = layer.mlp.fc1, layer.mlp.fc2
        self.layernorm_before, self.layernorm_after = layer.layernorm_before, layer.layernorm_after


def test_transformers_4x_module_layout_resolves_to_the_same_tensors():
    model = ViTForImageClassification(tiny_config())
    blocks = getattr(model.vit, "layers", None)
    if blocks is None:
        pytest.skip("installed transformers already uses the 4.x layout")
    v4 = nn.Module()
    v4.config = model.config
    v4.classifier = model.classifier
    v4.vit = nn.Module()
    v4.vit.embeddings, v4.vit.layernorm = model.vit.embeddings, model.vit.layernorm
    v4.vit.encoder = nn.Module()
    v4.vit.encoder.layer = nn.ModuleList(_V4Layer(b) for b in blocks)
    a5, a4 = ViTAdapter.from_model(model), ViTAdapter.from_model(v4)
    assert a4.keys == a5.keys
    for key in a5.keys:
        assert a4.parameter(v4, key) is a5.parameter(model, key)
    # under 4.x the in-memory names equal the canonical keys
    assert {n for n, _ in v4.named_parameters()} == set(a4.keys)


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
