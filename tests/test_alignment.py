"""Alignment merging through a whole ViT: transforms, exactness on permuted copies, and the
permute / weight_matching / zipit / mudsc methods end to end on tiny random ViTs."""

from __future__ import annotations

import pytest
import torch
from conftest import make_dataset, make_vit

from hf_vitmerge import merge
from hf_vitmerge.alignment import resolve_stop_block, transform_model
from hf_vitmerge.arch import ViTAdapter
from hf_vitmerge.matching import permutation_transforms


def _randomise_norms(model, seed=0):
    """Random LayerNorm scales (some negative) and biases, so the test exercises them."""
    adapter = ViTAdapter.from_model(model)
    g = torch.Generator().manual_seed(seed)
    new = {}
    for p in adapter.params:
        if p.role in ("ln1", "ln2", "final_ln"):
            new[p.key] = torch.randn(p.shape, generator=g) * (1.0 if p.attr == "weight" else 0.2)
    adapter.load_state_dict(model, new, strict=False)
    return model


def _head_respecting_permutation(adapter: ViTAdapter, seed: int):
    """A random permutation transform set of one model: residual, per block one head permutation
    shared by QK and VO with separate within-head permutations, and an MLP permutation."""
    g = torch.Generator().manual_seed(seed)
    s = adapter.spec
    hd = s.hidden_size // s.num_heads
    out = {"residual": permutation_transforms([torch.randperm(s.hidden_size, generator=g)])}
    for i in range(s.num_layers):
        heads = torch.randperm(s.num_heads, generator=g)
        for kind in ("qk", "vo"):
            perm = torch.cat(
                [int(heads[h]) * hd + torch.randperm(hd, generator=g) for h in range(s.num_heads)]
            )
            out[f"{kind}.{i}"] = permutation_transforms([perm])
        out[f"mlp.{i}"] = permutation_transforms([torch.randperm(s.intermediate_size, generator=g)])
    return out


def _pixels(n=6, seed=0):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _permuted_copy(model, seed=1, labels=None):
    adapter = ViTAdapter.from_model(model)
    state = transform_model(
        adapter.state_dict(model), adapter.groups(), _head_respecting_permutation(adapter, seed)
    )
    copy = make_vit(labels=labels or tuple(model.config.id2label.values()), seed=123)
    ViTAdapter.from_model(copy).load_state_dict(copy, state)
    return copy.eval()


@torch.no_grad()
def test_permuting_a_model_preserves_its_function():
    model = _randomise_norms(make_vit(seed=0, initializer_range=0.3))
    copy = _permuted_copy(model)
    x = _pixels()
    assert (copy(x).logits - model(x).logits).abs().max() <= 1e-4
    # and it really moved the weights
    key = ViTAdapter.from_model(model).key("q", "weight", 0)
    assert not torch.allclose(model.state_dict()[_live(model, key)], copy.state_dict()[_live(copy, key)])


def _live(model, key):
    adapter = ViTAdapter.from_model(model)
    target = adapter.parameter(model, key)
    return next(n for n, p in model.named_parameters() if p is target)


@torch.no_grad()
def test_a_permutation_that_crosses_heads_breaks_the_function():
    """Sanity check of the test above: QK and VO with different head assignments are not exact."""
    model = make_vit(seed=0, initializer_range=0.3)
    adapter = ViTAdapter.from_model(model)
    t = _head_respecting_permutation(adapter, seed=3)
    s = adapter.spec
    hd = s.hidden_size // s.num_heads
    other = torch.cat([h * hd + torch.arange(hd) for h in (1, 0, 3, 2)])
    t["vo.0"] = permutation_transforms([t["vo.0"][0][0].argmax(1)[other]])
    state = transform_model(adapter.state_dict(model), adapter.groups(), t)
    copy = make_vit(seed=5)
    adapter.load_state_dict(copy, state)
    x = _pixels()
    assert (copy(x).logits - model(x).logits).abs().max() > 1e-3


@pytest.fixture(scope="module")
def permuted_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("aligned")
    model = _randomise_norms(make_vit(seed=0, initializer_range=0.3))
    from transformers import ViTImageProcessor

    model.save_pretrained(root / "a")
    _permuted_copy(model, seed=1).save_pretrained(root / "b")
    _permuted_copy(model, seed=1, labels=("d", "e", "f")).save_pretrained(root / "c")
    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    for name in ("a", "b", "c"):
        processor.save_pretrained(root / name)
    make_dataset(root / "data", 3, n=48, seed=0)
    return root, model


@torch.no_grad()
@pytest.mark.parametrize(
    "method,params",
    [
        ("permute", {}),
        ("permute", {"reference": "mean"}),
        ("permute", {"qk_features": "qk"}),
        ("zipit", {"beta": 0.0}),
        ("zipit", {"beta": 0.0, "qk_features": "qk"}),
        ("mudsc", {"solver": "hungarian", "lam": 0.0}),
    ],
)
def test_merging_a_model_with_its_permuted_copy_is_exact(permuted_pair, method, params):
    root, model = permuted_pair
    data = str(root / "data")
    merged = merge([str(root / "a"), str(root / "b")], method, data=[data, data], quiet=True, **params)
    x = _pixels(8, seed=4)
    assert (merged(x).logits - model(x).logits).abs().max() <= 1e-4


