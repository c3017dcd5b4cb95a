"""Mergeability diagnostics: how far apart are the weights to be merged, per block and layer group?

Four metrics, computed on task vectors ``theta_m - theta_base`` when a base model is given and on
the raw weights otherwise, in float64:

* ``l2``: Euclidean distance ``||x_a - x_b||`` (mean over model pairs);
* ``cosine``: cosine similarity ``<x_a, x_b> / (||x_a|| ||x_b||)`` (mean over pairs);
* ``ssd``: soft sign dissimilarity ``1 - (1/d) sum_i |sum_m x_i^m| / sum_m |x_i^m|``. It is 0 when
  every model moves entry i in the same direction and grows with sign conflicts (1 when the
  entries cancel exactly). Entries that are zero in every model carry no sign and are left out of
  ``d``. ``ssd`` is the mean over pairs; ``ssd_all`` is the same expression over all K models at
  once;
* ``tssd``: truncated SSD: each model's vector is first trimmed to its top-``topk`` fraction of
  entries by magnitude (the rest set to zero, as in TIES-Merging's trim step), then SSD is taken
  over the entries that survive in at least one model. Trimming is per tensor (as mergekit's TIES),
  so group and whole-model values are exact sums of per-tensor statistics and tensors can be
  streamed one at a time. ``tssd_all`` is the all-model form.

Provenance. Sung et al., "An Empirical Study of Multimodal Model Merging", EMNLP Findings 2023
(https://arxiv.org/abs/2304.14933) state in their abstract that they "propose two metrics that assess
the distance between weights to be merged and can serve as an indicator of the merging outcomes",
and compare them with L2 and cosine. Verified: that sentence (abstract of 2304.14933v2 and its
third-party summaries) and that their code (github.com/ylsung/vl-merging @13c3041) contains no metric
code. Not verified: the metrics section itself could not be retrieved (no full text in the stored
corpora), so the names "SSD"/"TSSD", the exact SSD formula above, the ``1 -`` orientation, the
handling of all-zero entries and the meaning of "truncated" (per-model top-k% trim here) are a
reconstruction in the spirit of TIES-Merging's sign conflicts, not a transcription of the paper. The
all-model forms are what that reconstruction gives for K models; the paper studied K = 2 or 3.

Blocks and groups come from :class:`~hf_vitmerge.arch.ViTAdapter` kinds: ``embeddings``; per block
``block.i`` (all its tensors) and ``block.i.attention`` / ``.mlp`` / ``.norm``; ``final_norm``;
``head`` (only when every model's classifier has the same shape, and for task vectors the base's
too); and ``model`` (the whole backbone, head excluded, so that models with different label spaces
are comparable).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

PAIR_METRICS = ("l2", "cosine", "ssd", "tssd")
ALL_METRICS = (*PAIR_METRICS, "ssd_all", "tssd_all")
METRIC_INFO = {
    "l2": "mean pairwise L2 distance (higher: further apart)",
    "cosine": "mean pairwise cosine similarity (higher: more similar)",
    "ssd": "mean pairwise soft sign dissimilarity (higher: more sign conflict)",
    "tssd": "mean pairwise truncated SSD over each model's top-k entries (higher: more conflict)",
    "ssd_all": "soft sign dissimilarity of all models at once",
    "tssd_all": "truncated soft sign dissimilarity of all models at once",
}
SIMILARITY_METRICS = ("cosine",)  # higher = more similar; every other metric is a distance


# ----------------------------------------------------------------------------- pure metric functions
def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1).to(torch.float64)


def l2_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b||_2`` of the flattened tensors (float64)."""
    return float(torch.linalg.vector_norm(_flat(a) - _flat(b)))


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of the flattened tensors; NaN when either is all zeros."""
    a, b = _flat(a), _flat(b)
    denom = float(torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))
    return float(a @ b) / denom if denom > 0 else math.nan


def trim_topk(x: torch.Tensor, topk: float) -> torch.Tensor:
    """Keep the ``ceil(topk * numel)`` largest-magnitude entries of ``x`` (flattened), zero the rest."""
    _check_topk(topk)
    x = _flat(x)
    k = max(1, math.ceil(topk * x.numel()))
    if k >= x.numel():
        return x.clone()
    out = torch.zeros_like(x)
    idx = x.abs().topk(k).indices
    out[idx] = x[idx]
    return out


def _sign_terms(stacked: torch.Tensor) -> tuple[float, int]:
    """``(sum_i (1 - |sum_m x_i^m| / sum_m |x_i^m|), d)`` over entries not zero in every model."""
    total = stacked.abs().sum(0)
    mask = total > 0
    if not bool(mask.any()):
        return 0.0, 0
    ratio = stacked.sum(0)[mask].abs() / total[mask]
    return float((1.0 - ratio).sum()), int(mask.sum())


def soft_sign_dissimilarity(vectors: Sequence[torch.Tensor]) -> float:
    """SSD of K >= 2 same-shape tensors: ``1 - mean_i |sum_m x_i^m| / sum_m |x_i^m|`` (NaN if all zero)."""
    stacked = _stack(vectors)
    s, n = _sign_terms(stacked)
    return s / n if n else math.nan


def truncated_soft_sign_dissimilarity(vectors: Sequence[torch.Tensor], topk: float = 0.2) -> float:
    """SSD after trimming each tensor to its own top-``topk`` fraction of entries by magnitude."""
    stacked = torch.stack([trim_topk(v, topk) for v in _stack(vectors)])
    s, n = _sign_terms(stacked)
    return s / n if n else math.nan


def _stack(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    if len(vectors) < 2:
        raise ValueError(f"mergeability metrics need at least two models, got {len(vectors)}")
    shapes = {tuple(v.shape) for v in vectors}
    if len(shapes) != 1:
        raise ValueError(f"mergeability metrics need tensors of one shape, got {sorted(shapes)}")
    return torch.stack([_flat(v) for v in vectors])


def _check_topk(topk: float) -> None:
    if not 0 < topk <= 1:
        raise ValueError(f"topk is a fraction of entries in (0, 1], got {topk}")


# ----------------------------------------------------------------------------- streaming statistics
@dataclass
class _Stats:
    """Additive sufficient statistics of one tensor (or a sum over tensors).

    ``pair[p]`` = (sq. distance, dot, sq. norm a, sq. norm b, ssd sum, ssd count, tssd sum, tssd count)
    for pair p; ``all`` = (ssd sum, ssd count, tssd sum, tssd count) over all models.
    """

    pair: np.ndarray
    all: np.ndarray
    numel: int

    def __add__(self, other: _Stats) -> _Stats:
        return _Stats(self.pair + other.pair, self.all + other.all, self.numel + other.numel)


def tensor_stats(stacked: torch.Tensor, topk: float, pairs: Sequence[tuple[int, int]]) -> _Stats:
    """Statistics of one parameter given as ``[K, ...]`` (task vectors or weights)."""
    x = stacked.reshape(stacked.shape[0], -1).to(torch.float64)
    trimmed = torch.stack([trim_topk(v, topk) for v in x])
    pair = np.zeros((len(pairs), 8))
    for p, (a, b) in enumerate(pairs):
        d = x[a] - x[b]
        pair[p, :4] = (float(d @ d), float(x[a] @ x[b]), float(x[a] @ x[a]), float(x[b] @ x[b]))
        pair[p, 4:6] = _sign_terms(x[[a, b]])
        pair[p, 6:8] = _sign_terms(trimmed[[a, b]])
    every = np.array([*_sign_terms(x), *_sign_terms(trimmed)], dtype=float)
    return _Stats(pair, every, x.shape[1])


def _ratio(s: float, n: float) -> float:
    return s / n if n > 0 else math.nan


def stats_metrics(stats: _Stats) -> tuple[dict[str, float], list[dict[str, float]]]:
    """(aggregate metric values, per-pair values) from summed statistics."""
    per_pair = []
    for sq, dot, na, nb, ss, sn, ts, tn in stats.pair:
        denom = math.sqrt(na * nb)
        per_pair.append(
            {
                "l2": math.sqrt(max(sq, 0.0)),
                "cosine": dot / denom if denom > 0 else math.nan,
                "ssd": _ratio(ss, sn),
                "tssd": _ratio(ts, tn),
            }
        )
    values = {m: _nanmean([p[m] for p in per_pair]) for m in PAIR_METRICS}
    values["ssd_all"] = _ratio(stats.all[0], stats.all[1])
    values["tssd_all"] = _ratio(stats.all[2], stats.all[3])
    return values, per_pair


def _nanmean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


# ----------------------------------------------------------------------------- units (blocks, groups)
def diagnostic_units(adapter, include_head: bool) -> list[tuple[str, str, int | None, list[str]]]:
    """``(name, kind, layer, keys)`` for every reported unit, in display order."""
    units: list[tuple[str, str, int | None, list[str]]] = [
        ("embeddings", "embeddings", None, adapter.keys_of_kind("embeddings"))
    ]
    for layer in range(adapter.spec.num_layers):
        units.append((f"block.{layer}", "block", layer, [p.key for p in adapter.params if p.layer == layer]))
        for kind in ("attention", "mlp", "norm"):
            units.append((f"block.{layer}.{kind}", kind, layer, adapter.block_keys(layer, kind)))
    final = [p.key for p in adapter.params if p.kind == "norm" and p.layer is None]
    units.append(("final_norm", "final_norm", None, final))
    if include_head:
        units.append(("head", "head", None, adapter.classifier_keys))
    units.append(("model", "model", None, list(adapter.backbone_keys)))
    return [u for u in units if u[3]]


# ----------------------------------------------------------------------------- the public API
def _head_included(sources, base_src) -> tuple[bool, list[str]]:
    """Whether the classifier can be compared (same shape everywhere), and notes saying why not."""
    adapter = sources[0].adapter
    notes = []
    head_shapes = {tuple(s.adapter.info(k).shape) for s in sources for k in s.adapter.classifier_keys}
    include_head = bool(adapter.classifier_keys) and all(
        s.adapter.num_labels == adapter.num_labels for s in sources
    )
    if include_head and base_src is not None and base_src.adapter.num_labels != adapter.num_labels:
        include_head = False
        notes.append("head skipped: the base model's classifier has another shape, so no head task vectors")
    elif not include_head and adapter.classifier_keys:
        notes.append(f"head skipped: the models' classifiers differ in shape ({sorted(head_shapes)})")
    return include_head, notes


def _stream_tensor_stats(sources, base_src, keys, topk, pairs, quiet) -> dict[str, _Stats]:
    """Per-tensor metric sums, reading one key at a time from every model (and the base)."""
    from tqdm.auto import tqdm

    readers = [s.tensors() for s in sources]
    base_reader = base_src.tensors() if base_src is not None else None
    per_key: dict[str, _Stats] = {}
    try:
        for key in tqdm(keys, desc="inspect", unit="tensor", disable=quiet):
            stacked = torch.stack([r.get(key).to(torch.float64) for r in readers])
            if base_reader is not None:
                stacked = stacked - base_reader.get(key).to(torch.float64).unsqueeze(0)
            per_key[key] = tensor_stats(stacked, topk, pairs)
            del stacked
    finally:
        for r in readers + ([base_reader] if base_reader else []):
            r.close()
    return per_key


def _unit_result(unit, per_key: dict[str, _Stats], pairs) -> dict:
    """One unit's (block / group / model) metrics from the sums of its tensors."""
    name, kind, layer, unit_keys = unit
    total = per_key[unit_keys[0]]
    for k in unit_keys[1:]:
        total = total + per_key[k]
    values, per_pair = stats_metrics(total)
    return {
        "name": name,
        "kind": kind,
        "layer": layer,
        "numel": total.numel,
        "values": {m: _clean(values[m]) for m in ALL_METRICS},
        "pairwise": [
            {"pair": list(p), **{m: _clean(v[m]) for m in PAIR_METRICS}}
            for p, v in zip(pairs, per_pair, strict=True)
        ],
    }


