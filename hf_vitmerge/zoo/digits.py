"""Digit tasks from scikit-learn's bundled ``load_digits`` (1797 8x8 images; nothing is downloaded).

The 8x8 images are upscaled (bilinear) to the model's image size and stored as RGB. Train/test
splits are stratified 75/25 and seeded. Domains are deterministic transforms of the same split that
change the input distribution for real (photometric, geometric, scale/position, noise, colour).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
from PIL import Image

from .data import TaskData

DIGIT_LABELS = [str(d) for d in range(10)]
TEST_FRACTION = 0.25


@lru_cache(maxsize=4)
def digit_arrays(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as ``uint8`` grayscale ``(N, S, S)`` arrays (white on black) and their targets."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    big = np.stack(
        [
            np.asarray(
                Image.fromarray(img, mode="L").resize((image_size, image_size), Image.Resampling.BILINEAR)
            )
            for img in small
        ]
    )
    return big, digits.target.astype(np.int64)


def split_indices(targets: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded 75/25 train/test indices (sorted)."""
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(
        np.arange(len(targets)), test_size=TEST_FRACTION, stratify=targets, random_state=seed
    )
    return np.sort(train), np.sort(test)


def _rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


def _inverted(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _rgb(255 - gray)


def _rotated(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _rgb(np.rot90(gray, k=1).copy())


def _mirrored(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _rgb(gray[:, ::-1].copy())


def _flipped(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _rgb(gray[::-1, :].copy())


def _shifted(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Digit shrunk to 3/4 of the frame and moved to the bottom-right corner (jitter of 1 px)."""
    s = gray.shape[0]
    k = max(2, round(s * 3 / 4))
    small = np.asarray(Image.fromarray(gray).resize((k, k), Image.Resampling.BILINEAR))
    out = np.zeros_like(gray)
    y, x = s - k - rng.integers(0, min(2, s - k + 1), size=2)
    out[y : y + k, x : x + k] = small
    return _rgb(out)


def _noisy(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Heavy Gaussian pixel noise (sigma 40/255) per channel, on a mid-gray background."""
    base = 40.0 + gray.astype(np.float64) * (175.0 / 255.0)
    noisy = base[..., None] + rng.normal(0.0, 40.0, size=(*gray.shape, 3))
    return np.clip(noisy, 0, 255).round().astype(np.uint8)


def _colored(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The digit in one random colour over a different random colour."""
    fg, bg = rng.integers(0, 256, size=3), rng.integers(0, 256, size=3)
    while np.abs(fg.astype(int) - bg.astype(int)).sum() < 250:
        fg, bg = rng.integers(0, 256, size=3), rng.integers(0, 256, size=3)
    a = gray.astype(np.float64)[..., None] / 255.0
    return (a * fg + (1 - a) * bg).round().astype(np.uint8)


#: Domain name -> (transform of one grayscale digit into an RGB array, description).
DOMAINS: dict[str, tuple[Callable[[np.ndarray, np.random.Generator], np.ndarray], str]] = {
    "inverted": (_inverted, "black digit on white (255 - x)"),
    "rotated": (_rotated, "rotated 90 degrees counter-clockwise"),
    "mirrored": (_mirrored, "mirrored left-right"),
    "flipped": (_flipped, "flipped upside-down"),
    "shifted": (_shifted, "shrunk to 3/4 of the frame, moved to the bottom-right corner"),
    "noisy": (_noisy, "on mid-gray with strong Gaussian noise (sigma 40/255) per channel"),
    "colored": (_colored, "random foreground and background colours"),
}


def _images(arrays: Sequence[np.ndarray]) -> list[Image.Image]:
    return [Image.fromarray(a, mode="RGB") for a in arrays]


def label_split_tasks(groups: Sequence[Sequence[int]], image_size: int, seed: int) -> list[TaskData]:
    """One task per group of digits; labels are the digit strings, indexed within the task."""
    images, targets = digit_arrays(image_size)
    train, test = split_indices(targets, seed)
    tasks = []
    for group in groups:
        index = {d: i for i, d in enumerate(group)}
        name = f"digits-{group[0]}to{group[-1]}" if len(group) > 2 else "digits-" + "".join(map(str, group))
        tr = [i for i in train if targets[i] in index]
        te = [i for i in test if targets[i] in index]
        tasks.append(
            TaskData(
                name=name,
                labels=[str(d) for d in group],
                train_images=_images([_rgb(images[i]) for i in tr]),
                train_labels=[index[int(targets[i])] for i in tr],
                test_images=_images([_rgb(images[i]) for i in te]),
                test_labels=[index[int(targets[i])] for i in te],
                description=f"digits {', '.join(map(str, group))} (white on black)",
            )
        )
    return tasks


def original_digits(image_size: int, seed: int) -> TaskData:
    """All ten digits, untransformed (white on black): the upstream data of the shared-init base."""
    return label_split_tasks([list(range(10))], image_size, seed)[0]


def domain_tasks(domains: Sequence[str], image_size: int, seed: int) -> list[TaskData]:
    """One task per domain: every digit of the shared split, transformed; labels ``"0"``..``"9"``."""
    images, targets = digit_arrays(image_size)
    train, test = split_indices(targets, seed)
    tasks = []
    for k, name in enumerate(domains):
        fn, description = DOMAINS[name]
        rng = np.random.default_rng([seed, k, 7])
        tasks.append(
            TaskData(
                name=name,
                labels=list(DIGIT_LABELS),
                train_images=_images([fn(images[i], rng) for i in train]),
                train_labels=[int(targets[i]) for i in train],
                test_images=_images([fn(images[i], rng) for i in test]),
                test_labels=[int(targets[i]) for i in test],
                description=description,
            )
        )
    return tasks