def test_qk_features_choose_the_statistics_of_the_qk_groups(permuted_pair):
    """``k``: correlations of the key outputs alone; ``qk``: query and key outputs stacked."""
    from hf_vitmerge.alignment import activation_similarities
    from hf_vitmerge.merging import prepare
    from hf_vitmerge.stats import collect_joint_stats

    root, _ = permuted_pair
    data = str(root / "data")
    models = [{"model": str(root / name), "data": {"path": data}} for name in ("a", "b")]
    ctx = prepare({"models": models, "method": "zipit"}, quiet=True)
    groups = [g for g in ctx.adapter.groups() if g.kind == "qk"]
    stats = collect_joint_stats(
        ctx.models(),
        [ctx.calibration_data(i) for i in range(2)],
        [s.image_processor() for s in ctx.sources],
        ["k_out.0", "qk.0"],
        quiet=True,
    )
    by_k = activation_similarities(ctx, groups, None, qk_features="k")
    by_qk = activation_similarities(ctx, groups, None, qk_features="qk")
    torch.testing.assert_close(by_k["qk.0"], stats["k_out.0"].correlation())
    torch.testing.assert_close(by_qk["qk.0"], stats["qk.0"].correlation())
    assert not torch.allclose(by_k["qk.0"], by_qk["qk.0"])
    with pytest.raises(ValueError, match="qk_features must be one of k, qk"):
        activation_similarities(ctx, groups, None, qk_features="q")


@torch.no_grad()
def test_weight_matching_recovers_a_permuted_copy(permuted_pair):
    root, model = permuted_pair
    merged = merge([str(root / "a"), str(root / "b")], "weight_matching", quiet=True)
    x = _pixels(8, seed=4)
    assert (merged(x).logits - model(x).logits).abs().max() <= 1e-4


@torch.no_grad()
def test_disjoint_labels_keep_both_heads(permuted_pair):
    root, model = permuted_pair
    data = str(root / "data")
    merged = merge([str(root / "a"), str(root / "c")], "permute", data=[data, data], quiet=True)
    assert list(merged.config.id2label.values()) == ["a", "b", "c", "d", "e", "f"]
    x = _pixels(8, seed=4)
    ref = model(x).logits
    out = merged(x).logits
    assert (out[:, :3] - ref).abs().max() <= 1e-4 and (out[:, 3:] - ref).abs().max() <= 1e-4


@torch.no_grad()
def test_partial_zip_is_exact_and_round_trips(permuted_pair, tmp_path):
    from transformers import AutoModelForImageClassification

    root, model = permuted_pair
    data = str(root / "data")
    merged = merge(
        [str(root / "a"), str(root / "c")], "zipit", data=[data, data], quiet=True, beta=0.0, stop_block=0.5
    )
    assert type(merged).__name__ == "ViTPartialZipForImageClassification"
    assert merged.config.stop_block == 1 and len(merged.trunk.layers) == 1 and len(merged.tails) == 2
    x = _pixels(8, seed=4)
    ref = torch.log_softmax(model(x).logits, -1)
    out = merged(x)
    torch.testing.assert_close(out.task_logits[0], model(x).logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.task_logits[1], model(x).logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.logits, torch.cat([ref, ref], -1), atol=1e-4, rtol=0)
    only_b = merged(x, task=1).logits
    assert torch.isinf(only_b[:, :3]).all()
    merged.save_pretrained(tmp_path / "pz")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "pz").eval()
    torch.testing.assert_close(loaded(x).logits, out.logits)


@pytest.mark.slow
@torch.no_grad()
def test_zip_and_mudsc_on_different_models_run_for_three_models(tmp_path):
    folders = []
    for i, labels in enumerate([("a", "b"), ("c", "d"), ("e", "f")]):
        make_vit(tmp_path / f"m{i}", labels=labels, seed=i)
        make_dataset(tmp_path / f"d{i}", 2, n=16, seed=i)
        folders.append(str(tmp_path / f"m{i}"))
    data = [str(tmp_path / f"d{i}") for i in range(3)]
    x = _pixels(4)
    for method, params in (("zipit", {}), ("mudsc", {"max_sweeps": 3}), ("zipit", {"stop_block": 1})):
        merged = merge(folders, method, data=data, quiet=True, **params)
        out = merged(x).logits
        assert out.shape == (4, 6) and torch.isfinite(out).all()
        assert merged.merge_info["stats_seconds"] >= 0


def test_stop_block_resolution_and_errors():
    assert resolve_stop_block(None, 12) is None
    assert resolve_stop_block(0.5, 12) == 6
    assert resolve_stop_block(0.75, 12) == 9
    assert resolve_stop_block(3, 12) == 3
    with pytest.raises(ValueError, match="stop_block"):
        resolve_stop_block(13, 12)
    with pytest.raises(ValueError, match="fraction"):
        resolve_stop_block(1.5, 12)