def inspect_models(
    models: Sequence[str | os.PathLike],
    base: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    topk: float = 0.2,
    revisions: Sequence[str | None] | None = None,
    base_revision: str | None = None,
    quiet: bool = True,
) -> dict:
    """Mergeability metrics of K >= 2 ViTs per block and layer group (see the module docstring).

    Tensors are streamed one key at a time from each model's weight files, so memory stays near
    K copies of the largest tensor. With ``base`` the metrics are computed on task vectors. With
    ``out_dir`` writes ``metrics.json``, ``metrics.md`` and ``heatmap.png`` there (each atomically).
    Returns the JSON-ready dict (NaN written as null).
    """
    from .arch import check_compatible
    from .loading import resolve_model

    _check_topk(topk)
    if len(models) < 2:
        raise ValueError(f"inspect needs at least two models to compare, got {len(models)}")
    revs = list(revisions) if revisions is not None else [None] * len(models)
    sources = [resolve_model(m, r) for m, r in zip(models, revs, strict=True)]
    base_src = resolve_model(base, base_revision) if base is not None else None
    check_compatible({s.ref: s.adapter for s in sources + ([base_src] if base_src else [])})
    include_head, notes = _head_included(sources, base_src)
    units = diagnostic_units(sources[0].adapter, include_head)
    pairs = list(itertools.combinations(range(len(sources)), 2))
    keys = list(dict.fromkeys(k for u in units for k in u[3]))
    per_key = _stream_tensor_stats(sources, base_src, keys, topk, pairs, quiet)
    out_units = [_unit_result(unit, per_key, pairs) for unit in units]
    results = {
        "models": [s.ref for s in sources],
        "names": [Path(s.ref.rstrip("/")).name for s in sources],
        "base": base_src.ref if base_src is not None else None,
        "on": "task_vectors" if base_src is not None else "weights",
        "topk": topk,
        "pairs": [list(p) for p in pairs],
        "metrics": list(ALL_METRICS),
        "metric_info": METRIC_INFO,
        "units": out_units,
        "model": next(u["values"] for u in out_units if u["name"] == "model"),
        "notes": notes,
    }
    if out_dir is not None:
        write_report(results, out_dir)
    return results


