"""In-memory task data shared by the zoo suites, and its conversion to ``datasets`` folders."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image


@dataclass
class TaskData:
    """One task: its label names and train/test images (RGB PIL) with integer labels into ``labels``."""

    name: str
    labels: list[str]
    train_images: list[Image.Image]
    train_labels: list[int]
    test_images: list[Image.Image]
    test_labels: list[int]
    description: str = ""
    extra: dict = field(default_factory=dict)

    def save(self, folder: str | Path) -> dict[str, Path]:
        """Write ``folder/train`` and ``folder/test`` with ``Dataset.save_to_disk``; returns both paths."""
        folder = Path(folder)
        paths = {}
        for split, images, labels in (
            ("train", self.train_images, self.train_labels),
            ("test", self.test_images, self.test_labels),
        ):
            paths[split] = folder / split
            to_dataset(images, labels, self.labels).save_to_disk(str(paths[split]))
        return paths


def to_dataset(images: Sequence[Image.Image], labels: Sequence[int], names: Sequence[str]):
    """A ``datasets.Dataset`` with an ``image`` (Image feature) and a ``label`` (ClassLabel) column."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    features = Features({"image": ImageFeature(), "label": ClassLabel(names=list(names))})
    return Dataset.from_dict({"image": list(images), "label": [int(x) for x in labels]}, features=features)
