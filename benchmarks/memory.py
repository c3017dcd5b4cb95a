"""Peak memory and time of streaming merges (any tensorwise method) over N ViT checkpoints.

Each measurement runs in a fresh subprocess that reports its own peak RSS (``VmHWM`` from
/proc/self/status: unlike ``ru_maxrss`` it is not inherited from the parent across fork/exec)
and the peaks of anonymous and file-backed resident memory (sampled every 5 ms), so
page-cache pages of memory-mapped inputs can be told apart from real allocations. Beside the
merges it measures the I/O floor: reading every byte of every input tensor once (the same
streaming reader the engine uses, :mod:`hf_vitmerge.streaming`) and writing one model.

``--methods`` takes registry names (any tensorwise method, e.g. ``tsv`` once it is
registered); an unknown name is an error listing the available ones. With ``--repeats R`` the
floor and the methods are run R times, interleaved (floor, m1, m2, ..., floor, m1, ...), and
each row keeps its fastest run and its largest memory peaks: on a shared machine the ratio to
the floor (``x_floor``) is the figure to read, not the seconds.

Inputs: ``--zoo DIR`` (a suite built with ``hf-vitmerge zoo build SUITE --size base``) or, by
default, N random ViT-B/16 checkpoints with a shared base (base + small noise, as fine-tunes
are) generated into ``--workdir``.

    python benchmarks/memory.py --size base --n 8 --methods average,task_arithmetic,ties,dare
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

SIZES = {
    "tiny": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
    ),
    "base": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        image_size=224,
        patch_size=16,
    ),
}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class _Sampler:
    """Peaks of RssAnon / RssFile of this process, sampled every 5 ms."""

    def __init__(self) -> None:
        self.anon = self.file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(0.005)

    def sample(self) -> None:
        self.anon = max(self.anon, _status_kb("RssAnon"))
        self.file = max(self.file, _status_kb("RssFile"))

    def __enter__(self) -> _Sampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def generate(workdir: Path, n: int, size: str, seed: int = 0) -> tuple[Path, list[Path]]:
    """A random ViT base and ``n`` perturbed copies (noise 1e-3), saved as safetensors folders."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(**SIZES[size], num_labels=10)
    base_dir = workdir / "base"
    if not (base_dir / "model.safetensors").is_file():
        _save_atomically(ViTForImageClassification(config), base_dir)
    base = ViTForImageClassification.from_pretrained(base_dir)
    paths = []
    for i in range(n):
        folder = workdir / f"model{i}"
        paths.append(folder)
        if (folder / "model.safetensors").is_file():
            continue
        g = torch.Generator().manual_seed(seed + 1 + i)
        model = ViTForImageClassification(config)
        with torch.no_grad():
            for p, q in zip(model.parameters(), base.parameters(), strict=True):
                p.copy_(q + 1e-3 * torch.randn(q.shape, generator=g))
        _save_atomically(model, folder)
        del model
    return base_dir, paths


def _save_atomically(model, folder: Path) -> None:
    """Save into a temporary folder, then rename: a run killed mid-save leaves no truncated
    checkpoint that a later run would take for a finished one."""
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(tmp)
    os.replace(tmp, folder)


