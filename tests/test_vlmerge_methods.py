"""Sung et al.'s multimodal-merging methods (interpolation, modality arithmetic) and per-group recipes."""

from __future__ import annotations

import pytest
import torch
from conftest import make_vit

from hf_vitmerge import ViTAdapter, merge
from hf_vitmerge.config import ConfigError
from hf_vitmerge.merging import MergeResult
from hf_vitmerge.methods import get_method, registry

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- interpolation
def test_interpolation_hand_computed():
    interp = get_method("interpolation")
    assert set(interp.defaults) == {"weights"} and "2304.14933" in interp.reference
    a, b = torch.tensor([1.0, 3.0]), torch.tensor([3.0, -1.0])
    torch.testing.assert_close(interp.fn([a, b], None), torch.tensor([2.0, 1.0]))
    # weights [3, 1] -> [0.75, 0.25]: 0.75 * [1, 3] + 0.25 * [3, -1] = [1.5, 2.0]
    torch.testing.assert_close(interp.fn([a, b], None, weights=[3, 1]), torch.tensor([1.5, 2.0]))
    # three experts with merge_ratio r = 0.3: [2r/3, 2(1-r)/3, 1/3] = [0.2, 7/15, 1/3]
    c = torch.tensor([0.0, 6.0])
    out = interp.fn([a, b, c], None, weights=[0.2, 7 / 15, 1 / 3])
    torch.testing.assert_close(out, torch.tensor([0.2 + 7 / 5, 0.6 - 7 / 15 + 2.0]))
    for bad in ([1.0], [1.0, -1.0], [0.0, 0.0]):
        with pytest.raises(ValueError, match="interpolation"):
            interp.fn([a, b], None, weights=bad)


def test_interpolation_with_weight_one_returns_that_model(tmp_path):
    m0 = make_vit(tmp_path / "a", seed=1)
    make_vit(tmp_path / "b", seed=2)
    merged = merge([tmp_path / "a", tmp_path / "b"], "interpolation", weights=[1.0, 0.0], quiet=True)
    torch.testing.assert_close(merged(X).logits, m0(X).logits)


# ----------------------------------------------------------------------------- modality arithmetic
def _released_code_replica(seed: torch.Tensor, experts: list[torch.Tensor], lam: float) -> torch.Tensor:
    """vl-merging's ``sum_task_vectors`` loop: the accumulator *is* the seed tensor (aliased)."""
    later_weight = seed
    for theta in experts:
        later_weight += lam * (theta - seed)
    return later_weight


def test_modality_arithmetic_matches_formula_not_aliased_code():
    spec = get_method("modality_arithmetic")
    assert spec.needs_base and set(spec.defaults) == {"scaling"}
    seed, v, lang = torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([5.0])
    out = spec.fn([v, lang], seed, scaling=0.75)
    # theta_0 + 0.75 * ((3 - 1) + (5 - 1)) = 1 + 4.5
    torch.testing.assert_close(out, torch.tensor([5.5]))
    torch.testing.assert_close(seed, torch.tensor([1.0]))  # the base tensor is left unchanged
    torch.testing.assert_close(spec.fn([v, lang], seed), torch.tensor([5.5]))  # 0.75 is the default
    # the released code's in-place update gives (1-l)^2 * 1 + l(1-l) * 3 + l * 5 = 4.375
    aliased_seed = seed.clone()
    torch.testing.assert_close(_released_code_replica(aliased_seed, [v, lang], 0.75), torch.tensor([4.375]))
    assert aliased_seed.item() == 4.375  # ... and it overwrote its seed


def test_modality_arithmetic_needs_base(tmp_path):
    make_vit(tmp_path / "a", seed=1)
    make_vit(tmp_path / "b", seed=2)
    with pytest.raises(ConfigError, match="base_model"):
        merge([tmp_path / "a", tmp_path / "b"], "modality_arithmetic", quiet=True)


