"""Throughput of a routed merge against one task model, timed in the same process, interleaved
(the shared machine's load changes from minute to minute): images per second of the forward
passes at batch 64 over the suite's test images, in task-homogeneous batches (as the bench) and in
shuffled batches mixing every task (the worst case for grouped routing).

    python benchmarks/routed_throughput.py SUITE.json --method gated --repeats 3
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from hf_vitmerge.api import parse_methods, suite_config
from hf_vitmerge.data import load_task_data
from hf_vitmerge.merging import execute, prepare
from hf_vitmerge.suite import load_suite


@torch.inference_mode()
def _rate(model, batches) -> float:
    start = time.perf_counter()
    n = 0
    for x in batches:
        model(pixel_values=x)
        n += len(x)
    return n / (time.perf_counter() - start)


def main() -> None:
    from transformers import AutoModelForImageClassification

    parser = argparse.ArgumentParser()
    parser.add_argument("suite")
    parser.add_argument("--method", default="gated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    suite = load_suite(args.suite)
    ((name, params),) = parse_methods(args.method)
    ctx = prepare(suite_config(suite, name, params, seed=args.seed), quiet=True)
    merged, info = execute(ctx)
    merged.eval()
    processor = ctx.sources[0].image_processor()
    pixels = []
    for task in suite.tasks:
        data = load_task_data(task.test, image_column=task.image_column)
        pixels.append(torch.cat(list(data.batches(processor, 64))))
    homogeneous = [x[i : i + 64] for x in pixels for i in range(0, len(x), 64)]
    everything = torch.cat(pixels)
    perm = torch.randperm(len(everything), generator=torch.Generator().manual_seed(0))
    mixed = [everything[perm[i : i + 64]] for i in range(0, len(everything), 64)]
    single = AutoModelForImageClassification.from_pretrained(suite.tasks[0].model).eval()
    rows = {"single": [], "routed_homogeneous": [], "routed_mixed": []}
    for _ in range(args.repeats):
        rows["single"].append(_rate(single, homogeneous))
        rows["routed_homogeneous"].append(_rate(merged, homogeneous))
        rows["routed_mixed"].append(_rate(merged, mixed))
    best = {k: max(v) for k, v in rows.items()}
    out = {
        "suite": suite.name,
        "method": name,
        "params": params,
        "images": len(everything),
        "best_img_s": {k: round(v, 1) for k, v in best.items()},
        "ratio_homogeneous": round(best["routed_homogeneous"] / best["single"], 3),
        "ratio_mixed": round(best["routed_mixed"] / best["single"], 3),
        "storage_ratio": info.get("storage_ratio"),
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
