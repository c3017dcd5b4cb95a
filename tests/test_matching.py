"""Matching solvers: Hungarian, greedy zip, head-aware matching (pure tensor functions)."""

from __future__ import annotations

import pytest
import torch

from hf_vitmerge.matching import (
    _ZipState,
    assignment,
    head_index,
    head_scores,
    hungarian_match,
    match_heads,
    matched_similarity,
    permutation_transforms,
    zip_match,
    zip_within_heads,
)


def _features(n: int, samples: int = 400, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(samples, n, generator=g, dtype=torch.float64)


def _permuted_copies(x: torch.Tensor, perms) -> torch.Tensor:
    """Model m's feature perm[m][j] is the shared feature j."""
    blocks = []
    for p in perms:
        f = torch.empty_like(x)
        f[:, p] = x
        blocks.append(f)
    return torch.corrcoef(torch.cat(blocks, 1).T)


def _random_perms(num: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.arange(n)] + [torch.randperm(n, generator=g) for _ in range(num - 1)]


@pytest.mark.parametrize("num_models", [2, 3, 5])
@pytest.mark.parametrize("reference", ["first", "mean"])
def test_hungarian_recovers_permutations(num_models, reference):
    perms = _random_perms(num_models, 12, seed=num_models)
    corr = _permuted_copies(_features(12), perms)
    got = hungarian_match(corr, num_models, reference)
    assert all(torch.equal(a, b) for a, b in zip(got, perms, strict=True))


def test_assignment_maximises():
    score = torch.tensor([[1.0, 5.0], [4.0, 1.0]])
    assert assignment(score).tolist() == [1, 0]


def test_permutation_transforms_average_and_undo():
    perms = _random_perms(3, 6, seed=1)
    ms, us = permutation_transforms(perms)
    for m, u, p in zip(ms, us, perms, strict=True):
        assert m.shape == (6, 6) and u.shape == (6, 6)
        torch.testing.assert_close(m @ u, torch.eye(6, dtype=torch.float64) / 3)
        assert (m * 3).argmax(1).tolist() == p.tolist()


@pytest.mark.parametrize("num_models", [2, 3, 4])
def test_zip_with_beta_zero_recovers_permutations(num_models):
    n = 10
    perms = _random_perms(num_models, n, seed=7)
    corr = _permuted_copies(_features(n, seed=3), perms)
    ms, us = zip_match(corr, num_models, alpha=0.5, beta=0.0)
    exp_m, exp_u = permutation_transforms(perms)
    # zip numbers its groups in its own order: compare up to a permutation of merged features
    order = (ms[0] > 0).float().argmax(1)
    for m in range(num_models):
        assert ms[m].shape == (n, n) and us[m].shape == (n, n)
        torch.testing.assert_close(ms[m], exp_m[m][order])
        torch.testing.assert_close(us[m], exp_u[m][:, order])


def test_zip_shapes_and_group_averaging():
    n, num = 8, 2
    corr = torch.corrcoef(_features(2 * n, seed=5).T)
    ms, us = zip_match(corr, num, alpha=0.5, beta=1.0)
    big_m, big_u = torch.cat(ms, 1), torch.cat(us, 0)  # [n, 2n], [2n, n]
    assert big_m.shape == (n, 2 * n) and big_u.shape == (2 * n, n)
    # every feature belongs to exactly one merged feature; each merged row averages its group
    assert torch.equal(big_u.sum(1), torch.ones(2 * n, dtype=torch.float64))
    torch.testing.assert_close(big_m.sum(1), torch.ones(n, dtype=torch.float64))
    torch.testing.assert_close(big_m @ big_u, torch.eye(n, dtype=torch.float64))
    torch.testing.assert_close(big_m, (big_u / big_u.sum(0)).T)


def test_zip_within_model_budget():
    """Two models whose features are duplicated within each model: with beta=1 the zip merges
    duplicates within a model, with beta=0 it never does."""
    n = 6
    x = _features(n // 2, seed=11)
    y = _features(n // 2, seed=12)
    a = torch.cat([x, x + 1e-3 * _features(n // 2, seed=13)], 1)  # model A: pairs of near-duplicates
    b = torch.cat([y, y + 1e-3 * _features(n // 2, seed=14)], 1)  # model B: unrelated to A
    corr = torch.corrcoef(torch.cat([a, b], 1).T)
    _, us = zip_match(corr, 2, alpha=0.5, beta=1.0)
    within = (us[0].sum(0) > 1).sum() + (us[1].sum(0) > 1).sum()
    assert within > 0
    _, us0 = zip_match(corr, 2, alpha=0.5, beta=0.0)
    assert us0[0].sum(0).max() == 1 and us0[1].sum(0).max() == 1


def _zip_groups_reference(sim, num_models, alpha, beta, n_out):
    """The greedy zip's pair choice written plainly (a full masked copy and argmax per merge step),
    on the same merge step (:class:`_ZipState`): the feature -> group assignment that
    :func:`zip_match`'s incremental search must reproduce exactly."""
    state = _ZipState(sim, num_models, alpha, beta)
    total = sim.shape[0]
    for _ in range(total - n_out):
        flat = int(torch.argmax(state.s.masked_fill(~state.allowed, float("-inf"))))
        if state.allowed.view(-1)[flat]:
            i, j = divmod(flat, total)
        else:
            i, j = state.best_live_pair()
        state.merge(min(i, j), max(i, j))
    return state.group_of


@pytest.mark.parametrize("num_models", [2, 3, 5])
@pytest.mark.parametrize("alpha,beta", [(0.5, 0.5), (0.7, 1.0), (1.0, 0.0), (0.0, 1.0), (0.3, 0.25)])
def test_zip_incremental_search_equals_full_argmax(num_models, alpha, beta):
    """The incremental row-maximum search takes exactly the pairs a full argmax would, ties
    included (similarities rounded to 0.1 so that many pairs tie), down to small n_out."""
    n = 12
    for seed, rounded, n_out in [(0, False, n), (1, True, n), (2, True, 3), (3, False, 1)]:
        sim = torch.corrcoef(_features(num_models * n, samples=60, seed=seed).T)
        if rounded:
            sim = (sim * 10).round() / 10
        _, us = zip_match(sim, num_models, alpha=alpha, beta=beta, n_out=n_out)
        groups = _zip_groups_reference(sim, num_models, alpha, beta, n_out)
        big_u = torch.cat(us, 0)
        same = groups[:, None] == groups[None, :]  # the partition into merged features
        assert torch.equal(big_u @ big_u.T > 0, same), (seed, rounded, n_out)


def test_zip_rejects_bad_arguments():
    corr = torch.eye(6)
    with pytest.raises(ValueError, match="beta"):
        zip_match(corr, 2, beta=1.5)
    with pytest.raises(ValueError, match="split evenly"):
        zip_match(corr, 4)


def _head_permuted(num_models, heads, hd, seed):
    g = torch.Generator().manual_seed(seed)
    head_perms, perms = [torch.arange(heads)], [torch.arange(heads * hd)]
    for _ in range(num_models - 1):
        hp = torch.randperm(heads, generator=g)
        within = [torch.randperm(hd, generator=g) for _ in range(heads)]
        perms.append(torch.cat([int(hp[h]) * hd + within[h] for h in range(heads)]))
        head_perms.append(hp)
    return head_perms, perms


@pytest.mark.parametrize("num_models", [2, 3])
def test_match_heads_recovers_shared_head_assignment(num_models):
    heads, hd = 4, 3
    d = heads * hd
    hps, qk_perms = _head_permuted(num_models, heads, hd, seed=1)
    # VO: same head assignment, different within-head permutations
    g = torch.Generator().manual_seed(99)
    vo_perms = [torch.arange(d)] + [
        torch.cat([int(hps[m][h]) * hd + torch.randperm(hd, generator=g) for h in range(heads)])
        for m in range(1, num_models)
    ]
    qk = _permuted_copies(_features(d, seed=2), qk_perms)
    vo = _permuted_copies(_features(d, seed=3), vo_perms)
    got_heads, (got_qk, got_vo) = match_heads([qk, vo], num_models, heads)
    assert all(torch.equal(a, b) for a, b in zip(got_heads, hps, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(got_qk, qk_perms, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(got_vo, vo_perms, strict=True))


def test_match_heads_never_crosses_heads():
    heads, hd = 3, 4
    corr = torch.corrcoef(_features(2 * heads * hd, seed=4).T)  # no structure at all
    hps, (perm,) = match_heads([corr], 2, heads)
    for h in range(heads):
        block = perm[1][h * hd : (h + 1) * hd]
        assert set((block // hd).tolist()) == {int(hps[1][h])}
    assert head_index(hps[1], hd).sort().values.tolist() == list(range(heads * hd))


def test_head_scores_prefers_matching_heads():
    sim = torch.full((6, 6), 0.1, dtype=torch.float64)
    sim[0:3, 3:6] = torch.eye(3, dtype=torch.float64)[[2, 0, 1]]
    scores = head_scores(sim, 2)
    assert scores[0, 1] == pytest.approx(1.0) and scores[0, 0] == pytest.approx(0.1)


def test_zip_within_heads_is_block_diagonal_and_exact_for_permutations():
    heads, hd = 3, 4
    hps, perms = _head_permuted(2, heads, hd, seed=5)
    corr = _permuted_copies(_features(heads * hd, seed=6), perms)
    ms, us = zip_within_heads(corr, 2, hps, heads, alpha=0.5, beta=0.0)
    exp_m, _ = permutation_transforms(perms)
    # merged head h only reads model m's head hps[m][h]
    for m in range(2):
        for h in range(heads):
            rows = slice(h * hd, (h + 1) * hd)
            outside = ms[m][rows].clone()
            outside[:, int(hps[m][h]) * hd + torch.arange(hd)] = 0
            assert outside.abs().sum() == 0
    torch.testing.assert_close(ms[0] @ us[0] + ms[1] @ us[1], torch.eye(heads * hd, dtype=torch.float64))
    assert matched_similarity(corr, 2, us) == pytest.approx(1.0)
    pairs = (ms[1] > 0).double().T @ (ms[0] > 0).double()  # model-1 feature x model-0 feature
    torch.testing.assert_close(pairs, (exp_m[1] > 0).double().T @ (exp_m[0] > 0).double())