def test_paper_names_merge_like_the_methods_they_alias(tmp_path):
    # interpolation is average and modality_arithmetic is task_arithmetic under the paper's names:
    # same weights for the same parameters, on real models (heads included).
    base = make_vit(tmp_path / "base", seed=0)
    for i in (1, 2, 3):
        make_vit(tmp_path / f"m{i}", seed=i, base=base)
    paths = [tmp_path / f"m{i}" for i in (1, 2, 3)]
    b = str(tmp_path / "base")
    pairs = [
        (("interpolation", {"weights": [0.2, 0.3, 0.5]}), ("average", {"weights": [0.2, 0.3, 0.5]})),
        (("modality_arithmetic", {"base_model": b}), ("task_arithmetic", {"base_model": b, "scaling": 0.75})),
    ]
    for (name, kw), (same, same_kw) in pairs:
        x, y = merge(paths, name, quiet=True, **kw), merge(paths, same, quiet=True, **same_kw)
        sx, sy = (ViTAdapter.from_model(m).state_dict(m) for m in (x, y))
        assert sx.keys() == sy.keys()
        for key in sx:
            torch.testing.assert_close(sx[key], sy[key], rtol=0, atol=0, msg=f"{name} {key}")
    with pytest.raises(ValueError, match="interpolation: got 1 weights"):
        get_method("interpolation").fn([torch.zeros(2), torch.ones(2)], None, weights=[1.0])


# ----------------------------------------------------------------------------- per-group recipes
@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    base = make_vit(root / "base", seed=0)
    a = make_vit(root / "a", seed=1, base=base)
    b = make_vit(root / "b", seed=2, base=base)
    make_vit(root / "c", labels=("u", "v"), seed=3, base=base)
    sds = [ViTAdapter.from_model(m).state_dict(m) for m in (base, a, b)]
    return root, sds


def _config(root, **extra):
    return {
        "method": "average",
        "base_model": str(root / "base"),
        "models": [str(root / "a"), str(root / "b")],
        **extra,
    }


def test_per_group_recipes_hand_checked(family):
    root, (s0, sa, sb) = family
    groups = {
        "attention": {"method": "task_arithmetic", "parameters": {"scaling": 1.0}},
        "norm": {"method": "interpolation", "parameters": {"weights": [1.0, 0.0]}},
        "head": {"method": "modality_arithmetic", "parameters": {"scaling": 0.5}},
    }
    merged = merge(_config(root, groups=groups), quiet=True)
    ad = ViTAdapter.from_model(merged)
    out = ad.state_dict(merged)
    q = ad.key("q", "weight", 1)
    torch.testing.assert_close(out[q], s0[q] + (sa[q] - s0[q]) + (sb[q] - s0[q]))
    ln = ad.key("ln2", "bias", 0)
    torch.testing.assert_close(out[ln], sa[ln])
    final = ad.key("final_ln", "weight")
    torch.testing.assert_close(out[final], sa[final])
    fc1 = ad.key("fc1", "weight", 0)  # mlp: the top-level default (average)
    torch.testing.assert_close(out[fc1], (sa[fc1] + sb[fc1]) / 2)
    pos = ad.key("pos", "")
    torch.testing.assert_close(out[pos], (sa[pos] + sb[pos]) / 2)
    w = ad.key("classifier", "weight")
    torch.testing.assert_close(out[w], s0[w] + 0.5 * ((sa[w] - s0[w]) + (sb[w] - s0[w])))
    info = merged.merge_info["per_group"]
    assert info["attention"] == {"method": "task_arithmetic", "parameters": {"scaling": 1.0}}
    assert info["mlp"]["method"] == "average" and info["embeddings"]["method"] == "average"
    assert info["head"]["method"] == "modality_arithmetic"


