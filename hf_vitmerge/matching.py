"""Feature-matching solvers for alignment merging (pure functions: tensors in, tensors out).

Every solver works on a *joint* similarity matrix ``sim`` of shape ``[N*n, N*n]``: the
features of N models stacked in model order (model ``m`` owns rows ``m*n .. (m+1)*n - 1``),
e.g. the Pearson correlation of the concatenated activations
(:meth:`hf_vitmerge.stats.FeatureStats.correlation`) or a weight similarity.

Two output forms are used:

* a *permutation* per model, ``perm[m][j]`` = the feature of model ``m`` that merged feature
  ``j`` is made of (model 0 keeps its order, ``perm[0] = arange(n)``);
* *merge / unmerge matrices* per model (ZipIt!, Stoica et al. 2023, https://arxiv.org/abs/2305.03053,
  Eq. 8): ``M_m`` is ``[n_out, n]`` (maps model ``m``'s features into the merged space, rows
  average the features of one merged group), ``U_m`` is ``[n, n_out]`` (copies a merged
  feature back to every feature of model ``m`` in its group). For a permutation,
  ``M_m = P_m / N`` and ``U_m = P_m^T``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .threads import intra_op_threads

Transforms = tuple[list[torch.Tensor], list[torch.Tensor]]  # (merge matrices, unmerge matrices)


def _check_joint(sim: torch.Tensor, num_models: int) -> int:
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"expected a square joint similarity matrix, got shape {tuple(sim.shape)}")
    if num_models < 1 or sim.shape[0] % num_models:
        raise ValueError(f"{sim.shape[0]} features cannot be split evenly into {num_models} models")
    return sim.shape[0] // num_models


def _block(sim: torch.Tensor, n: int, a: int, b: int) -> torch.Tensor:
    return sim[a * n : (a + 1) * n, b * n : (b + 1) * n]


def assignment(score: torch.Tensor) -> torch.Tensor:
    """Hungarian assignment maximising ``sum_j score[j, perm[j]]`` (scipy ``linear_sum_assignment``)."""
    s = score.detach().to(torch.float64).cpu().numpy()
    s = np.nan_to_num(s, nan=0.0, posinf=1e9, neginf=-1e9)
    rows, cols = linear_sum_assignment(s, maximize=True)
    perm = torch.empty(score.shape[0], dtype=torch.long)
    perm[torch.from_numpy(rows)] = torch.from_numpy(cols)
    return perm


def reference_similarity(
    sim: torch.Tensor, num_models: int, model: int, perms: Sequence[torch.Tensor], reference: str = "first"
) -> torch.Tensor:
    """``[n, n]`` similarity between the merged features built from models ``< model`` (rows,
    in merged order) and the features of ``model`` (columns).

    ``reference="first"``: similarity to model 0 only (ZipIt!'s and MuDSC's pairwise matching,
    and Git Re-Basin's "match everything to the first model"); ``"mean"``: the mean similarity
    to every model already assigned (matching to the running mean of the aligned models).
    """
    n = _check_joint(sim, num_models)
    if reference not in ("first", "mean"):
        raise ValueError(f"reference must be 'first' or 'mean', got {reference!r}")
    sources = [0] if reference == "first" else list(range(model))
    return torch.stack([_block(sim, n, a, model)[perms[a]] for a in sources]).mean(0)


def hungarian_match(sim: torch.Tensor, num_models: int, reference: str = "first") -> list[torch.Tensor]:
    """One permutation per model aligning it to model 0 (or to the running mean, see
    :func:`reference_similarity`), each solved optimally with the Hungarian algorithm."""
    n = _check_joint(sim, num_models)
    perms = [torch.arange(n)]
    for m in range(1, num_models):
        perms.append(assignment(reference_similarity(sim, num_models, m, perms, reference)))
    return perms


def permutation_transforms(perms: Sequence[torch.Tensor], dtype=torch.float64) -> Transforms:
    """Merge/unmerge matrices of permutations: ``M_m = P_m / N`` and ``U_m = P_m^T`` with
    ``P_m[j, perm[m][j]] = 1``, so ``sum_m M_m W_m U_m`` averages the aligned weights."""
    num = len(perms)
    ms, us = [], []
    for perm in perms:
        n = perm.numel()
        p = torch.zeros(n, n, dtype=dtype)
        p[torch.arange(n), perm] = 1.0
        ms.append(p / num)
        us.append(p.T.clone())
    return ms, us


def zip_match(
    sim: torch.Tensor, num_models: int, alpha: float = 0.5, beta: float = 0.5, n_out: int | None = None
) -> Transforms:
    """ZipIt!'s greedy zip of ``N * n`` features down to ``n_out`` (default ``n``) merged features.

    Repeatedly merges the most similar pair of current groups. After a merge the new group's
    similarity to every other group is ``min`` of its two parts' similarities times ``alpha``
    (repeated-matching decay; ``alpha <= 0`` forbids merging a group twice). A merge whose two
    groups both hold features of model ``m`` is a *within-model* merge and spends one unit of
    ``m``'s budget ``floor(floor((N-1) n / N) * beta)``; once a model's budget is spent such merges
    are masked out *before* the next argmax (so ``beta = 0`` never merges within a model,
    unlike the released code, which checks the budget after the merge). If every allowed pair
    is exhausted before ``n_out`` groups remain (possible for N > 2), the best masked pair is
    taken so the output width is always ``n_out``.

    Returns ``(M, U)``: per model ``M_m`` ``[n_out, n]`` (row ``j`` averages the features of merged
    group ``j``: its entries over all models sum to one) and ``U_m`` ``[n, n_out]`` (0/1).
    """
    n = _check_joint(sim, num_models)
    n_out = n if n_out is None else n_out
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if alpha > 1.0:
        raise ValueError(f"alpha must be <= 1, got {alpha}")
    total = n * num_models
    if not 1 <= n_out <= total:
        raise ValueError(f"n_out must be in [1, {total}], got {n_out}")
    state = _ZipState(sim, num_models, alpha, beta)
    with intra_op_threads(1):  # O(total) steps: a team of threads only adds synchronisation
        _greedy_zip(state, total - n_out)
    active, group_of = state.active, state.group_of
    ids = active.nonzero().flatten()
    col = torch.full((total,), -1, dtype=torch.long)
    col[ids] = torch.arange(ids.numel())
    p = torch.zeros(total, n_out, dtype=torch.float64)
    p[torch.arange(total), col[group_of]] = 1.0
    merge = (p / p.sum(0, keepdim=True)).T
    return [merge[:, m * n : (m + 1) * n].contiguous() for m in range(num_models)], [
        p[m * n : (m + 1) * n].contiguous() for m in range(num_models)
    ]


_NEG = float("-inf")


class _ZipState:
    """The state of a greedy zip and its merge step (:func:`zip_match`).

    ``s``: current group similarities (float64, -inf on the diagonal and for merged-away groups);
    ``member[g, m]``: group ``g`` holds features of model ``m``; ``group_of``: feature -> group id
    (a surviving row index); ``active``: surviving groups; ``budget``: within-model merges left
    per model; ``allowed``: pairs that may still be merged.
    """

    def __init__(self, sim: torch.Tensor, num_models: int, alpha: float, beta: float):
        total = sim.shape[0]
        n = total // num_models
        self.alpha = alpha
        self.s = torch.nan_to_num(sim.detach().to(torch.float64).clone(), nan=0.0)
        self.s.fill_diagonal_(_NEG)
        self.member = torch.zeros(total, num_models, dtype=torch.bool)
        self.member[torch.arange(total), torch.arange(total) // n] = True
        self.group_of = torch.arange(total)
        self.active = torch.ones(total, dtype=torch.bool)
        self.budget = torch.full((num_models,), int((((num_models - 1) * n) // num_models) * beta))
        self.allowed = ~torch.eye(total, dtype=torch.bool)
        for m in range(num_models):
            if self.budget[m] <= 0:
                self.allowed &= ~torch.outer(self.member[:, m], self.member[:, m])

    def best_live_pair(self) -> tuple[int, int]:
        """The most similar pair of surviving groups, allowed or not (when nothing allowed is left)."""
        live = torch.outer(self.active, self.active)
        live.fill_diagonal_(False)
        flat = int(torch.argmax(self.s.masked_fill(~live, _NEG)))
        if not live.view(-1)[flat]:
            flat = int(torch.argmax(live.to(torch.int8)))
        return divmod(flat, self.s.shape[0])

    def merge(self, i: int, j: int) -> bool:
        """Merge group ``j`` into group ``i`` (``i < j``): rows and columns ``i`` and ``j`` of ``s``
        and ``allowed`` change. Returns whether a model's within-model budget ran out, which masks
        many pairs at once."""
        s, member, allowed = self.s, self.member, self.allowed
        shared = member[i] & member[j]
        self.budget -= shared.long()
        self.group_of[self.group_of == j] = i
        member[i] |= member[j]
        alpha = self.alpha
        row = torch.minimum(s[i], s[j]) * alpha if alpha > 0 else torch.full_like(s[i], _NEG)
        s[i], s[:, i] = row, row
        s[i, i] = _NEG
        s[j], s[:, j] = _NEG, _NEG
        self.active[j] = False
        exhausted = self.budget <= 0
        newly_spent = (shared & exhausted).nonzero().flatten().tolist()
        for m in newly_spent:
            allowed &= ~torch.outer(member[:, m], member[:, m])
        conflict = (member & (member[i] & exhausted)).any(1)
        allowed[i] = self.active & ~conflict
        allowed[i, i] = False
        allowed[:, i] = allowed[i]
        allowed[j], allowed[:, j] = False, False
        return bool(newly_spent)


def _greedy_zip(state: _ZipState, steps: int) -> None:
    """Take ``steps`` merges, each of the most similar allowed pair (the first maximum in
    row-major order), or of :meth:`_ZipState.best_live_pair` when nothing allowed is left.

    ``masked`` (= ``s`` where allowed, else -inf) and each row's maximum and its first column are
    kept up to date incrementally: a merge changes two rows and two columns, so a step costs
    O(total) instead of a full masked copy and argmax, and takes the pair that ``torch.argmax`` of
    the whole matrix would give."""
    s, allowed = state.s, state.allowed
    masked = s.masked_fill(~allowed, _NEG)
    row_max, row_arg = _row_maxima(masked)
    for _ in range(steps):
        r = int(torch.argmax(row_max))
        i, j = state.best_live_pair() if row_max[r] == _NEG else (r, int(row_arg[r]))
        i, j = min(i, j), max(i, j)
        if state.merge(i, j):
            masked = s.masked_fill(~allowed, _NEG)
            row_max, row_arg = _row_maxima(masked)
            continue
        masked[i] = s[i].masked_fill(~allowed[i], _NEG)
        masked[:, i] = s[:, i].masked_fill(~allowed[:, i], _NEG)
        masked[j], masked[:, j] = _NEG, _NEG
        _update_row_maxima(masked, row_max, row_arg, i, j)


def _row_maxima(masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's maximum and the column of its first occurrence."""
    arg = torch.argmax(masked, dim=1)
    return masked.gather(1, arg[:, None]).squeeze(1), arg


def _update_row_maxima(
    masked: torch.Tensor, row_max: torch.Tensor, row_arg: torch.Tensor, i: int, j: int
) -> None:
    """Refresh the row maxima after rows and columns ``i < j`` of ``masked`` changed (column ``j``
    to -inf): rows ``i``, ``j`` and those whose finite maximum sat in column ``i`` or ``j`` are
    recomputed; every other row compares its maximum with its new entry in column ``i`` (a row of
    -inf, which is never taken, may keep a stale column)."""
    stale = ((row_arg == i) | (row_arg == j)) & (row_max > _NEG)  # rows of -inf stay so
    stale[i] = stale[j] = True
    value = masked[:, i]
    better = ~stale & ((value > row_max) | ((value == row_max) & (row_arg > i)))
    row_max[better] = value[better]
    row_arg[better] = i
    rows = stale.nonzero().flatten()
    row_max[rows], row_arg[rows] = _row_maxima(masked[rows])


def head_scores(sim: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[H, H]`` head similarity from a ``[d, d]`` feature similarity (rows: reference heads,
    columns: heads of the model being matched): the mean of the Hungarian-matched similarities
    inside each ``head_dim x head_dim`` block (MuDSC's two-level matching)."""
    d = sim.shape[0]
    if sim.shape != (d, d) or d % num_heads:
        raise ValueError(f"cannot split a {tuple(sim.shape)} similarity into {num_heads} heads")
    hd = d // num_heads
    out = torch.empty(num_heads, num_heads, dtype=torch.float64)
    for a in range(num_heads):
        for b in range(num_heads):
            blk = sim[a * hd : (a + 1) * hd, b * hd : (b + 1) * hd].to(torch.float64)
            perm = assignment(blk)
            out[a, b] = blk[torch.arange(hd), perm].mean()
    return out


def head_index(head_perm: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Feature permutation that moves whole heads: merged head ``h`` <- model head ``head_perm[h]``."""
    offs = torch.arange(head_dim)
    return torch.cat([int(h) * head_dim + offs for h in head_perm])


def match_heads(
    sims: Sequence[torch.Tensor], num_models: int, num_heads: int, reference: str = "first"
) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Head-aware two-level Hungarian matching with ONE head assignment for several groups.

    ``sims`` holds one joint ``[N*d, N*d]`` similarity per group that must share the head
    assignment (for a ViT block: the QK and the VO similarities). For each model ``m > 0``:
    head scores (:func:`head_scores`) of every group are summed, one Hungarian over heads gives
    the head assignment, then each group is matched within every matched head pair.

    Returns ``(head_perms, perms)``: ``head_perms[m][h]`` is model ``m``'s head placed at merged
    head ``h``; ``perms[g][m]`` is model ``m``'s feature permutation for group ``g`` (it only
    moves features within and between whole heads, never across a head boundary).
    """
    if not sims:
        raise ValueError("match_heads needs at least one similarity matrix")
    d = _check_joint(sims[0], num_models)
    for s in sims:
        if _check_joint(s, num_models) != d:
            raise ValueError("all groups sharing a head assignment must have the same width")
    if d % num_heads:
        raise ValueError(f"width {d} is not divisible by {num_heads} heads")
    hd = d // num_heads
    head_perms = [torch.arange(num_heads)]
    perms: list[list[torch.Tensor]] = [[torch.arange(d)] for _ in sims]
    for m in range(1, num_models):
        refs = [
            reference_similarity(s, num_models, m, p, reference) for s, p in zip(sims, perms, strict=True)
        ]
        score = sum(head_scores(r, num_heads) for r in refs)
        hp = assignment(score)
        head_perms.append(hp)
        for g, r in enumerate(refs):
            perm = torch.empty(d, dtype=torch.long)
            for h in range(num_heads):
                rows = slice(h * hd, (h + 1) * hd)
                cols = int(hp[h]) * hd + torch.arange(hd)
                perm[rows] = cols[assignment(r[rows][:, cols])]
            perms[g].append(perm)
    return head_perms, perms


def zip_within_heads(
    sim: torch.Tensor,
    num_models: int,
    head_perms: Sequence[torch.Tensor],
    num_heads: int,
    alpha: float = 0.5,
    beta: float = 0.5,
) -> Transforms:
    """ZipIt!'s greedy zip restricted to matched heads: merged head ``h`` zips the ``N*head_dim``
    features of heads ``head_perms[m][h]`` (one per model) down to ``head_dim``, each head with
    its own budget (MuDSC's zip mode). The result is block-diagonal over heads, so the merged
    model keeps its head structure."""
    d = _check_joint(sim, num_models)
    hd = d // num_heads
    ms = [torch.zeros(d, d, dtype=torch.float64) for _ in range(num_models)]
    us = [torch.zeros(d, d, dtype=torch.float64) for _ in range(num_models)]
    for h in range(num_heads):
        idx = [m * d + int(head_perms[m][h]) * hd + torch.arange(hd) for m in range(num_models)]
        flat = torch.cat(idx)
        hm, hu = zip_match(sim[flat][:, flat], num_models, alpha=alpha, beta=beta)
        rows = slice(h * hd, (h + 1) * hd)
        for m in range(num_models):
            cols = int(head_perms[m][h]) * hd + torch.arange(hd)
            ms[m][rows, cols] = hm[m]
            us[m][cols, rows] = hu[m]
    return ms, us


def matched_similarity(sim: torch.Tensor, num_models: int, unmerge: Sequence[torch.Tensor]) -> float:
    """Mean similarity between distinct features placed in the same merged feature (the
    objective MuDSC's coordinate descent maximises); 0 when no group holds two features."""
    p = torch.cat([u.to(torch.float64) for u in unmerge])  # [N*n, n_out]
    s = sim.to(torch.float64)
    pair_sum = torch.trace(p.T @ s @ p) - (s.diagonal()[:, None] * p * p).sum()
    sizes = p.sum(0)
    pairs = float((sizes * (sizes - 1)).sum())
    return float(pair_sum) / pairs if pairs > 0 else 0.0
