"""Activation statistics on an accelerator: accuracy of the float32-product scheme and its speed.

Two random ViTs of the zoo's digits architecture (``hf_vitmerge.zoo.builder.SIZES``; ``--arch
base``: ViT-B/16, 224 px; ``tiny``: 16 px, for a smoke test on CPU) see the same random pixel batches, already on the device, so that only the forward
passes and the statistics are timed (no image decoding). For each collection

* ``joint``: both models, the alignment points (``residual, qk, vo, mlp``; ``D = 2 d``);
* ``one-model``: one model, RegMean's points (``attn_in, vo, fc1_in, mlp`` and the classifier input);

it reports plain forward throughput and throughput with the statistics hooks (images per second,
best of ``--repeats`` interleaved runs; ``ratio`` = statistics / plain), and the largest relative
error (Frobenius norm) of any point's second-moment matrix against the all-float64 product path
(``hf_vitmerge.stats.PRODUCT_DTYPE = torch.float64``).

    python benchmarks/cuda_stats.py --device cuda --arch base --json cuda_stats.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _collect(models, adapters, points, batches, device, product_dtype):
    import torch

    from hf_vitmerge import stats

    before = stats.PRODUCT_DTYPE
    stats.PRODUCT_DTYPE = product_dtype
    try:
        collector = stats._Collector(models, adapters, points, device)
        with torch.inference_mode():
            for x in batches:
                for model in models:
                    model(pixel_values=x)
        out = collector.finalize()
        collector.close()
    finally:
        stats.PRODUCT_DTYPE = before
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out


def _forward(models, batches, device) -> None:
    import torch

    with torch.inference_mode():
        for x in batches:
            for model in models:
                model(pixel_values=x)
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--arch", default="base", choices=["tiny", "small", "base"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import torch
    from transformers import ViTForImageClassification

    from hf_vitmerge.arch import ViTAdapter
    from hf_vitmerge.methods.regmean import regmean_points
    from hf_vitmerge.stats import statistics_points
    from hf_vitmerge.zoo.builder import SIZES

    torch.backends.cuda.matmul.allow_tf32 = False  # float32 forward passes, as on CPU
    cfg = SIZES[args.arch].archs["digits"].config([str(i) for i in range(10)])
    models = []
    for seed in range(2):
        torch.manual_seed(seed)
        models.append(ViTForImageClassification(cfg).to(args.device).eval())
    adapters = [ViTAdapter.from_model(m) for m in models]
    g = torch.Generator().manual_seed(0)
    px = cfg.image_size
    batches = [
        torch.randn(args.batch_size, 3, px, px, generator=g).to(args.device) for _ in range(args.batches)
    ]
    collections = {
        "joint": (models, statistics_points(adapters[0], ("residual", "qk", "vo", "mlp"))),
        "one-model": (models[:1], regmean_points(cfg.num_hidden_layers, True)),
    }
    images = args.batch_size * args.batches
    rows = []
    for name, (ms, points) in collections.items():
        ads = adapters[: len(ms)]
        _forward(ms, batches[:1], args.device)  # warm-up
        _collect(ms, ads, points, batches[:1], args.device, torch.float32)
        plain = stat = float("inf")
        for _ in range(args.repeats):  # interleaved
            t0 = time.perf_counter()
            _forward(ms, batches, args.device)
            plain = min(plain, time.perf_counter() - t0)
            t0 = time.perf_counter()
            fast = _collect(ms, ads, points, batches, args.device, torch.float32)
            stat = min(stat, time.perf_counter() - t0)
        exact = _collect(ms, ads, points, batches, args.device, torch.float64)
        errors = {
            p: float(
                torch.linalg.matrix_norm(fast[p].outer - exact[p].outer)
                / torch.linalg.matrix_norm(exact[p].outer)
            )
            for p in points
        }
        worst = max(errors, key=errors.get)
        rows.append(
            {
                "arch": args.arch,
                "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
                "collection": name,
                "models": len(ms),
                "points": len(points),
                "largest_feature_dim": max(fast[p].dim for p in points),
                "inference_img_s": round(images / plain, 1),
                "statistics_img_s": round(images / stat, 1),
                "ratio": round(plain / stat, 3),
                "max_rel_error_vs_float64": errors[worst],
                "worst_point": worst,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        del fast, exact
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    report = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "rows": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
