"""Fisher merging: the Fisher estimator against a per-example autograd loop, and the merge rule."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import make_dataset, make_vit

from hf_vitmerge import ViTAdapter, merge
from hf_vitmerge.methods import get_method
from hf_vitmerge.methods.fisher import diagonal_fisher


def test_registry_entry():
    spec = get_method("fisher")
    assert spec.kind == "model" and spec.needs_data and not spec.needs_base
    assert set(spec.defaults) == {"fisher_labels", "fisher_floor"}
    assert "2111.09832" in spec.reference


def test_empirical_fisher_matches_per_example_autograd():
    model = make_vit(seed=4)
    ad = ViTAdapter.from_model(model)
    keys = [ad.key("fc1", "weight", 1), ad.key("cls", ""), ad.key("classifier", "bias")]
    live = {k: ad.parameter(model, k) for k in keys}
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 2, 1, 1, 0])
    fisher, n = diagonal_fisher(model, live, [(x[:3], y[:3]), (x[3:], y[3:])], labels="empirical")
    assert n == 5
    expected = {k: torch.zeros(live[k].shape, dtype=torch.float64) for k in keys}
    for i in range(5):
        model.zero_grad()
        torch.log_softmax(model(pixel_values=x[i : i + 1]).logits, -1)[0, y[i]].backward()
        for k in keys:
            expected[k] += live[k].grad.double() ** 2 / 5
    for k in keys:
        assert fisher[k].dtype == torch.float64
        torch.testing.assert_close(fisher[k], expected[k], rtol=1e-4, atol=1e-10)


def test_sampled_fisher_is_seeded():
    model = make_vit(seed=4)
    ad = ViTAdapter.from_model(model)
    live = {ad.key("classifier", "weight"): ad.parameter(model, ad.key("classifier", "weight"))}
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def run(seed):
        return diagonal_fisher(model, live, [(x, None)], generator=torch.Generator().manual_seed(seed))[0]

    a, b = run(0), run(0)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("fisher")
    base = make_vit(root / "base", seed=0)
    models = [make_vit(root / f"m{i}", seed=1 + i, base=base, noise=0.2) for i in range(2)]
    for i in range(2):
        make_dataset(root / f"d{i}", 3, n=6, seed=i)
    return root, models


def test_fisher_merge_is_an_elementwise_convex_combination(pair):
    root, (a, b) = pair
    merged = merge(
        [root / "m0", root / "m1"],
        "fisher",
        data=[str(root / "d0"), str(root / "d1")],
        calibration={"batch_size": 4},
        seed=3,
        quiet=True,
    )
    ad = ViTAdapter.from_model(merged)
    sa, sb, sm = ad.state_dict(a), ad.state_dict(b), ad.state_dict(merged)
    for key in (ad.key("fc2", "weight", 0), ad.key("classifier", "weight"), ad.key("pos", "")):
        lo, hi = torch.minimum(sa[key], sb[key]), torch.maximum(sa[key], sb[key])
        assert bool(((sm[key] >= lo - 1e-6) & (sm[key] <= hi + 1e-6)).all()), key
        assert not torch.allclose(sm[key], (sa[key] + sb[key]) / 2), key  # Fisher weights are not uniform
    assert merged.merge_info["fisher_samples"] == {"m0": 6, "m1": 6}
    assert merged.merge_info["stats_seconds"] > 0


def test_fisher_merge_of_a_model_with_itself_is_that_model(pair):
    root, (a, _) = pair
    if not (root / "m0-copy").exists():  # the same folder twice is refused: an identical copy instead
        shutil.copytree(root / "m0", root / "m0-copy")
    merged = merge(
        [root / "m0", root / "m0-copy"],
        "fisher",
        data=[str(root / "d0"), str(root / "d1")],
        fisher_labels="empirical",
        calibration={"batch_size": 6},
        quiet=True,
    )
    ad = ViTAdapter.from_model(merged)
    sa, sm = ad.state_dict(a), ad.state_dict(merged)
    for key in ad.keys:
        torch.testing.assert_close(sm[key], sa[key])


def test_fisher_needs_data_and_valid_labels_mode(pair):
    root, _ = pair
    with pytest.raises(ValueError, match="calibration data .* is needed by method"):
        merge([root / "m0", root / "m1"], "fisher", quiet=True)
    with pytest.raises(ValueError, match="fisher_labels"):
        merge(
            [root / "m0", root / "m1"],
            "fisher",
            data=[str(root / "d0"), str(root / "d1")],
            fisher_labels="exact",
            quiet=True,
        )
