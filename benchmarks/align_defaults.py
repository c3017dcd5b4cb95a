"""Choose the alignment defaults (issue 12, deliverable 3) on calibration-split data, never on test.

For each calibration seed, one merge context is prepared exactly as ``hf-vitmerge bench`` does
(:func:`hf_vitmerge.api.suite_config`: the suite's train splits, ``samples_per_task`` calibration
images per task drawn by the seed). Every candidate setting is merged from it (activation
statistics collected once per seed and residual-statistics choice, then reused) and scored by
**joint accuracy** under the project's one joint rule
(:func:`hf_vitmerge.evaluation.joint_predictions`) on each task's **validation slice**: the
calibration-split (train) images that follow the calibration sample in the same seeded shuffle
(:func:`hf_vitmerge.autotune.validation_slice`, the slice the ``auto`` parameters use), so they
are disjoint from the images used for statistics and repair. Test splits are not read.

    python benchmarks/align_defaults.py SUITE.json --grid zipit-full --seeds 0,1,2 \\
        --json align_defaults.json --markdown align_defaults.md

Grids (``--grid``, comma-separated):

* ``zipit-full``: zipit, alpha x beta x residual_features (``--alphas``, ``--betas``, ``--residual``);
* ``zipit-partial``: zipit with ``stop_block`` = ``--stop-block``, alpha x beta;
* ``mudsc``: mudsc, lam (``--lams``) x beta (``--mudsc-betas``), alpha ``--mudsc-alpha``,
  residual_features ``--mudsc-residual``;
* ``permute``: permute at its defaults.

Every grid is crossed with ``--qk-features`` (``k``, ``qk`` or ``k,qk``: the statistics of the
QK groups).

Each row: mean ± std over the seeds of the validation joint accuracy (and normalized
accuracy: per-task accuracy on the slice over the task model's), the ensemble's validation
joint accuracy for reference, and seconds per merge.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from hf_vitmerge.api import suite_config
from hf_vitmerge.autotune import validation_slice
from hf_vitmerge.evaluation import joint_predictions, label_positions
from hf_vitmerge.merging import _build, prepare
from hf_vitmerge.methods import mudsc as mudsc_module
from hf_vitmerge.methods import permute as permute_module
from hf_vitmerge.methods import zipit as zipit_module
from hf_vitmerge.methods.registry import get_method
from hf_vitmerge.suite import load_suite


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ms(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def memoize_statistics() -> None:
    """Collect activation statistics once per (context, groups, stop block, residual features),
    and REPAIR's preprocessed images and input-model statistics once per context: alpha, beta and
    lam do not change them, so the grid reuses them (the figures are the same as recomputing;
    only the time differs)."""
    from hf_vitmerge import alignment, repair

    original = alignment.activation_similarities
    memo: dict = {}

    def cached(ctx, groups, states, *, stop_block=None, residual_features="layernorms", qk_features="k"):
        key = (id(ctx), tuple(g.name for g in groups), stop_block, residual_features, qk_features)
        if key not in memo:
            memo[key] = original(
                ctx,
                groups,
                states,
                stop_block=stop_block,
                residual_features=residual_features,
                qk_features=qk_features,
            )
        return dict(memo[key])

    for module in (zipit_module, mudsc_module, permute_module):
        module.activation_similarities = cached

    # REPAIR's inputs that do not depend on the merge: the preprocessed calibration images and
    # the input models' per-feature statistics
    batches_original, inputs_original = repair.pixel_batches, repair.input_statistics

    def batches_cached(ctx, processor, batch_size, device):
        key = ("pixels", id(ctx), processor.to_json_string(), batch_size, device)
        if key not in memo:
            memo[key] = batches_original(ctx, processor, batch_size, device)
        return memo[key]

    def inputs_cached(ctx, layers, batch_size):
        key = ("inputs", id(ctx), tuple(layers), batch_size)
        if key not in memo:
            memo[key] = inputs_original(ctx, layers, batch_size)
        return memo[key]

    repair.pixel_batches, repair.input_statistics = batches_cached, inputs_cached


class ValidationJoint:
    """Joint and normalized accuracy on the tasks' validation slices (calibration split, after
    the calibration sample; never the test split)."""

    def __init__(self, ctx, samples: int):
        self.ctx = ctx
        slices = [validation_slice(ctx, i, samples) for i in range(len(ctx.sources))]
        self.slices = [s for s, _ in slices]
        self.disjoint = all(d for _, d in slices)
        self.processors = [s.image_processor() for s in ctx.sources]
        self.batch = ctx.config.calibration.batch_size
        self.pixels = [self._pixels(i) for i in range(len(self.slices))]
        models = ctx.models()
        # the task models: individual accuracy (normalisation) and the ensemble under the joint rule
        logits = [[self._logits(m, t) for m in models] for t in range(len(self.slices))]
        self.individual = [
            float((logits[t][t].argmax(-1) == self.pixels[t][1]).float().mean()) for t in range(len(models))
        ]
        offsets = [0]
        for s in ctx.sources:
            offsets.append(offsets[-1] + len(s.labels))
        hits = [
            (joint_predictions(logits[t]) == self.pixels[t][1] + offsets[t]).float()
            for t in range(len(models))
        ]
        self.ensemble_joint = float(torch.cat(hits).mean())

    def _pixels(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*self.slices[t].batches(self.processors[t], self.batch, with_labels=True), strict=True)
        return torch.cat(xs), torch.cat(ys)

    @torch.inference_mode()
    def _logits(self, model, t: int) -> torch.Tensor:
        model = model.to(self.ctx.device).eval()
        x = self.pixels[t][0]
        return torch.cat(
            [
                model(pixel_values=x[i : i + self.batch].to(self.ctx.device)).logits.float().cpu()
                for i in range(0, len(x), self.batch)
            ]
        )

    def __call__(self, model) -> dict:
        id2label = model.config.id2label
        labels = [str(id2label[i]) for i in range(len(id2label))]
        positions = [
            label_positions(labels, SimpleNamespace(name=n, labels=s.labels))
            for n, s in zip(self.ctx.task_names, self.ctx.sources, strict=True)
        ]
        if any(p is None for p in positions):
            raise ValueError("the merged model lacks some task's labels")
        cols = torch.tensor([p for pos in positions for p in pos])
        joint, ratios = [], []
        for t, pos in enumerate(positions):
            logits = self._logits(model, t)
            y = self.pixels[t][1]
            pred = cols[joint_predictions([logits[:, p] for p in positions])]
            joint.append((pred == torch.tensor(pos)[y]).float())
            acc = float((logits[:, pos].argmax(-1) == y).float().mean())
            ratios.append(acc / self.individual[t] if self.individual[t] > 0 else 0.0)
        return {"joint": float(torch.cat(joint).mean()), "normalized": statistics.fmean(ratios)}


def candidates(args) -> list[tuple[str, str, dict]]:
    """(grid, method, params) for every candidate; every grid crosses ``--qk-features``."""
    out = []
    grids = [g.strip() for g in args.grid.split(",") if g.strip()]
    qks = [q.strip() for q in args.qk_features.split(",") if q.strip()]
    for grid, qk in itertools.product(grids, qks):
        if grid == "zipit-full":
            for res, a, b in itertools.product(
                args.residual.split(","), _floats(args.alphas), _floats(args.betas)
            ):
                out.append(
                    (grid, "zipit", {"alpha": a, "beta": b, "residual_features": res, "qk_features": qk})
                )
        elif grid == "zipit-partial":
            for a, b in itertools.product(_floats(args.partial_alphas), _floats(args.partial_betas)):
                params = {"alpha": a, "beta": b, "stop_block": args.stop_block, "qk_features": qk}
                out.append((grid, "zipit", params))
        elif grid == "mudsc":
            for lam, b in itertools.product(_floats(args.lams), _floats(args.mudsc_betas)):
                params = {
                    "lam": lam,
                    "alpha": args.mudsc_alpha,
                    "beta": b,
                    "residual_features": args.mudsc_residual,
                    "qk_features": qk,
                }
                out.append((grid, "mudsc", params))
        elif grid == "permute":
            out.append((grid, "permute", {"qk_features": qk}))
        else:
            raise SystemExit(f"unknown grid {grid!r} (zipit-full, zipit-partial, mudsc, permute)")
    return out


def params_text(params: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def markdown(report: dict) -> str:
    lines = [
        f"Suite `{report['suite']}`; seeds {report['seeds']}; validation: {report['validation']}.",
        "Ensemble validation joint accuracy: "
        + ", ".join(f"{x:.3f}" for x in report["ensemble_joint_per_seed"])
        + f" (mean {statistics.fmean(report['ensemble_joint_per_seed']):.3f}).",
        "",
        "| grid | method | parameters | val. joint | val. normalized | per seed (joint) | s / merge |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['grid']} | {row['method']} | {params_text(row['params'])} | "
            f"{row['joint_mean']:.3f} ± {row['joint_std']:.3f} | "
            f"{row['normalized_mean']:.3f} ± {row['normalized_std']:.3f} | "
            + ", ".join(f"{x:.3f}" for x in row["joint_per_seed"])
            + f" | {row['seconds']:.0f} |"
        )
    lines.append("")
    for grid, best in report["best"].items():
        lines.append(
            f"Best of `{grid}` by mean validation joint accuracy (ties: earlier row): "
            f"`{best['method']}[{params_text(best['params'])}]` {best['joint_mean']:.3f} ± {best['joint_std']:.3f}"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("suite")
    p.add_argument("--grid", default="zipit-full,mudsc")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--samples-per-task", type=int, default=256, help="calibration images (as bench)")
    p.add_argument(
        "--val-samples",
        type=int,
        default=384,
        help="validation-slice images per task (at most the split size minus --samples-per-task, to stay disjoint)",
    )
    p.add_argument("--alphas", default="0.3,0.5,0.7,1.0")
    p.add_argument("--betas", default="0,0.25,0.5,1.0")
    p.add_argument("--residual", default="cls,layernorms")
    p.add_argument("--stop-block", type=int, default=1)
    p.add_argument("--partial-alphas", default="0.5,1.0")
    p.add_argument("--partial-betas", default="0.5,1.0")
    p.add_argument("--lams", default="0,0.25,0.5,0.75")
    p.add_argument("--mudsc-alpha", type=float, default=0.5)
    p.add_argument("--mudsc-betas", default="1.0")
    p.add_argument("--mudsc-residual", default="layernorms")
    p.add_argument("--qk-features", default="k", help="QK-group statistics to cross every grid with (k, qk)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    memoize_statistics()
    suite = load_suite(args.suite)
    seeds = [int(s) for s in args.seeds.split(",")]
    cands = candidates(args)
    contexts, scorers, validation = [], [], None
    for seed in seeds:
        ctx = prepare(
            suite_config(suite, "zipit", {}, seed=seed, samples_per_task=args.samples_per_task), quiet=True
        )
        scorer = ValidationJoint(ctx, args.val_samples)
        contexts.append(ctx)
        scorers.append(scorer)
        validation = (
            f"{min(len(s) for s in scorer.slices)} train-split images per task after the "
            f"{args.samples_per_task}-image calibration sample ("
            + ("disjoint from it" if scorer.disjoint else "overlapping it: split too small")
            + "); test splits not read"
        )
        print(f"seed {seed}: ensemble validation joint {scorer.ensemble_joint:.3f}", flush=True)
    rows = []
    for grid, method, params in cands:  # candidates outer: a stopped run still has whole rows
        spec = get_method(method)
        sc, start = [], time.perf_counter()
        for ctx, scorer in zip(contexts, scorers, strict=True):
            sc.append(scorer(_build(ctx, spec, spec.validate_params(params, allow_auto=False))))
        sec = time.perf_counter() - start
        jm, js = _ms([s["joint"] for s in sc])
        nm, ns = _ms([s["normalized"] for s in sc])
        rows.append(
            {
                "grid": grid,
                "method": method,
                "params": params,
                "joint_mean": round(jm, 4),
                "joint_std": round(js, 4),
                "normalized_mean": round(nm, 4),
                "normalized_std": round(ns, 4),
                "joint_per_seed": [round(s["joint"], 4) for s in sc],
                "seconds": round(sec / len(seeds), 1),
            }
        )
        print(
            f"  {grid} {method}[{params_text(params)}]: joint {jm:.3f} ± {js:.3f} ({sec:.0f} s)", flush=True
        )
        write(args, suite, seeds, validation, [s.ensemble_joint for s in scorers], rows, final=False)
    write(args, suite, seeds, validation, [s.ensemble_joint for s in scorers], rows, final=True)


def write(args, suite, seeds, validation, ensemble, rows, *, final: bool) -> None:
    """Write the JSON and markdown (after every candidate, so a stopped run keeps its rows)."""
    best = {}
    for row in rows:
        if row["grid"] not in best or row["joint_mean"] > best[row["grid"]]["joint_mean"]:
            best[row["grid"]] = row
    report = {
        "suite": suite.name,
        "seeds": seeds,
        "validation": validation,
        "ensemble_joint_per_seed": [round(x, 4) for x in ensemble],
        "rows": rows,
        "best": best,
    }
    text = markdown(report)
    if final:
        print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(text)


if __name__ == "__main__":
    main()
