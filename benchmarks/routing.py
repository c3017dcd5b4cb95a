"""Routed merges against their ceilings (issue 13): per method and seed, the bench figures
(normalized and joint accuracy, router validation accuracy, storage ratio, throughput ratio to
one task model) beside the accuracy with the true task given, and the suite's task
identifiability (a CNN trained on many training images of every task to tell the task).

    python benchmarks/routing.py SUITE.json --methods "gated,emr" --seeds 0,1,2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from hf_vitmerge import evaluation
from hf_vitmerge.api import parse_methods, parse_seeds, suite_config
from hf_vitmerge.evaluation import evaluate_model, individual_accuracies, reference_results
from hf_vitmerge.gate import task_identifiability, true_task_accuracy
from hf_vitmerge.merging import execute, prepare
from hf_vitmerge.suite import load_suite


def _ms(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return [
        round(statistics.fmean(values), 4),
        round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("suite")
    parser.add_argument("--methods", default="gated")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--identifiability", action="store_true")
    parser.add_argument(
        "--ceiling-only",
        action="store_true",
        help="only the true-task accuracy and storage (no reference ensemble, no routed evaluation)",
    )
    parser.add_argument("--no-ensemble", action="store_true", help="skip the ensemble reference")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    suite = load_suite(args.suite)
    out = {"suite": suite.name, "results": []}
    if not args.ceiling_only:
        if args.no_ensemble:
            individual_accuracies(suite)
            rate = evaluation._CACHE[("throughput", str(suite.path.resolve()))]
        else:
            rate = reference_results(suite)["individual"]["throughput_img_s"]
        out["individual_throughput_img_s"] = rate
    if args.identifiability:
        start = time.perf_counter()
        out["identifiability"] = task_identifiability(suite)
        out["identifiability"]["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(out["identifiability"]), flush=True)
    for name, params in parse_methods(args.methods):
        runs = []
        for seed in parse_seeds(args.seeds):
            ctx = prepare(suite_config(suite, name, params, seed=seed), quiet=True)
            model, info = execute(ctx)
            processor = ctx.sources[0].image_processor()
            ceiling = true_task_accuracy(model, suite, processor)
            if args.ceiling_only:
                runs.append(
                    {
                        "seed": seed,
                        "true_task_normalized": ceiling["normalized_accuracy"],
                        "storage_ratio": info.get("storage_ratio"),
                    }
                )
                print(name, params, json.dumps(runs[-1]), flush=True)
                continue
            scores = evaluate_model(model, suite, processor=processor)
            runs.append(
                {
                    "seed": seed,
                    "normalized": scores["normalized_accuracy"],
                    "joint": scores["joint_accuracy"],
                    "true_task_normalized": ceiling["normalized_accuracy"],
                    "gate_val_acc": info.get("gate_validation_accuracy"),
                    "storage_ratio": info.get("storage_ratio"),
                    "throughput_ratio": scores["throughput_img_s"] / out["individual_throughput_img_s"],
                    "stats_seconds": info.get("stats_seconds"),
                    "per_task": scores["per_task_accuracy"],
                }
            )
            print(
                name, params, json.dumps({k: v for k, v in runs[-1].items() if k != "per_task"}), flush=True
            )
        summary = {k: _ms([r[k] for r in runs]) for k in runs[0] if k not in ("seed", "per_task")}
        out["results"].append({"method": name, "params": params, **summary, "per_seed": runs})
        print("SUMMARY", name, params, json.dumps(summary), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