def _clean(x: float) -> float | None:
    return None if x is None or math.isnan(x) else round(float(x), 8)


def write_report(results: dict, out_dir: str | os.PathLike) -> Path:
    """Write ``metrics.json``, ``metrics.md`` and ``heatmap.png`` into ``out_dir`` (atomically each)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "metrics.json", json.dumps(results, indent=2).encode())
    _atomic_write(out / "metrics.md", metrics_markdown(results).encode())
    plot_heatmap(results, out / "heatmap.png")
    return out


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def metrics_markdown(results: dict) -> str:
    """A markdown table: one row per block / group, one column per metric."""
    metrics = results["metrics"]
    lines = [
        f"# Mergeability diagnostics ({results['on'].replace('_', ' ')}, top-k {results['topk']:g})",
        "",
        "Models: " + ", ".join(f"`{m}`" for m in results["models"]),
        f"Base: `{results['base']}`" if results["base"] else "Base: none (metrics on raw weights)",
        "",
        "| unit | parameters | " + " | ".join(metrics) + " |",
        "|---|---:|" + "---:|" * len(metrics),
    ]
    for u in results["units"]:
        vals = " | ".join(_fmt(u["values"][m]) for m in metrics)
        lines.append(f"| {u['name']} | {u['numel']:,} | {vals} |")
    lines += ["", *(f"- {m}: {METRIC_INFO[m]}" for m in metrics)]
    lines += [f"- note: {n}" for n in results.get("notes", [])]
    return "\n".join(lines) + "\n"


_PANELS = (("block", "whole block"), ("attention", "attention"), ("mlp", "MLP"), ("norm", "LayerNorms"))


def _normalised_grid(us: list[dict], metrics: list[str]) -> np.ndarray:
    """Rows = metrics, each scaled to [0, 1] within the panel; cosine inverted."""
    grid = np.array([[np.nan if u["values"][m] is None else u["values"][m] for u in us] for m in metrics])
    for r, m in enumerate(metrics):
        row = grid[r]
        if not np.isfinite(row).any():
            continue
        lo, hi = np.nanmin(row), np.nanmax(row)
        z = (row - lo) / (hi - lo) if hi > lo else np.full_like(row, 0.5)
        grid[r] = 1.0 - z if m in SIMILARITY_METRICS else z
    return grid


def _annotate_cells(ax, us: list[dict], metrics: list[str], grid: np.ndarray) -> None:
    """Write each cell's raw value on the heatmap (readable on dark and light cells)."""
    for r, m in enumerate(metrics):
        for c, u in enumerate(us):
            v = u["values"][m]
            if v is not None:
                color = "white" if grid[r, c] > 0.6 else "black"
                ax.text(c, r, f"{v:.3g}", ha="center", va="center", fontsize=6, color=color)


