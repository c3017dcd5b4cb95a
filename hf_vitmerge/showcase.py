"""``hf-vitmerge demo``: several merge methods side by side on the default suite, and the best one saved.

The demo builds (or reuses from the cache) the default suite, runs every method of
:data:`DEMO_METHODS` with the same calibration data and seed, evaluates each against the individual
models and their ensemble, and writes the recommended merged model (image processor and model card
included) next to ``results.json`` and ``results.md``. Change the ``DEMO_*`` constants to point the
demo elsewhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ._version import __version__
from .api import _write_text, bench, check_output_dir, results_markdown, run_merge, suite_config
from .zoo import build_suite

#: The suite the demo merges (built with ``hf_vitmerge.zoo.build_suite`` at the requested size).
DEMO_SUITE = "hub-tasks"
#: The methods compared side by side, as ``bench`` method specs (name, parameters).
DEMO_METHODS: list[tuple[str, dict]] = [
    ("average", {}),
    ("task_arithmetic", {"scaling": 0.3}),
    ("ties", {}),
    ("regmean", {}),
    ("gated", {}),
]
#: Prefer a plain ``ViTForImageClassification`` (no custom code) when its normalized accuracy is
#: within this margin of the best method's.
DEMO_PLAIN_MARGIN = 0.02
#: Folder name of the recommended merged model inside the demo's output folder.
DEMO_MODEL_DIR = "merged-model"


def _is_plain(result: dict) -> bool:
    return result.get("info", {}).get("model_class") == "ViTForImageClassification"


def recommend(results: list[dict], plain_margin: float = DEMO_PLAIN_MARGIN) -> dict:
    """The result to recommend: the best normalized accuracy, or a plain ViT within ``plain_margin`` of it."""
    best = max(results, key=lambda r: r["normalized_accuracy"])
    plain = [r for r in results if _is_plain(r)]
    if plain and not _is_plain(best):
        best_plain = max(plain, key=lambda r: r["normalized_accuracy"])
        if best_plain["normalized_accuracy"] >= best["normalized_accuracy"] - plain_margin:
            return best_plain
    return best


def _why(choice: dict, results: list[dict]) -> str:
    best = max(results, key=lambda r: r["normalized_accuracy"])
    if choice is best:
        return f"`{choice['method']}` has the best normalized accuracy ({choice['normalized_accuracy']:.3f})."
    return (
        f"`{choice['method']}` ({choice['normalized_accuracy']:.3f} normalized) is a plain "
        f"`ViTForImageClassification` within {DEMO_PLAIN_MARGIN} of the best method `{best['method']}` "
        f"({best['normalized_accuracy']:.3f}), which needs custom code."
    )


def demo(
    out_dir: str | os.PathLike = "hf-vitmerge-demo",
    *,
    size: str = "tiny",
    seed: int = 0,
    overwrite: bool = False,
    quiet: bool = False,
) -> dict:
    """Build (or reuse) the default suite, compare :data:`DEMO_METHODS`, save the recommended merge.

    Writes ``out_dir/results.json`` and ``results.md`` (every method against the individual models and
    the ensemble) and ``out_dir/merged-model`` (the recommended merged model, loadable with
    ``pipeline("image-classification", model=...)``, with its model card). Returns the paths and report.
    """

    out = Path(out_dir)
    model_dir = out / DEMO_MODEL_DIR
    check_output_dir(model_dir, overwrite)
    suite_json = build_suite(DEMO_SUITE, size=size, seed=seed, quiet=quiet)
    report = bench(suite_json, DEMO_METHODS, seed=seed, quiet=quiet)
    choice = recommend(report["results"])
    params = next(p for m, p in DEMO_METHODS if m == choice["method"])
    config = suite_config(suite_json, choice["method"], params, seed=seed)
    run = run_merge(config, model_dir, overwrite=overwrite, evaluation_suite=str(suite_json), quiet=quiet)
    report["recommended"] = {
        "method": choice["method"],
        "params": choice["params"],
        "folder": DEMO_MODEL_DIR,
        "why": _why(choice, report["results"]),
        "architecture": (run.model.config.architectures or [type(run.model).__name__])[0],
    }
    report["suite_size"] = size
    report["hf_vitmerge_version"] = __version__
    _write_text(out / "results.json", json.dumps(report, indent=2))
    md = results_markdown(report)
    md += (
        f"\nRecommended: `{choice['method']}`, saved in `{DEMO_MODEL_DIR}/`. {report['recommended']['why']}\n"
    )
    _write_text(out / "results.md", md)
    return {
        "suite": Path(suite_json),
        "model": model_dir,
        "results_json": out / "results.json",
        "results_md": out / "results.md",
        "report": report,
    }
