"""The embedded benchmark zoo: suites of real ``ViTForImageClassification`` models trained on this machine.

Data comes from scikit-learn's bundled digits and from images drawn with PIL; nothing is downloaded.

    from hf_vitmerge.zoo import build_suite, list_suites
    suite_json = build_suite("digits-domains", size="tiny", seed=0)
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError
from . import digits, hub, shapes
from .builder import SIZES, ZOO_VERSION, SizeSpec, SuiteSpec, build, default_out
from .train import ArchSpec, TrainSpec

__all__ = [
    "ArchSpec",
    "SIZES",
    "SUITES",
    "ZOO_VERSION",
    "SizeSpec",
    "SuiteSpec",
    "TrainSpec",
    "build_suite",
    "list_suites",
]

#: Domains of ``digits-domains`` (see :data:`hf_vitmerge.zoo.digits.DOMAINS`).
DIGIT_DOMAINS = ["inverted", "rotated", "mirrored", "shifted", "noisy"]


def _digit_groups(width: int) -> list[list[int]]:
    return [list(range(i, i + width)) for i in range(0, 10, width)]


def _scratch(steps: int, batch: int, lr: float) -> TrainSpec:
    return TrainSpec(steps=steps, batch_size=batch, lr=lr, max_shift=1)


#: hub-tasks: upstream labels merge each task kind's classes in groups of this size.
HUB_UPSTREAM_GROUP = 2
#: hub-tasks: number of overlapping coarse groupings of each task kind's classes in the upstream labels.
HUB_GROUPINGS = 2
#: hub-tasks recipes: pretraining to convergence, then Hub-style fine-tuning (lr 10x lower, few epochs).
HUB_PRETRAIN = {
    "tiny": TrainSpec(1500, 128, 2e-3, max_shift=1),
    "small": TrainSpec(2000, 128, 1e-3, max_shift=1),
    "base": TrainSpec(2, 8, 1e-4),
}
HUB_FINETUNE = {
    "tiny": TrainSpec(0, 32, 2e-4, weight_decay=0.0, epochs=5, head_lr_scale=5),
    "small": TrainSpec(0, 32, 1e-4, weight_decay=0.0, epochs=6, head_lr_scale=5),
    "base": TrainSpec(2, 8, 1e-5, weight_decay=0.0),
}

_SCRATCH = {"tiny": _scratch(300, 64, 2e-3), "small": _scratch(500, 64, 1e-3), "base": _scratch(2, 8, 1e-4)}


def _digit_split_suite(name: str, width: int, *, description: str, regime: str, design: str) -> SuiteSpec:
    """A suite of differently initialised models trained from scratch, each on its own ``width``
    consecutive digits (disjoint label spaces)."""
    return SuiteSpec(
        name=name,
        init="independent",
        family="digits",
        description=description,
        num_tasks=len(_digit_groups(width)),
        tasks=lambda size, arch, seed: digits.label_split_tasks(_digit_groups(width), arch.image_size, seed),
        recipes=_SCRATCH,
        regime=regime,
        design=design,
    )


SUITES: dict[str, SuiteSpec] = {
    s.name: s
    for s in (
        _digit_split_suite(
            "digits-split",
            5,
            description="2 differently initialised models: digits 0-4 and digits 5-9 (disjoint label spaces)",
            regime="A stress test for alignment methods (ZipIt!/MuDSC): different initialisations, so weights "
            "must be matched before they can be merged.",
            design="scikit-learn's 8x8 digits, upscaled (bilinear) to the model's image size, white on black, "
            "split 75/25 (stratified, seeded). Each model sees only its own five digits and is trained from "
            "its own random initialisation. Label index is the position of the digit within the task.",
        ),
        _digit_split_suite(
            "digits-split5",
            2,
            description="5 differently initialised models, 2 digits each (disjoint label spaces)",
            regime="A stress test for alignment methods: N > 2 models from different initialisations.",
            design="As `digits-split`, with five tasks of two digits each.",
        ),
        SuiteSpec(
            name="digits-domains",
            init="shared",
            family="digits",
            description=f"{len(DIGIT_DOMAINS)} domains of all 10 digits ({', '.join(DIGIT_DOMAINS)}), "
            "fine-tuned from one base",
            num_tasks=len(DIGIT_DOMAINS),
            tasks=lambda size, arch, seed: digits.domain_tasks(DIGIT_DOMAINS, arch.image_size, seed),
            pretrain=lambda size, arch, seed: digits.original_digits(arch.image_size, seed),
            recipes={
                "tiny": TrainSpec(400, 64, 1e-3),
                "small": TrainSpec(500, 64, 5e-4),
                "base": TrainSpec(2, 8, 1e-4),
            },
            pretrain_recipes={
                "tiny": TrainSpec(500, 64, 2e-3, max_shift=1),
                "small": TrainSpec(800, 64, 1e-3, max_shift=1),
                "base": TrainSpec(2, 8, 1e-4, max_shift=1),
            },
            regime="A stress test: a base pretrained on the original digits only, then 400 steps at a high "
            "learning rate per domain with contradicting geometric features, so task vectors are large and "
            "conflict.",
            design="The base is pretrained on the *original* digits (upscaled, white on black, random shifts "
            "of 1 px) over the 10 digit labels: the upstream data, like ImageNet for Hub ViTs. Each domain "
            "applies one transform to the same 75/25 split: inverted (255 - x), rotated 90 degrees, mirrored "
            "left-right, shifted (shrunk to 3/4 and moved to the bottom-right corner), noisy (strong "
            "Gaussian noise on gray). The geometric domains need contradicting spatial features, so plain "
            "averaging of the fine-tuned models is clearly below the individual models. Every domain model "
            "is fine-tuned from the whole base, classifier included, since the label space is the same.",
        ),
        SuiteSpec(
            name="shapes-tasks",
            init="shared",
            family="shapes",
            description=f"{len(shapes.SHAPE_TASKS)} tasks with their own label spaces on drawn images "
            "(kind, colour, count, size, orientation, fill, position, background, texture, ...), "
            "fine-tuned from one base",
            num_tasks=len(shapes.SHAPE_TASKS),
            tasks=lambda size, arch, seed: shapes.shape_tasks(
                arch.image_size, size.shapes_train, size.shapes_test, seed
            ),
            pretrain=lambda size, arch, seed: shapes.source_mixture(
                arch.image_size, max(1, size.shapes_train // 2), seed
            ),
            recipes={
                "tiny": TrainSpec(400, 64, 2e-3),
                "small": TrainSpec(400, 64, 5e-4),
                "base": TrainSpec(2, 8, 1e-4),
            },
            pretrain_recipes={
                "tiny": TrainSpec(250, 64, 2e-3),
                "small": TrainSpec(800, 64, 1e-3),
                "base": TrainSpec(2, 8, 1e-4),
            },
            regime="A stress test: task vectors from a high learning rate on a base pretrained only to tell the "
            "generators apart, so they are large and conflict; every static merge falls far below the "
            "individual models.",
            design="Images are drawn with PIL.ImageDraw at 4x and box-downsampled; every task has its own "
            "generator (own style, seeded per task and split) and its own label names. The base is pretrained "
            "on a mixture of images from every generator with the *generator* as label (which task drew this "
            "image?), which needs generic colour/shape/layout features but none of the tasks' labels. Each "
            "task model gets a new, seeded classifier for its labels and fine-tunes the whole network.",
        ),
        SuiteSpec(
            name="hub-tasks",
            init="shared",
            family="hub",
            description=f"{len(hub.TASK_KINDS)} tasks, each on its own kind of image with its own labels "
            f"({', '.join(k.name for k in hub.TASK_KINDS)}), fine-tuned Hub-style from one broadly "
            "pretrained base",
            num_tasks=len(hub.TASK_KINDS),
            tasks=lambda size, arch, seed: hub.hub_tasks(
                arch.image_size, size.hub_train, size.hub_test, seed
            ),
            pretrain=lambda size, arch, seed: hub.upstream_mixture(
                arch.image_size, size.hub_upstream, seed, group=HUB_UPSTREAM_GROUP, groupings=HUB_GROUPINGS
            ),
            recipes=HUB_FINETUNE,
            pretrain_recipes=HUB_PRETRAIN,
            regime="The regime users merge in: Hub fine-tunes of one broadly pretrained checkpoint "
            "(FusionBench's CLIP ViT 8-task setting). Task vectors are small and nearly orthogonal; plain "
            "averaging is clearly below the individual models but far above the stress suites. The default "
            "suite for judging methods and for the demo.",
            design=f"Every task draws its own kind of image (PIL, drawn at 4x and box-downsampled; digits from "
            "scikit-learn's bundled set), so a task can be told from its images. The base is pretrained to "
            f"convergence on an upstream mixture of {len(hub.KINDS)} kinds of image (the tasks' kinds and "
            f"{len(hub.KINDS) - len(hub.TASK_KINDS)} upstream-only kinds: "
            f"{', '.join(k.name for k in hub.KINDS if not k.task)}), fresh draws, with upstream labels that "
            f"are not the tasks' labels: each task kind's classes merged into groups of {HUB_UPSTREAM_GROUP} "
            f"(coarse labels; {HUB_GROUPINGS} overlapping groupings, one drawn at random per image, so the "
            "best possible upstream accuracy is below 1 but the base learns every distinction), the "
            "upstream-only kinds with their own classes, as ImageNet is to Hub fine-tunes. Each task model is then fine-tuned the way Hub models are: the whole network plus a "
            "new, seeded head for the task's labels, a learning rate 10x below pretraining (the new head at "
            "5x that), a few epochs, "
            "linear warm-up and cosine decay (`transformers.get_cosine_schedule_with_warmup`).",
        ),
    )
}


def list_suites() -> list[dict]:
    """The registered suites: ``name``, ``init``, ``num_tasks`` and ``description`` of each."""
    return [
        {"name": s.name, "init": s.init, "num_tasks": s.num_tasks, "description": s.description}
        for s in SUITES.values()
    ]


def build_suite(
    name: str,
    out: str | os.PathLike | None = None,
    *,
    size: str = "tiny",
    seed: int = 0,
    quiet: bool = False,
    overwrite: bool = False,
) -> Path:
    """Build suite ``name`` at ``size`` into ``out`` (default: the cache) and return its ``suite.json``.

    Deterministic for a given seed, and cached: when ``out`` already holds a finished build of the same
    suite, size, seed and zoo version, nothing is rebuilt. If ``out`` holds anything else,
    ``FileExistsError`` is raised unless ``overwrite`` is true. Raises ``ValueError`` for an unknown
    suite or size.
    """
    if name not in SUITES:
        raise InputError(f"unknown zoo suite {name!r}; choose one of: {', '.join(SUITES)}")
    if size not in SIZES:
        raise InputError(f"unknown zoo size {size!r}; choose one of: {', '.join(SIZES)}")
    target = default_out(name, size, seed) if out is None else Path(out)
    return build(SUITES[name], SIZES[size], target, int(seed), quiet, overwrite)