def test_per_group_uses_model_level_methods_once(family, monkeypatch):
    root, (s0, sa, sb) = family
    calls = []

    def doubled_average(ctx, *, factor: float = 2.0) -> MergeResult:
        calls.append(factor)
        avg = ctx.run_tensorwise(get_method("average"), {"weights": None}, ctx.adapter.backbone_keys)
        return MergeResult(backbone={k: factor * v for k, v in avg.items()}, info={"factor": factor})

    spec = registry.MethodSpec(
        "test_model_level", doubled_average, "model", False, False, "", {"factor": 2.0}
    )
    monkeypatch.setitem(registry._REGISTRY, "test_model_level", spec)
    groups = {"attention": {"method": "test_model_level"}, "mlp": {"method": "test_model_level"}}
    merged = merge(
        _config(root, method="task_arithmetic", parameters={"scaling": 0.3}, groups=groups), quiet=True
    )
    assert calls == [2.0]
    ad = ViTAdapter.from_model(merged)
    out = ad.state_dict(merged)
    fc2 = ad.key("fc2", "weight", 1)
    torch.testing.assert_close(out[fc2], sa[fc2] + sb[fc2])
    ln = ad.key("ln1", "weight", 0)
    torch.testing.assert_close(out[ln], s0[ln] + 0.3 * ((sa[ln] - s0[ln]) + (sb[ln] - s0[ln])))
    assert merged.merge_info["group_info"]["test_model_level"] == {"factor": 2.0}


def test_per_group_own_heads_for_disjoint_labels(family):
    root, (s0, sa, _) = family
    cfg = _config(
        root, groups={"attention": {"method": "average"}, "head": {"method": "average"}}, heads="union"
    )
    cfg["models"] = [str(root / "a"), str(root / "c")]
    merged = merge(cfg, quiet=True)
    assert merged.config.num_labels == 5
    w = ViTAdapter.from_model(merged).state_dict(merged)["classifier.weight"]
    torch.testing.assert_close(w[:3], sa["classifier.weight"])
    assert "ignored" in merged.merge_info["head_note"]
    assert merged.merge_info["per_group"]["head"]["method"] == "own heads (heads: union)"


def test_per_group_errors(family, monkeypatch):
    root, _ = family
    with pytest.raises(ValueError, match="missing"):
        merge(_config(root, method="per_group", groups={"attention": {"method": "average"}}), quiet=True)
    with pytest.raises(ConfigError, match="groups.mlp"):
        merge(_config(root, groups={"mlp": {"method": "average", "parameters": {"nope": 1}}}), quiet=True)

    def whole_model(ctx) -> MergeResult:
        return MergeResult(model=torch.nn.Linear(1, 1))

    spec = registry.MethodSpec("test_whole_model", whole_model, "model", False, False, "", {})
    monkeypatch.setitem(registry._REGISTRY, "test_whole_model", spec)
    with pytest.raises(ValueError, match="complete custom model"):
        merge(_config(root, groups={"mlp": {"method": "test_whole_model"}}), quiet=True)


def test_per_group_with_regmean_and_ties(micro_suite):
    """The recipe of examples/digits-domains-per-group.yaml on the micro suite (mechanics)."""
    from hf_vitmerge.suite import load_suite

    suite = load_suite(micro_suite)
    tasks = suite.tasks[:2]
    groups = {
        "attention": {"method": "regmean"},
        "mlp": {"method": "ties", "parameters": {"density": 0.2}},
        "norm": {"method": "average"},
    }
    cfg = {
        "method": "task_arithmetic",
        "base_model": str(suite.base_model),
        "models": [{"model": str(t.model), "data": {"path": str(t.train)}} for t in tasks],
        "groups": groups,
        "calibration": {"samples_per_task": 8, "batch_size": 8},
    }
    merged = merge(cfg, quiet=True)
    info = merged.merge_info["per_group"]
    assert [info[k]["method"] for k in ("embeddings", "attention", "mlp", "norm")] == [
        "task_arithmetic",
        "regmean",
        "ties",
        "average",
    ]
    ad = ViTAdapter.from_model(merged)
    out = ad.state_dict(merged)
    from transformers import ViTForImageClassification

    inputs = [ViTForImageClassification.from_pretrained(t.model) for t in tasks]
    srcs = [ViTAdapter.from_model(m).state_dict(m) for m in inputs]
    ln = ad.key("ln1", "bias", 1)
    torch.testing.assert_close(out[ln], (srcs[0][ln] + srcs[1][ln]) / 2)
    assert torch.isfinite(merged(X).logits).all()
