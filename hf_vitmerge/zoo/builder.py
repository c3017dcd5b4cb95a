"""Building a suite on disk: data folders, training, model folders, suite.json, README, cache.

A build is written into a temporary sibling folder and moved into place with ``os.replace`` at the
end, so an interrupted build never leaves a half suite. ``build_info.json`` holds the fingerprint
(suite, size, seed, zoo version) that makes a rebuild of the same thing a no-op.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import PIL
import torch
import transformers
from tqdm.auto import tqdm

from ..errors import OutputExistsError
from . import realism
from .data import TaskData
from .train import (
    ArchSpec,
    TrainSpec,
    accuracy,
    derive_seed,
    deterministic_torch,
    new_model,
    processor_pixels,
    reset_head,
    seed_everything,
    train_classifier,
)

#: Bumped whenever a change to the zoo changes what a build produces (invalidates caches).
ZOO_VERSION = "3"
#: Per-suite versions, for changes that alter only one suite's builds (kept out of the others').
# shapes-tasks looks-1: every task drawn in its own frame; hub-tasks 2: grid lines two pixels
# wide, 2000 training images per task at tiny.
SUITE_VERSIONS = {"shapes-tasks": "looks-1", "hub-tasks": "2"}


@dataclass(frozen=True)
class SizeSpec:
    """One zoo size: the architecture per data family and the data budget."""

    name: str
    archs: dict[str, ArchSpec]  # "digits" / "shapes" -> architecture
    shapes_train: int  # drawn images per shapes task (train)
    shapes_test: int
    pixel_limit: int | None = None  # train/evaluate on the first N images only (base size: speed figures)
    note: str = ""
    hub_train: int = 1000  # hub-tasks: drawn images per task (train / test) and per upstream kind
    hub_test: int = 300
    hub_upstream: int = 1500


_VIT_B16 = ArchSpec(224, 16, 768, 12, 12, 3072)


def _archs(digits: ArchSpec, drawn: ArchSpec | None = None) -> dict[str, ArchSpec]:
    """``SizeSpec.archs``: the digits' architecture and one for the drawn images of the shapes and
    hub families (the digits' unless given)."""
    drawn = drawn or digits
    return {"digits": digits, "shapes": drawn, "hub": drawn}


SIZES: dict[str, SizeSpec] = {
    "tiny": SizeSpec(
        "tiny",
        _archs(ArchSpec(16, 4, 64, 3, 4, 128), ArchSpec(24, 4, 64, 3, 4, 128)),
        shapes_train=600,
        shapes_test=300,
        hub_train=2000,  # 1000 left the textures model at 0.88 (train 1.00): more images, not more epochs
        note="CI-sized: builds in a few minutes on 2 CPU cores.",
    ),
    "small": SizeSpec(
        "small",
        _archs(ArchSpec(32, 4, 128, 6, 4, 256)),
        shapes_train=1500,
        shapes_test=400,
        hub_train=1500,
        hub_test=400,
        hub_upstream=3000,
        note="Benchmark-sized.",
    ),
    "base": SizeSpec(
        "base",
        _archs(_VIT_B16),
        shapes_train=64,
        shapes_test=32,
        hub_train=64,
        hub_test=32,
        hub_upstream=16,
        pixel_limit=32,
        note=(
            "ViT-B/16 shapes for speed and memory figures ONLY: the models are trained for a handful of "
            "steps on a few images, so their accuracies are MEANINGLESS."
        ),
    ),
}


@dataclass(frozen=True)
class SuiteSpec:
    """A registered suite: how to make its data and how to train its models at each size."""

    name: str
    init: str  # "independent" or "shared"
    family: str  # key into SizeSpec.archs
    description: str
    num_tasks: int
    tasks: Callable[[SizeSpec, ArchSpec, int], list[TaskData]]
    recipes: dict[str, TrainSpec]  # size -> recipe of the task models
    pretrain: Callable[[SizeSpec, ArchSpec, int], TaskData] | None = None
    pretrain_recipes: dict[str, TrainSpec] = field(default_factory=dict)
    design: str = ""  # a paragraph for the README: why the suite is built the way it is
    regime: str = ""  # one line for the README: which regime the suite stands for


@dataclass
class _Trained:
    name: str
    accuracy: float
    samples: int
    seconds: float
    init: str
    recipe: str = ""
    data: str = ""


def default_out(suite: str, size: str, seed: int) -> Path:
    """``$HF_VITMERGE_CACHE`` (or ``~/.cache/hf_vitmerge``) ``/zoo/<suite>-<size>-seed<seed>``."""
    root = os.environ.get("HF_VITMERGE_CACHE") or Path.home() / ".cache" / "hf_vitmerge"
    return Path(root) / "zoo" / f"{suite}-{size}-seed{seed}"


def fingerprint(suite: str, size: str, seed: int) -> dict:
    """What identifies a build: equal fingerprints mean equal model files."""
    fp = {"suite": suite, "size": size, "seed": int(seed), "zoo_version": ZOO_VERSION}
    if suite in SUITE_VERSIONS:
        fp["suite_version"] = SUITE_VERSIONS[suite]
    return fp


def _existing_build(out: Path, fp: dict, overwrite: bool) -> Path | None:
    """The suite.json of a finished identical build in ``out``; raise if ``out`` holds something else."""
    if not out.exists():
        return None
    if not out.is_dir():
        if overwrite:
            return None
        raise OutputExistsError(
            f"{out} exists and is not a folder; remove it or choose another output folder."
        )
    info = out / "build_info.json"
    if info.is_file() and (out / "suite.json").is_file():
        try:
            found = json.loads(info.read_text()).get("fingerprint")
        except json.JSONDecodeError:
            found = None
        if found == fp:
            return out / "suite.json"
        what = f"a different zoo build ({found})" if found else "an unreadable zoo build"
    elif any(out.iterdir()):
        what = "files that are not a zoo build"
    else:
        return None
    if overwrite:
        return None
    raise OutputExistsError(
        f"{out} already holds {what}, not {fp}. Pass overwrite=True (CLI: --overwrite) to replace it, "
        "or choose another output folder."
    )


def _pixels(arch: ArchSpec, images: list, labels: list[int], limit: int | None) -> tuple[torch.Tensor, ...]:
    n = len(images) if limit is None else min(limit, len(images))
    return processor_pixels(arch.processor(), images[:n]), torch.tensor(labels[:n], dtype=torch.long)


def _zoo_card(suite: SuiteSpec, size: SizeSpec, title: str, intro: str, facts: list[str]) -> str:
    """A zoo model folder's card: front matter, title, what the model is, facts, how to load it."""
    lines = "\n".join(f"- {f}" for f in facts) + (f"\n- {size.note}" if size.note else "\n")
    return f"""---
library_name: transformers
pipeline_tag: image-classification
tags:
- hf_vitmerge
- hf_vitmerge-zoo
- {suite.name}
---

# {title}

{intro}

{lines}

Load with `AutoModelForImageClassification.from_pretrained` and `AutoImageProcessor.from_pretrained`.
The suite's README.md describes the data, architecture and training recipe.
"""


def _model_card(suite: SuiteSpec, size: SizeSpec, seed: int, task: TaskData, result: _Trained) -> str:
    labels = ", ".join(f"`{x}`" for x in task.labels)
    return _zoo_card(
        suite,
        size,
        f"{suite.name} / {task.name} ({size.name}, seed {seed})",
        f"A `ViTForImageClassification` of the hf_vitmerge benchmark zoo, suite `{suite.name}`\n"
        f"({suite.init} initialisation), trained on this machine by `hf-vitmerge zoo build`.",
        [
            f"Task: {task.description}",
            f"Labels: {labels}",
            f"Initialisation: {result.init}",
            f"Test accuracy (own test split, {result.samples} images): {result.accuracy:.4f}",
        ],
    )


def _base_card(suite: SuiteSpec, size: SizeSpec, seed: int, result: _Trained) -> str:
    return _zoo_card(
        suite,
        size,
        f"{suite.name} / base ({size.name}, seed {seed})",
        f"The shared pre-trained `ViTForImageClassification` of the hf_vitmerge benchmark zoo, suite\n"
        f"`{suite.name}`: every task model of the suite was fine-tuned from it, so it is the `base_model` of\n"
        "task-vector merges. Trained on this machine by `hf-vitmerge zoo build`.",
        [
            f"Pre-training data: {result.data}",
            f"Recipe: {result.recipe}",
            f"Test accuracy (upstream test split, {result.samples} images): {result.accuracy:.4f}",
        ],
    )


_REPRO = (
    "The build is deterministic on one machine: the same suite, size, seed, library versions "
    "(torch, transformers, numpy, Pillow, hf_vitmerge) and torch thread count give the same "
    "`model.safetensors` and accuracies (`build_info.json` records them). A different torch or thread "
    "count changes the floating-point summation order and so the weights in their last bits and, "
    "through training, accuracies by a little; a different Pillow can change the drawn images; a "
    "different CPU instruction set (e.g. AVX-512 vs AVX2) can change low-order bits as well."
)


def _realism_lines(real: dict) -> list[str]:
    return [
        "## What makes it realistic (measured on the built models)",
        "",
        "| figure | value | Hub fine-tunes / published |",
        "|---|---|---|",
        f"| pairwise task-vector cosine, median | {real['task_vector_cosine_median']:.3f} | close to 0 |",
        f"| pairwise task-vector cosine, max | {real['task_vector_cosine_max']:.3f} | small |",
        f"| task-vector norm / base-weight norm, median | {real['task_vector_relative_norm_median']:.4f} | small |",
        f"| plain averaging, normalized accuracy | {real['averaging_normalized_accuracy']:.3f} | 0.6-0.9 "
        "(ViT-B/32 0.74, ViT-L/14 about 0.85) |",
        f"| task identifiability (logistic regression on base [CLS] features) | "
        f"{real['task_identifiability']:.3f} | near 1 (each task its own kind of image) |",
        "",
        "Task vectors exclude the classifier. Averaging keeps each task's own classifier on the averaged "
        "backbone and scores each task within its own labels (the per-task rule of `hf-vitmerge bench`).",
        "",
    ]


def _repro_and_layout_lines(env: dict, has_base: bool, has_realism: bool) -> list[str]:
    """The suite README's closing sections: what can change a rebuild, and the folder layout."""
    return [
        "## Reproducibility",
        "",
        _REPRO,
        "",
        "This build: " + ", ".join(f"{k} `{v}`" for k, v in env.items()) + ".",
        "",
        "## Layout",
        "",
        "`suite.json` (hf_vitmerge INTERFACES.md section 2), "
        + ("`base/` (the shared base model), " if has_base else "")
        + "`models/<task>/` (Hugging Face model folders), `data/<task>/{train,test}` (`datasets.save_to_disk`, "
        "columns `image` and `label`), `build_info.json` (fingerprint, versions, threads, accuracies"
        + (", realism figures" if has_realism else "")
        + ").",
        "",
    ]


def _readme(
    suite: SuiteSpec,
    size: SizeSpec,
    seed: int,
    arch: ArchSpec,
    tasks: list[TaskData],
    results: list[_Trained],
    base: _Trained | None,
    seconds: float,
    real: dict | None = None,
    env: dict | None = None,
) -> str:
    rows = "\n".join(
        f"| `{t.name}` | {len(t.labels)} | {len(t.train_images)} / {len(t.test_images)} | {t.description} | "
        f"{r.accuracy:.4f} |"
        for t, r in zip(tasks, results, strict=True)
    )
    mean = sum(r.accuracy for r in results) / len(results)
    lines = [
        f"# hf_vitmerge zoo suite `{suite.name}` (size `{size.name}`, seed {seed})",
        "",
        suite.description + ".",
        "",
        f"**Regime.** {suite.regime}" if suite.regime else "",
        "",
        f"**Size note.** {size.note}" if size.note else "",
        "",
        "## How it was made",
        "",
        suite.design,
        "",
        f"- Initialisation: `{suite.init}`"
        + (
            " (each task model from its own random initialisation, seeded from the suite seed and task index)"
            if suite.init == "independent"
            else " (every task model fine-tuned from `base/`)"
        ),
        f"- Architecture (all models, labels aside): `ViTForImageClassification`, {json.dumps(asdict(arch))}, "
        "GELU, qkv bias, no dropout.",
        "- Preprocessing: the saved `ViTImageProcessor` (resize to the stored size, i.e. a no-op; rescale 1/255; "
        "normalise with mean 0.5 and std 0.5). Training used the processor's own outputs, loaded back "
        "with `AutoImageProcessor`, so training and evaluation inputs are identical.",
        f"- Task-model recipe: {results[0].recipe} (steps for the first task's data).",
    ]
    if base is not None:
        lines.append(
            f"- Base pretraining: {base.recipe}; {base.data}; accuracy on its held-out pretraining data: "
            f"{base.accuracy:.4f} ({base.samples} images)."
        )
    if size.pixel_limit is not None:
        lines.append(
            f"- Data budget: models were trained and evaluated on the first {size.pixel_limit} images of each split only."
        )
    lines += [
        f"- Seeds: suite seed {seed}; every other seed (splits, drawings, initialisations, heads, batch order) "
        "is derived from it (`transformers.set_seed` and `derive_seed`).",
        "",
        "## Tasks and individual accuracies",
        "",
        "| task | labels | train / test images | data | test accuracy |",
        "|---|---|---|---|---|",
        rows,
        "",
        f"Mean individual accuracy: **{mean:.4f}**. Build time: {seconds:.0f} s.",
        "",
    ]
    if real is not None:
        lines += _realism_lines(real)
    lines += _repro_and_layout_lines(env or {}, base is not None, real is not None)
    return "\n".join(lines)


def _save_model(model, arch: ArchSpec, folder: Path, card: str | None = None) -> None:
    model.save_pretrained(folder)
    arch.processor().save_pretrained(folder)
    if card is not None:
        (folder / "README.md").write_text(card)


def _pretrain(suite: SuiteSpec, size: SizeSpec, arch: ArchSpec, seed: int, quiet: bool):
    """The shared base, pretrained on the suite's upstream data; returns it and its result."""
    assert suite.pretrain is not None
    data = suite.pretrain(size, arch, seed)
    x, y = _pixels(arch, data.train_images, data.train_labels, size.pixel_limit)
    xt, yt = _pixels(arch, data.test_images, data.test_labels, size.pixel_limit)
    t0 = time.perf_counter()
    model = new_model(arch, data.labels, derive_seed(seed, suite.name, "base"))
    recipe = suite.pretrain_recipes[size.name]
    train_classifier(model, x, y, recipe, derive_seed(seed, "pretrain"), desc="base", quiet=quiet)
    result = _Trained("base", accuracy(model, xt, yt), len(yt), time.perf_counter() - t0, "random")
    result.recipe = recipe.describe(len(y))
    result.data = f"{len(y)} train / {len(yt)} test images, {len(data.labels)} upstream labels"
    return model, result


def _train_task(
    suite: SuiteSpec, size: SizeSpec, arch: ArchSpec, seed: int, k: int, task: TaskData, base, quiet
):
    """Train task ``k`` (from scratch or from ``base``); returns the model, its result and its pixels."""
    x, y = _pixels(arch, task.train_images, task.train_labels, size.pixel_limit)
    xt, yt = _pixels(arch, task.test_images, task.test_labels, size.pixel_limit)
    t0 = time.perf_counter()
    if base is None:
        model = new_model(arch, task.labels, derive_seed(seed, suite.name, k, "init"))
        init = f"random (seed {derive_seed(seed, suite.name, k, 'init')})"
    else:
        model = copy.deepcopy(base)
        if list(base.config.id2label.values()) == list(task.labels):
            init = "the suite's `base/` model, classifier included (same label space)"
        else:
            reset_head(model, task.labels, derive_seed(seed, suite.name, k, "head"))
            init = "the suite's `base/` backbone with a new, seeded classifier for this task's labels"
    recipe = suite.recipes[size.name]
    train_classifier(
        model, x, y, recipe, derive_seed(seed, suite.name, k, "train"), desc=task.name, quiet=quiet
    )
    result = _Trained(task.name, accuracy(model, xt, yt), len(yt), time.perf_counter() - t0, init)
    result.recipe = recipe.describe(len(y))
    return model, result, (x, y, xt, yt)


def _suite_json(
    suite: SuiteSpec, size: SizeSpec, seed: int, tasks: list[TaskData], results, has_base
) -> dict:
    return {
        "name": suite.name,
        "init": suite.init,
        "base_model": "base" if has_base else None,
        "tasks": [
            {
                "name": t.name,
                "model": f"models/{t.name}",
                "labels": list(t.labels),
                "train": f"data/{t.name}/train",
                "test": f"data/{t.name}/test",
                "image_column": "image",
                "label_column": "label",
                "individual_accuracy": round(r.accuracy, 6),
                "individual_accuracy_samples": r.samples,
            }
            for t, r in zip(tasks, results, strict=True)
        ],
        "size": size.name,
        "seed": int(seed),
        "zoo_version": ZOO_VERSION,
    }


def environment_info() -> dict:
    """What a build's numbers depend on besides its seed: library versions, threads, machine."""
    from .. import __version__

    return {
        "hf_vitmerge_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "numpy_version": np.__version__,
        "pillow_version": PIL.__version__,
        "python_version": platform.python_version(),
        "torch_num_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }


def _build_into(tmp: Path, suite: SuiteSpec, size: SizeSpec, seed: int, quiet: bool) -> None:
    """Make the whole suite inside ``tmp`` (which exists and is empty)."""
    start = time.perf_counter()
    arch = size.archs[suite.family]
    seed_everything(seed)
    tasks = suite.tasks(size, arch, seed)
    bar = tqdm(total=len(tasks) + (suite.init == "shared"), desc=f"{suite.name} ({size.name})", disable=quiet)
    base_model, base_result = None, None
    if suite.init == "shared":
        base_model, base_result = _pretrain(suite, size, arch, seed, quiet)
        _save_model(base_model, arch, tmp / "base", _base_card(suite, size, seed, base_result))
        bar.update()
    results, kept = [], []
    measure = base_model is not None and size.pixel_limit is None
    for k, task in enumerate(tasks):
        task.save(tmp / "data" / task.name)
        model, result, pixels = _train_task(suite, size, arch, seed, k, task, base_model, quiet)
        results.append(result)
        _save_model(model, arch, tmp / "models" / task.name, _model_card(suite, size, seed, task, result))
        if measure:
            kept.append((model, pixels))
        bar.set_postfix({task.name: f"{result.accuracy:.3f}"}, refresh=False)
        bar.update()
    bar.close()
    real = None
    if measure:
        real = realism.measure(
            base_model, [m for m, _ in kept], [p for _, p in kept], [r.accuracy for r in results]
        )
    (tmp / "suite.json").write_text(
        json.dumps(_suite_json(suite, size, seed, tasks, results, base_model is not None), indent=2) + "\n"
    )
    seconds = time.perf_counter() - start
    env = environment_info()
    (tmp / "README.md").write_text(
        _readme(suite, size, seed, arch, tasks, results, base_result, seconds, real, env)
    )
    info = {
        "fingerprint": fingerprint(suite.name, size.name, seed),
        "build_seconds": round(seconds, 1),
        "base_accuracy": None if base_result is None else round(base_result.accuracy, 6),
        "individual_accuracy": {r.name: round(r.accuracy, 6) for r in results},
        "realism": real,
        **env,
    }
    (tmp / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")


@contextlib.contextmanager
def _library_output_silenced():
    """Silence the progress bars and warnings of ``datasets``/``transformers``: the zoo shows its own."""
    import datasets

    ds_bars = datasets.is_progress_bar_enabled()
    tf_bars = transformers.utils.logging.is_progress_bar_enabled()
    tf_level = transformers.utils.logging.get_verbosity()
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.utils.logging.set_verbosity(tf_level)
        if tf_bars:
            transformers.utils.logging.enable_progress_bar()
        if ds_bars:
            datasets.enable_progress_bars()


def _remove_stale_partials(out: Path) -> None:
    """Delete temporary build folders next to ``out`` left by killed builds (their process is gone)."""
    for tmp in out.parent.glob(f".{out.name}.partial-*"):
        try:
            os.kill(int(tmp.name.rsplit("-", 1)[1]), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass  # the process exists (another user's build)


def build(suite: SuiteSpec, size: SizeSpec, out: Path, seed: int, quiet: bool, overwrite: bool) -> Path:
    """Build ``suite`` at ``size`` into ``out`` (atomically, cached); returns ``out/suite.json``."""
    fp = fingerprint(suite.name, size.name, seed)
    done = _existing_build(out, fp, overwrite)
    if done is not None:
        return done
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with deterministic_torch(), _library_output_silenced():
            _build_into(tmp, suite, size, seed, quiet)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / "suite.json"