def child(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    import hf_vitmerge as hv
    from hf_vitmerge.loading import resolve_model

    models = args.models.split(",")
    baseline_kb = _status_kb("VmHWM")
    out = Path(args.out)
    start, cpu_start = time.perf_counter(), time.process_time()
    with _Sampler() as mem:
        if args.task == "io":
            from safetensors.torch import save_file

            from hf_vitmerge.streaming import StackBuffers, StreamReader, file_order

            sources = [resolve_model(m, check_finite=False) for m in [args.base, *models]]
            readers = [StreamReader(s) for s in sources]
            buffers = StackBuffers(len(readers))
            keep = {}
            for key in file_order(sources[0].adapter.keys, readers[0]):
                stack, _ = buffers.views(readers[0].shape(key))
                for reader, row in zip(readers, stack, strict=True):
                    reader.read_into(key, row)  # every byte of every input is read
                keep[key] = stack[-1].clone()
            for r in readers:
                r.close()
            out.mkdir(parents=True, exist_ok=True)
            save_file(keep, str(out / "model.safetensors"))
        else:
            model = hv.merge(models, args.task, base_model=args.base, quiet=True)
            model.save_pretrained(out)
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    print(
        json.dumps(
            {
                "seconds": round(seconds, 2),
                "cpu_seconds": round(cpu_seconds, 2),
                "peak_rss_mb": round(_status_kb("VmHWM") / 1024, 1),
                "rss_after_imports_mb": round(baseline_kb / 1024, 1),
                "peak_anon_mb": round(mem.anon / 1024, 1),
                "peak_file_mb": round(mem.file / 1024, 1),
            }
        )
    )


def measure(task: str, base: Path, models: list[Path], out: Path, threads: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        task,
        "--threads",
        str(threads),
        "--base",
        str(base),
        "--models",
        ",".join(map(str, models)),
        "--out",
        str(out),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{task} failed:\n{res.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="base", choices=sorted(SIZES))
    parser.add_argument("--n", default="2,4,8", help="comma-separated numbers of models")
    parser.add_argument(
        "--methods", default="average,task_arithmetic,ties,dare", help="comma-separated tensorwise methods"
    )
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per row (best time kept)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in each measurement (1: on a shared machine, OpenMP threads that wait for "
        "a busy core spin; measured 3-16x slower with 2 threads under load)",
    )
    parser.add_argument(
        "--zoo", default=None, help="a suite folder with base/ and models/ (else random checkpoints)"
    )
    parser.add_argument(
        "--workdir",
        default=os.environ.get("HF_VITMERGE_MEMBENCH_DIR", "/tmp/hf_vitmerge_membench"),
        help="where the random checkpoints are generated (once); default $HF_VITMERGE_MEMBENCH_DIR",
    )
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--base", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--models", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.task = args.child
        child(args)
        return
    counts = [int(x) for x in args.n.split(",")]
    methods = check_methods(args.methods)
    workdir = Path(args.workdir)
    if args.zoo:
        zoo = Path(args.zoo)
        base, all_models = zoo / "base", sorted((zoo / "models").iterdir())
        source = f"zoo suite {zoo}"
    else:
        base, all_models = generate(workdir, max(counts), args.size)
        source = f"{max(counts)} random ViT ({args.size}) checkpoints = base + N(0, 1e-3) noise, in {workdir}"
    model_mb = round((base / "model.safetensors").stat().st_size / 2**20, 1)
    rows = []
    for n in counts:
        models = all_models[:n]
        if len(models) < n:
            raise SystemExit(f"only {len(models)} models available, asked for {n}")
        tasks = ["io", *methods]
        runs: dict[str, list[dict]] = {t: [] for t in tasks}
        for _ in range(args.repeats):  # interleaved, so a busy spell hits floor and methods alike
            for task in tasks:
                runs[task].append(measure(task, base, models, workdir / f"out-{task}-{n}", args.threads))
                print(task, json.dumps(runs[task][-1]), flush=True)
        best = {t: _best(r) for t, r in runs.items()}
        floor = best["io"]
        for task in tasks:
            r = dict(best[task])
            r["x_floor"] = round(r["seconds"] / floor["seconds"], 2)
            r["anon_over_floor_mb"] = round(r["peak_anon_mb"] - floor["peak_anon_mb"], 1)
            r["all_seconds"] = [x["seconds"] for x in runs[task]]
            rows.append({"task": "read inputs + write one model" if task == "io" else task, "n": n, **r})
    report = {
        "source": source,
        "model_mb": model_mb,
        "threads": args.threads,
        "repeats": args.repeats,
        "command": " ".join(sys.argv),
        "rows": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"\nOne input checkpoint: {model_mb} MB ({source})\n")
    print(
        "| task | N | seconds (best) | x floor | peak RSS MB | after imports MB | peak anon MB "
        "| anon - floor's MB | peak file-backed MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['task']} | {r['n']} | {r['seconds']} | {r['x_floor']} | {r['peak_rss_mb']} "
            f"| {r['rss_after_imports_mb']} | {r['peak_anon_mb']} | {r['anon_over_floor_mb']} | {r['peak_file_mb']} |"
        )


def _best(runs: list[dict]) -> dict:
    """The fastest run's time, the largest memory peaks over all runs."""
    out = dict(min(runs, key=lambda r: r["seconds"]))
    for k in ("peak_rss_mb", "peak_anon_mb", "peak_file_mb"):
        out[k] = max(r[k] for r in runs)
    return out


def check_methods(text: str) -> list[str]:
    """Registry names of tensorwise methods; anything else is a clear error (before any run)."""
    from hf_vitmerge.methods import available_methods, get_method

    names = [m.strip() for m in text.split(",") if m.strip()]
    tensorwise = [m for m in available_methods() if get_method(m).kind == "tensorwise"]
    for name in names:
        try:
            spec = get_method(name)
        except ValueError:
            raise SystemExit(
                f"error: unknown merge method {name!r} in --methods; tensorwise methods available: "
                f"{', '.join(tensorwise)}"
            ) from None
        if spec.kind != "tensorwise":
            raise SystemExit(
                f"error: {name!r} is a {spec.kind}-level method (it needs calibration data); this benchmark "
                f"merges checkpoints without data. Tensorwise methods: {', '.join(tensorwise)}"
            )
    return names


if __name__ == "__main__":
    main()
