"""WUDI's bounded Adam solve against longer and exact solves of the same loss (issue 11).

WUDI's per-layer loss is quadratic, so it has a closed-form minimiser ``tau A = B`` (solved
here in float64 with a ridge relative to ``A``'s mean diagonal). This script merges a
shared-base suite with WUDI's default 300 Adam steps, with 1000 steps and with the exact
solution, and scores each task's head on its merged backbone over a slice of the task's
**training** split (never test), as a fraction of the task model's own accuracy; it prints the
summed loss over the linear layers beside it. Non-matrix parameters get the mean task vector,
as in :func:`hf_vitmerge.methods.wudi.wudi`.

    python benchmarks/wudi_solver.py SUITE.json --samples 256 --seed 1
"""

from __future__ import annotations

import time

import torch
from _trainslices import TrainSlices, arguments

from hf_vitmerge.methods.wudi import interference_terms, wudi_loss, wudi_task_matrix


def exact(task_mats: torch.Tensor, ridge: float) -> torch.Tensor:
    """The minimiser of the WUDI loss with a ridge: ``B (A + r I)^-1``."""
    a, b = interference_terms(task_mats.double())
    eye = torch.eye(a.shape[0], dtype=a.dtype)
    return torch.linalg.solve(a + ridge * a.diagonal().mean() * eye, b.T).T.float()


SOLVERS = {
    "adam, 300 steps (default)": lambda m: wudi_task_matrix(m, 300),
    "adam, 1000 steps": lambda m: wudi_task_matrix(m, 1000),
    "exact, ridge 1e-2": lambda m: exact(m, 1e-2),
    "exact, ridge 1e-6": lambda m: exact(m, 1e-6),
}


def main() -> None:
    args = arguments(__doc__).parse_args()

    s = TrainSlices(args.suite, args.samples, args.seed)
    taus = s.task_vectors()
    matrices = {k for k in s.keys if s.adapter.info(k).is_linear_weight}  # as the wudi method decides
    print(
        "| solver | normalized (train slices) | WUDI loss, summed over layers | seconds |\n|---|---|---|---|"
    )
    for name, solve in SOLVERS.items():
        start, loss, merged = time.perf_counter(), 0.0, {}
        for k in s.keys:
            if k in matrices:
                tau = solve(taus[k])
                loss += float(wudi_loss(tau, taus[k]))
            else:
                tau = taus[k].mean(0)
            merged[k] = s.base[k] + tau
        seconds = time.perf_counter() - start
        mean, _ = s.normalized([merged] * len(s.states))
        print(f"| {name} | {mean:.4f} | {loss:.4g} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