def save_figure_atomically(fig, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure as PNG through a temporary file in the target folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def plot_heatmap(results: dict, path: str | os.PathLike) -> Path:
    """Heatmap of the metrics (rows) over blocks / groups (columns), one panel per group kind.

    Colours are normalised per metric within each panel, so they rank the blocks (darker = more
    dissimilar; cosine is inverted so that dark always means "further apart"); cells carry the raw
    values when there are few columns.
    Written atomically; usable by the model card with any ``inspect_models`` result.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(results["metrics"])
    units = results["units"]
    panels = [(title, [u for u in units if u["kind"] == kind]) for kind, title in _PANELS]
    other = [u for u in units if u["kind"] not in {k for k, _ in _PANELS}]
    panels = [p for p in panels if p[1]] + (
        [("embeddings / final norm / head / model", other)] if other else []
    )

    max_cols = max(len(p[1]) for p in panels)
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(max(6.0, 0.55 * max_cols + 2.5), (0.3 * len(metrics) + 0.8) * len(panels) + 0.6),
        squeeze=False,
        layout="constrained",
    )
    cmap = matplotlib.colormaps["magma_r"].with_extremes(bad="#dddddd")
    image = None
    for ax, (title, us) in zip(axes[:, 0], panels, strict=True):
        grid = _normalised_grid(us, metrics)
        image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=0, vmax=1)
        ax.set_yticks(range(len(metrics)), metrics)
        labels = [
            str(u["layer"]) if u["layer"] is not None and u["kind"] != "model" else u["name"] for u in us
        ]
        ax.set_xticks(range(len(us)), labels, rotation=0 if len(us) <= 16 else 90, fontsize=8)
        ax.set_title(title + (" (columns: block index)" if us[0]["layer"] is not None else ""), fontsize=10)
        if len(us) <= 16:
            _annotate_cells(ax, us, metrics, grid)
    fig.suptitle(
        f"Mergeability diagnostics on {results['on'].replace('_', ' ')} ({len(results['models'])} models)",
        fontsize=11,
    )
    fig.colorbar(
        image, ax=axes[:, 0].tolist(), shrink=0.6, label="dissimilarity, scaled per metric and panel"
    )
    try:
        return save_figure_atomically(fig, path)
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- predictive power
def _pair_row(suite, pair, base, methods, method_params, topk, batch_size) -> dict:
    """The whole-model metrics of two tasks' models and each method's accuracy on their merge."""
    from .evaluation import evaluate_model
    from .merging import merge
    from .methods import get_method

    ti, tj = pair
    diag = inspect_models([ti.model, tj.model], base=base, topk=topk)
    row = {"pair": [ti.name, tj.name], "metrics": diag["model"], "results": {}}
    for method in methods:
        model = merge(
            [str(ti.model), str(tj.model)],
            method,
            base_model=base if get_method(method).needs_base else None,
            tasks=[ti.name, tj.name],
            quiet=True,
            **method_params.get(method, {}),
        )
        scores = evaluate_model(model, suite, tasks=[ti.name, tj.name], batch_size=batch_size)
        row["results"][method] = {
            "normalized_accuracy": scores["normalized_accuracy"],
            "per_task_accuracy": scores["per_task_accuracy"],
        }
    return row


def _spearman(rows: list[dict], method: str) -> dict:
    """Spearman's rho of every pair metric with ``method``'s accuracy over the pairs, and the best."""
    from scipy.stats import spearmanr

    acc = [r["results"][method]["normalized_accuracy"] for r in rows]
    out: dict = {}
    for m in PAIR_METRICS:
        xs = [r["metrics"][m] for r in rows]
        ok = [(x, y) for x, y in zip(xs, acc, strict=True) if x is not None and y is not None]
        if len(ok) < 3 or len({x for x, _ in ok}) < 2 or len({y for _, y in ok}) < 2:
            rho, p = math.nan, math.nan
        else:
            res = spearmanr([x for x, _ in ok], [y for _, y in ok])
            rho, p = float(res.statistic), float(res.pvalue)
        sign = 1.0 if m in SIMILARITY_METRICS else -1.0
        out[m] = {"rho": _clean(rho), "p": _clean(p), "predictive_rho": _clean(sign * rho)}
    ranked = [m for m in PAIR_METRICS if out[m]["predictive_rho"] is not None]
    out["best"] = max(ranked, key=lambda m: out[m]["predictive_rho"]) if ranked else None
    return out


def pairwise_mergeability(
    suite_json: str | os.PathLike,
    methods: Sequence[str] = ("average", "task_arithmetic"),
    *,
    method_params: dict[str, dict] | None = None,
    topk: float = 0.2,
    out_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    quiet: bool = True,
) -> dict:
    """Does a metric predict how well two models merge? For every pair of a suite's tasks: the
    whole-model metrics of the pair, and the normalized accuracy of the pair merged by each method
    (on the two tasks' test splits, each task predicted within its own labels); then the Spearman
    correlation (``scipy.stats.spearmanr``) of each metric with that accuracy over all pairs.

    ``predictive_rho`` is rho for ``cosine`` and -rho for the distance metrics, so that higher
    means "predicts in the expected direction"; ``best`` names the metric with the largest one.
    With ``out_dir`` writes ``mergeability.json`` and ``mergeability.md``.
    """
    from .methods import get_method
    from .suite import load_suite

    suite = load_suite(suite_json)
    method_params = method_params or {}
    base = str(suite.base_model) if suite.base_model else None
    for method in methods:
        if get_method(method).needs_base and base is None:
            raise ValueError(f"method {method!r} needs a base model, but suite {suite.name!r} has none")
    rows = []
    for i, j in itertools.combinations(range(len(suite.tasks)), 2):
        row = _pair_row(
            suite, (suite.tasks[i], suite.tasks[j]), base, methods, method_params, topk, batch_size
        )
        rows.append(row)
        if not quiet:
            print(
                " + ".join(row["pair"])
                + ": "
                + ", ".join(f"{m} {row['results'][m]['normalized_accuracy']:.3f}" for m in methods)
            )
    correlations = {method: _spearman(rows, method) for method in methods}
    result = {
        "suite": suite.name,
        "num_pairs": len(rows),
        "on": "task_vectors" if base else "weights",
        "topk": topk,
        "methods": list(methods),
        "method_params": {m: method_params.get(m, {}) for m in methods},
        "pairs": rows,
        "spearman": correlations,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(out / "mergeability.json", json.dumps(result, indent=2).encode())
        _atomic_write(out / "mergeability.md", mergeability_markdown(result).encode())
    return result


def mergeability_markdown(result: dict) -> str:
    """Spearman table (metric x method) of a :func:`pairwise_mergeability` result."""
    methods = result["methods"]
    lines = [
        f"Suite `{result['suite']}`: {result['num_pairs']} task pairs, metrics on "
        f"{result['on'].replace('_', ' ')} (top-k {result['topk']:g}).",
        "",
        "| metric | " + " | ".join(f"{m}: rho (p)" for m in methods) + " |",
        "|---|" + "---:|" * len(methods),
    ]
    for metric in PAIR_METRICS:
        cells = []
        for m in methods:
            c = result["spearman"][m][metric]
            cells.append("n/a" if c["rho"] is None else f"{c['rho']:+.3f} ({c['p']:.2g})")
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    lines.append(
        "| best predictor | " + " | ".join(str(result["spearman"][m]["best"]) for m in methods) + " |"
    )
    return "\n".join(lines) + "\n"
