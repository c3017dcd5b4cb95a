"""Throughput of activation-statistics collection against plain inference, same pipeline.

For each collection, :func:`hf_vitmerge.stats.benchmark_throughput` runs the same batching,
preprocessing and forward passes without and with the statistics hooks, interleaved in this one
process (plain, stats, plain, stats, ...), and keeps each one's best run: load changes on a
shared machine hit both, so ``ratio = statistics_img_s / inference_img_s`` is the figure to read.

Collections:

* ``joint``: two models on the same images, the points permute, ZipIt! and MuDSC collect with
  their defaults (:func:`hf_vitmerge.alignment.alignment_points`: every LayerNorm output and the
  final-LN tokens for the residual stream, key outputs, attention context, MLP hidden;
  features concatenated, ``D = 2 d``);
* ``one-model``: one model on its own images, RegMean's points (``attn_in, vo, fc1_in, mlp`` of
  every block and the classifier input).

On a CPU with two or more cores the statistics products run on a background thread
(``hf_vitmerge.stats._Collector``); ``HF_VITMERGE_STATS_WORKER=0`` measures them inline.

Models are random ViTs of the zoo's shapes (``hf_vitmerge.zoo.builder.SIZES``: tiny = the
digits architecture, 16 px, patch 4, hidden 64, 3 blocks, MLP 128; small = 32 px, patch 4,
hidden 128, 6 blocks, MLP 256) on random images: throughput does not depend on the weights.

    python benchmarks/throughput.py --size tiny --json tp.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _setup(size: str, n_models: int, images: int):
    import numpy as np
    import torch
    from datasets import Dataset
    from PIL import Image
    from transformers import ViTForImageClassification, ViTImageProcessor

    from hf_vitmerge.data import TaskData
    from hf_vitmerge.zoo.builder import SIZES

    arch = SIZES[size].archs["digits"]
    config = arch.config([str(i) for i in range(10)])
    models = []
    for seed in range(n_models):
        torch.manual_seed(seed)
        models.append(ViTForImageClassification(config).eval())
    rng = np.random.default_rng(0)
    px = arch.image_size
    pics = [Image.fromarray(rng.integers(0, 256, (px, px, 3), dtype=np.uint8)) for _ in range(images)]
    data = TaskData(Dataset.from_dict({"image": pics}), "image", None, "synthetic")
    processor = ViTImageProcessor(size={"height": px, "width": px}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return models, data, processor, arch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--json", default=None, help="write {'rows': [...]} here")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each; the best is kept")
    parser.add_argument("--threads", type=int, default=1, help="torch (and BLAS) threads")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from hf_vitmerge.alignment import alignment_points
    from hf_vitmerge.arch import ViTAdapter
    from hf_vitmerge.methods.regmean import regmean_points
    from hf_vitmerge.stats import _stats_worker_enabled, benchmark_throughput

    models, data, processor, arch = _setup(args.size, 2, args.images)
    residual, per_group = alignment_points(ViTAdapter.from_model(models[0]))
    collections = {
        "joint": (models, [*residual, *per_group.values()]),
        "one-model": (models[:1], regmean_points(arch.num_hidden_layers, True)),
    }
    rows = []
    for name, (ms, points) in collections.items():
        r = benchmark_throughput(
            ms, [data], [processor] * len(ms), points, args.batch_size, repeats=args.repeats
        )
        rows.append(
            {
                "shape": args.size,
                "collection": name,
                "models": len(ms),
                "points": len(points),
                "inference_img_s": round(r["inference_images_per_s"], 1),
                "statistics_img_s": round(r["stats_images_per_s"], 1),
                "ratio": round(r["ratio"], 3),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "threads": args.threads,
        "images": args.images,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "products_thread": _stats_worker_enabled("cpu"),
        "rows": rows,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    print("\n| shape | collection | inference img/s | statistics img/s | ratio |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['collection']} | {r['inference_img_s']} | {r['statistics_img_s']} | {r['ratio']} |"
        )


if __name__ == "__main__":
    main()
