"""TSV-M, Iso-C, Iso-CTS, consensus (TALL masks) and WUDI against hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from hf_vitmerge.arch import ParamInfo
from hf_vitmerge.methods import get_method
from hf_vitmerge.methods.consensus import consensus_mask, tall_masks
from hf_vitmerge.methods.iso import subspace_sizes
from hf_vitmerge.methods.wudi import interference_terms, wudi_loss, wudi_task_matrix

Q = ParamInfo("vit.encoder.layer.0.attention.attention.query.weight", "q", "weight", 0, "attention", (12, 10))
LN = ParamInfo("vit.encoder.layer.0.layernorm_before.weight", "ln1", "weight", 0, "norm", (10,))


def _orthogonal_task_matrices(k=4, m=12, n=10, rank=2, seed=0):
    """Task matrices with mutually orthogonal column and row spaces (rank ``rank`` each)."""
    g = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    mats = []
    for i in range(k):
        cols = slice(rank * i, rank * (i + 1))
        s = torch.diag(1.0 + torch.rand(rank, generator=g, dtype=torch.float64))
        mats.append(left[:, cols] @ s @ right[:, cols].T)
    return mats


def _models(task_mats, seed=1):
    base = torch.randn(task_mats[0].shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return base, [base + t for t in task_mats]


def test_tsv_with_orthogonal_task_matrices_is_task_arithmetic_with_scaling_one():
    mats = _orthogonal_task_matrices(k=4, m=12, n=10, rank=2)  # rank 10 / 4 tasks: 2 kept each
    base, models = _models(mats)
    tsv = get_method("tsv").fn(models, base, param=Q)
    ta = get_method("task_arithmetic").fn(models, base, scaling=1.0)
    torch.testing.assert_close(tsv, ta)


def test_tsv_drops_each_tasks_weaker_directions_and_means_non_matrices():
    mats = [
        torch.randn(12, 10, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(5)
    ]
    base, models = _models(mats)
    out = get_method("tsv").fn(models, base, param=Q) - base
    assert torch.linalg.matrix_rank(out) == 10  # 5 tasks x 2 kept directions fill the rank
    # Each task keeps only 10 // 5 = 2 directions, so the merge differs from the plain sum.
    assert not torch.allclose(out, sum(mats))
    vec_base, vecs = torch.zeros(10, dtype=torch.float64), [torch.full((10,), float(i)) for i in range(3)]
    torch.testing.assert_close(
        get_method("tsv").fn([v.double() for v in vecs], vec_base, param=LN, scaling=2.0),
        torch.full((10,), 2.0, dtype=torch.float64),  # 2 * mean(0, 1, 2)
    )


def test_iso_c_flattens_the_spectrum_of_the_summed_task_matrix():
    mats = [
        torch.randn(12, 10, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(3)
    ]
    base, models = _models(mats)
    out = (get_method("iso_c").fn(models, base, param=Q, scaling=1.5) - base) / 1.5
    u, s, vh = torch.linalg.svd(sum(mats), full_matrices=False)
    got = torch.linalg.svdvals(out)
    torch.testing.assert_close(got, torch.full_like(got, float(s.mean())))
    torch.testing.assert_close(out, u @ vh * s.mean())  # same singular vectors as the sum


def test_iso_cts_spectrum_is_flat_and_full_common_space_is_iso_c():
    # rank 12, 4 tasks: int(0.8 * 12) = 9 common, 3 left -> round(3 / 4) = 1 per task, common 8
    assert subspace_sizes(12, 4, 0.8) == (8, 1)
    assert subspace_sizes(10, 4, 0.8) == (10, 0)  # round(2 / 4) = 0: no task-specific part
    mats = [
        torch.randn(14, 12, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(4)
    ]
    base, models = _models(mats)
    out = get_method("iso_cts").fn(models, base, param=Q) - base
    s = torch.linalg.svdvals(out)
    torch.testing.assert_close(s, torch.full_like(s, float(s.mean())))
    # The task-specific directions make it differ from Iso-C's common subspace alone.
    assert not torch.allclose(out, get_method("iso_c").fn(models, base, param=Q) - base)
    torch.testing.assert_close(
        get_method("iso_cts").fn(models, base, param=Q, common_space_fraction=1.0),
        get_method("iso_c").fn(models, base, param=Q),
    )


def test_tall_and_consensus_masks_by_hand():
    taus = torch.tensor(
        [
            [1.0, 0.1, -1.0, 0.0],
            [1.0, 0.0, 1.0, 0.05],
            [1.0, 0.0, 1.0, 0.0],
        ]
    )
    # sum = [3, 0.1, 1, 0.05]; mask_t = |tau_t| > 0.5 * |sum - tau_t|
    masks = tall_masks(taus, taus.sum(0), 0.5)
    expected = torch.tensor(
        [
            [False, True, False, False],  # |sum - tau_1| = [2, 0, 2, 0.05]
            [False, False, True, True],  # |sum - tau_2| = [2, 0.1, 0, 0]
            [False, False, True, False],  # |sum - tau_3| = [2, 0.1, 0, 0.05]
        ]
    )
    assert torch.equal(masks, expected)
    assert torch.equal(consensus_mask(masks, 2), torch.tensor([False, False, True, False]))
    assert torch.equal(consensus_mask(masks, 1), torch.tensor([False, True, True, True]))
    base = torch.zeros(4)
    out = get_method("consensus").fn(list(taus), base, k=2, mask_lambda=0.5, scaling=1.0)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 1.0, 0.0]))
    out = get_method("consensus").fn(list(taus), base, k=1, mask_lambda=0.5, scaling=1.0)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.1, 1.0, 0.05]))


@pytest.mark.parametrize("over, other", [("task_arithmetic", "task_arithmetic"), ("ties", "ties")])
def test_consensus_with_k_zero_is_its_base_method(over, other):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    models = [base + 0.1 * torch.randn(6, 5, generator=g) for _ in range(3)]
    params = {"scaling": 0.7} if over == "task_arithmetic" else {"scaling": 0.7, "density": 0.4}
    got = get_method("consensus").fn(models, base, k=0, over=over, **params)
    torch.testing.assert_close(got, get_method(other).fn(models, base, **params))
    masked = get_method("consensus").fn(models, base, k=2, over=over, **params)
    assert not torch.allclose(masked, got)


def test_wudi_gradient_matches_the_reference_loss_and_the_loss_falls():
    g = torch.Generator().manual_seed(0)
    taus = 0.01 * torch.randn(3, 8, 6, generator=g, dtype=torch.float64)
    x = taus.sum(0).clone().requires_grad_(True)
    wudi_loss(x, taus).backward()
    a, b = interference_terms(taus)
    torch.testing.assert_close(x.grad, 2 * (x.detach() @ a - b))
    merged = wudi_task_matrix(taus, steps=300)
    assert wudi_loss(merged, taus) < 0.5 * wudi_loss(taus.sum(0), taus)
    torch.testing.assert_close(wudi_task_matrix(taus, steps=0), taus.sum(0))


def test_wudi_keeps_the_sum_when_tasks_use_orthogonal_inputs():
    # Row spaces orthogonal: (sum - tau_k) tau_k^T = 0 for every k, so the sum is optimal.
    mats = _orthogonal_task_matrices(k=3, m=10, n=9, rank=3)
    base, models = _models(mats)
    # Adam normalises even round-off gradients, so allow a drift far below one step (lr ~ 5e-3).
    torch.testing.assert_close(
        get_method("wudi").fn(models, base, param=Q),
        get_method("task_arithmetic").fn(models, base, scaling=1.0),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts", "wudi", "consensus"])
def test_merge_through_the_engine_uses_the_adapter_roles(tmp_path, method):
    """Linear weights go through the spectral maths; LayerNorms get the mean task vector."""
    from conftest import make_vit

    from hf_vitmerge import merge
    from hf_vitmerge.arch import ViTAdapter

    base = make_vit(tmp_path / "base", seed=0)
    fts = [make_vit(tmp_path / f"ft{i}", seed=10 + i, base=base, noise=0.02) for i in range(3)]
    merged = merge(
        [str(tmp_path / f"ft{i}") for i in range(3)], method, base_model=str(tmp_path / "base"), quiet=True
    )
    adapter = ViTAdapter.from_model(base)
    states = [adapter.state_dict(m) for m in (base, *fts)]
    out = adapter.state_dict(merged)
    ln = adapter.key("ln1", "weight", 0)
    expected = get_method(method).fn([s[ln] for s in states[1:]], states[0][ln], param=adapter.info(ln))
    torch.testing.assert_close(out[ln], expected)
    if method in ("iso_c", "iso_cts"):
        q = adapter.key("q", "weight", 1)
        s = torch.linalg.svdvals(out[q] - states[0][q])
        torch.testing.assert_close(s, torch.full_like(s, float(s.mean())), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("over", ["task_arithmetic", "ties"])
def test_fused_consensus_equals_the_unfused_masks(over):
    """The chunked merge (several column chunks here) gives exactly the helpers' composition."""
    from hf_vitmerge.methods.consensus import disjoint_sum
    from hf_vitmerge.methods.ties import disjoint_mean, elect_sign, trim_top_k

    g = torch.Generator().manual_seed(3)
    base = torch.randn(300, 500, generator=g)  # 150,000 entries: 3 chunks, sampled TIES threshold
    models = [base + 0.1 * torch.randn(300, 500, generator=g) for _ in range(4)]
    taus = torch.stack(models) - base
    if over == "task_arithmetic":
        merged = multi = taus.sum(0)
    else:
        trimmed = trim_top_k(taus, 0.3)
        sign = elect_sign(trimmed)
        multi, merged = disjoint_sum(trimmed, sign), disjoint_mean(trimmed, sign)
    mask = consensus_mask(tall_masks(taus, multi, 0.4), 2)
    assert 0.1 < mask.float().mean() < 0.9
    expected = base + 0.7 * (merged * mask)
    got = get_method("consensus").fn(models, base, k=2, mask_lambda=0.4, over=over, scaling=0.7, density=0.3)
    assert torch.equal(got, expected)
