"""How well EMR's masked, rescaled unified vector reproduces each task model (issue 13).

For a shared-base suite, every task model is rebuilt as EMR rebuilds it with the true task
given (``W_0 + lambda_k M_k * tau_uni``, :func:`hf_vitmerge.methods.emr.elect_mask_rescale`)
and scored on a slice of its **training** split (never test), as a fraction of the task
model's own accuracy on the same images. Besides the reference's one rescaler per task, it
tries finer rescalers (one per tensor, one per output row) and keeping the 1-D parameters
(biases, LayerNorms, embeddings' vectors) exact, to tell whether the loss comes from the
rescaling or from the unified vector and its 1-bit masks. It also prints the suite's
relative task-vector norm ``||tau_k|| / ||W_0||`` and the mean pairwise cosine of the task
vectors.

    python benchmarks/emr_ceiling.py SUITE.json --samples 256 --seed 1 --json out.json
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from _trainslices import TrainSlices, arguments

from hf_vitmerge.methods.emr import elect_mask_rescale

VARIANTS = {
    "reference (one rescaler per task)": {},
    "one rescaler per tensor": {"scale": "tensor"},
    "one rescaler per output row": {"scale": "row"},
    "per task + exact 1-D parameters": {"exact_1d": True},
    "per row + exact 1-D parameters": {"scale": "row", "exact_1d": True},
}


def rebuild(k, keys, base, taus, unified, masks, rescalers, variant) -> dict:
    """Task ``k``'s backbone tensors under ``variant``."""
    out = {}
    for key in keys:
        tau, kept = taus[key][k], masks[key][k] * unified[key]
        if variant.get("exact_1d") and tau.dim() <= 1:
            out[key] = base[key] + tau
            continue
        scale = variant.get("scale")
        if scale == "tensor" or (scale == "row" and tau.dim() < 2):
            lam = tau.abs().sum() / kept.abs().sum().clamp_min(1e-12)
        elif scale == "row":  # one per slice along the first axis (an output row of a linear layer)
            rows = (tau.shape[0], -1)
            lam = tau.abs().reshape(rows).sum(1) / kept.abs().reshape(rows).sum(1).clamp_min(1e-12)
            lam = lam.reshape(-1, *([1] * (tau.dim() - 1)))
        else:
            lam = rescalers[k]
        out[key] = base[key] + lam * kept
    return out


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--json")
    args = parser.parse_args()

    s = TrainSlices(args.suite, args.samples, args.seed)
    unified, masks, rescalers = elect_mask_rescale(s.base, s.states)
    taus = s.task_vectors()

    flat = torch.stack([torch.cat([taus[k][i].flatten() for k in s.keys]) for i in range(len(s.states))])
    base_norm = torch.cat([s.base[k].flatten() for k in s.keys]).norm()
    unit = flat / flat.norm(dim=1, keepdim=True)
    cos = unit @ unit.T
    n = len(s.states)
    facts = {
        "relative_norm": [round(float(v), 4) for v in flat.norm(dim=1) / base_norm],
        "mean_pairwise_cosine": round(float((cos.sum() - cos.trace()) / (n * (n - 1))), 4),
    }
    rows = []
    for name, variant in VARIANTS.items():
        backbones = [rebuild(i, s.keys, s.base, taus, unified, masks, rescalers, variant) for i in range(n)]
        mean, ratios = s.normalized(backbones)
        rows.append(
            {"variant": name, "normalized": round(mean, 4), "per_task": [round(r, 4) for r in ratios]}
        )
        print(f"{name:38s} {mean:.4f}", flush=True)
    print(json.dumps(facts))
    if args.json:
        Path(args.json).write_text(json.dumps({"suite": s.suite.name, **facts, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
