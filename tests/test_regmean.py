"""RegMean: the closed-form solve on hand-computed tensors, and the merge end to end."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import make_dataset, make_vit

from hf_vitmerge import merge
from hf_vitmerge.methods.regmean import regmean_solve
from hf_vitmerge.stats import collect_model_stats

# ------------------------------------------------------------------------------------ the solve


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_identity_grams_give_the_average():
    ws = [_rand(3, 4, seed=s).float() for s in range(3)]
    eye = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(regmean_solve(ws, [eye] * 3, alpha=1.0, ridge=0.0), torch.stack(ws).mean(0))
    torch.testing.assert_close(
        regmean_solve(ws, [2 * eye] * 3), torch.stack(ws).mean(0), rtol=1e-5, atol=1e-6
    )


def test_one_model_returns_its_weights():
    w = _rand(5, 4, seed=1).float()
    x = _rand(20, 4, seed=2)
    g = x.T @ x / 20
    torch.testing.assert_close(regmean_solve([w], [g], alpha=1.0, ridge=0.0), w)
    torch.testing.assert_close(regmean_solve([w], [g]), w, rtol=1e-4, atol=1e-5)
    assert regmean_solve([w], [g]).dtype == torch.float32


def test_two_by_two_by_hand():
    w1, w2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    g1 = torch.tensor([[2.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    g2 = torch.eye(2, dtype=torch.float64)
    # alpha 1: (W1 G1 + W2 G2)(G1 + G2)^-1 = [2, 2] [[3, 1], [1, 2]]^-1 = [0.4, 0.8]
    torch.testing.assert_close(
        regmean_solve([w1, w2], [g1, g2], alpha=1.0, ridge=0.0), torch.tensor([[0.4, 0.8]])
    )
    # alpha 0.5 halves G1's off-diagonal: [2, 1.5] [[3, .5], [.5, 2]]^-1 = [3.25, 3.5] / 5.75
    torch.testing.assert_close(
        regmean_solve([w1, w2], [g1, g2], alpha=0.5, ridge=0.0), torch.tensor([[3.25, 3.5]]) / 5.75
    )


def test_alpha_zero_is_a_diagonal_weighted_average():
    ws = [_rand(3, 4, seed=s) for s in (3, 4)]
    xs = [_rand(30, 4, seed=s) * torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64) for s in (5, 6)]
    gs = [x.T @ x for x in xs]
    diag = torch.stack([g.diagonal() for g in gs])  # [2, 4]
    expected = (ws[0] * diag[0] + ws[1] * diag[1]) / diag.sum(0)
    torch.testing.assert_close(regmean_solve(ws, gs, alpha=0.0, ridge=0.0), expected)


def test_solution_minimises_the_output_regression():
    ws = [_rand(6, 5, seed=s) for s in range(3)]
    xs = [_rand(40, 5, seed=10 + s) for s in range(3)]
    gs = [x.T @ x for x in xs]
    merged = regmean_solve(ws, gs, alpha=1.0, ridge=0.0)
    gradient = sum((merged - w) @ g for w, g in zip(ws, gs, strict=True))
    assert gradient.abs().max() < 1e-9
    loss = lambda m: sum(((x @ (m - w).T) ** 2).sum() for w, x in zip(ws, xs, strict=True))  # noqa: E731
    assert loss(merged) < loss(torch.stack(ws).mean(0))


def test_ill_conditioned_gram_stays_finite_with_the_ridge():
    x = torch.tensor([[1.0, 2.0, 0.0]], dtype=torch.float64)
    g = x.T @ x  # rank 1, singular, and the third feature is dead
    ws = [_rand(2, 3, seed=7), _rand(2, 3, seed=8)]
    merged = regmean_solve(ws, [g, g], alpha=1.0)
    assert torch.isfinite(merged).all()
    # on the only direction the data spans, the merge reproduces the average output
    torch.testing.assert_close(merged @ x.T, (ws[0] + ws[1]) @ x.T / 2, rtol=1e-4, atol=1e-6)
    zero = torch.zeros(3, 3, dtype=torch.float64)
    torch.testing.assert_close(regmean_solve(ws, [zero, zero]), (ws[0] + ws[1]) / 2)


def test_bad_arguments():
    w = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="alpha"):
        regmean_solve([w], [torch.eye(3)], alpha=1.5)
    with pytest.raises(ValueError, match="do not match"):
        regmean_solve([w], [torch.eye(2)])
    with pytest.raises(ValueError, match="one Gram per weight"):
        regmean_solve([w, w], [torch.eye(3)])


# ------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def shared_labels(tmp_path_factory):
    """Two fine-tunes of one base with the same label space, each with its own data."""
    root = tmp_path_factory.mktemp("regmean")
    base = make_vit(labels=("a", "b", "c"), seed=0)
    for i in range(2):
        make_vit(root / f"m{i}", labels=("a", "b", "c"), seed=10 + i, base=base, noise=0.1)
        make_dataset(root / f"d{i}", 3, n=12, seed=i)
    return root


def _pixels(folder, n=6):
    from datasets import load_from_disk
    from transformers import AutoImageProcessor

    images = [im.convert("RGB") for im in load_from_disk(str(folder))["image"][:n]]
    return AutoImageProcessor.from_pretrained(folder.parent / "m0")(images=images, return_tensors="pt")[
        "pixel_values"
    ]


def test_one_model_reproduces_it(shared_labels):
    from transformers import ViTForImageClassification

    root = shared_labels
    if not (root / "m0-copy").exists():  # a merge needs two models: m0 and an identical copy of it
        shutil.copytree(root / "m0", root / "m0-copy")
    merged = merge(
        [str(root / "m0"), str(root / "m0-copy")], "regmean", data=[str(root / "d0")] * 2, quiet=True
    )
    original = ViTForImageClassification.from_pretrained(root / "m0").eval()
    px = _pixels(root / "d0")
    with torch.no_grad():
        torch.testing.assert_close(
            merged(pixel_values=px).logits, original(pixel_values=px).logits, atol=1e-4, rtol=1e-4
        )


def test_merge_uses_each_layers_own_input_gram(shared_labels, tmp_path):
    from transformers import AutoImageProcessor, ViTForImageClassification

    from hf_vitmerge.arch import ViTAdapter
    from hf_vitmerge.data import load_task_data

    root = shared_labels
    refs, data = [str(root / f"m{i}") for i in range(2)], [str(root / f"d{i}") for i in range(2)]
    calibration = {"samples_per_task": 8, "batch_size": 4, "cache_dir": str(tmp_path)}
    merged = merge(refs, "regmean", data=data, calibration=calibration, alpha=0.95, quiet=True)
    assert merged.merge_info["stats_seconds"] > 0 and merged.merge_info["calibration_samples"] == [8, 8]
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    adapter = ViTAdapter.from_model(merged)
    models = [ViTForImageClassification.from_pretrained(r).eval() for r in refs]
    grams = []
    for i, model in enumerate(models):
        calib = load_task_data(data[i]).subset(8, seed=0)
        proc = AutoImageProcessor.from_pretrained(refs[i])
        points = ["residual", "attn_in.1", "vo.0", "fc1_in.1", "mlp.0"]
        grams.append(
            # same batches as the merge: float32 per-batch products round per batch partition
            {
                p: s.gram()
                for p, s in collect_model_stats(model, calib, proc, points, batch_size=4, quiet=True).items()
            }
        )
    cases = [("q", 1, "attn_in.1"), ("v", 1, "attn_in.1"), ("o", 0, "vo.0"), ("fc1", 1, "fc1_in.1")]
    cases += [("fc2", 0, "mlp.0"), ("classifier", None, "residual")]
    for role, layer, point in cases:
        ws = [adapter.parameter(m, adapter.key(role, "weight", layer)).detach() for m in models]
        expected = regmean_solve(ws, [g[point] for g in grams], alpha=0.95)
        got = adapter.parameter(merged, adapter.key(role, "weight", layer)).detach()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=role)
        assert not torch.allclose(got, (ws[0] + ws[1]) / 2, atol=1e-4), role
    for key in (adapter.key("ln1", "bias", 0), adapter.key("fc1", "bias", 1), adapter.key("pos", "")):
        avg = sum(adapter.parameter(m, key).detach() for m in models) / 2
        torch.testing.assert_close(adapter.parameter(merged, key).detach(), avg)


def test_separate_label_spaces_keep_their_heads(micro_suite):
    import json

    from transformers import ViTForImageClassification

    root = micro_suite.parent
    tasks = json.loads(micro_suite.read_text())["tasks"]
    refs = [str(root / t["model"]) for t in tasks]
    data = [str(root / t["train"]) for t in tasks]
    merged = merge(refs, "regmean", data=data, heads="multi", calibration={"samples_per_task": 6}, quiet=True)
    for i, ref in enumerate(refs):
        original = ViTForImageClassification.from_pretrained(ref)
        torch.testing.assert_close(merged.heads[i].weight, original.classifier.weight)
    with pytest.raises(ValueError, match="calibration data .* is needed by method"):
        merge(refs, "regmean", quiet=True)
