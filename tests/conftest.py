"""Shared fixtures: tiny random ViTs, tiny datasets and a micro suite (no training, no network)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=16,
    patch_size=4,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def assert_complete_merged_folder(folder: Path) -> None:
    """A folder hf_vitmerge wrote for a merge: weights, config, image processor, card, merge config
    (INTERFACES.md section 5)."""
    for name in (
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "README.md",
        "merge_config.yaml",
    ):
        assert (Path(folder) / name).is_file(), name


def tiny_config(labels=("a", "b", "c"), **overrides):
    from transformers import ViTConfig

    kw = {**TINY, **overrides}
    return ViTConfig(**kw, id2label=dict(enumerate(labels)), label2id={v: i for i, v in enumerate(labels)})


def make_vit(
    folder: Path | None = None,
    labels=("a", "b", "c"),
    seed: int = 0,
    base=None,
    noise: float = 0.05,
    **overrides,
):
    """A tiny ViTForImageClassification; with ``base``, a perturbed copy of it (a 'fine-tune')."""
    from transformers import ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    model = ViTForImageClassification(tiny_config(labels, **overrides)).eval()
    if base is not None:
        from hf_vitmerge.arch import ViTAdapter

        adapter = ViTAdapter.from_model(model)
        src = ViTAdapter.from_model(base).state_dict(base)
        g = torch.Generator().manual_seed(seed + 1000)
        new = {
            k: v + noise * torch.randn(v.shape, generator=g)
            for k, v in src.items()
            if adapter.info(k).kind != "head" or v.shape == adapter.info(k).shape
        }
        adapter.load_state_dict(model, new, strict=False)
    if folder is not None:
        model.save_pretrained(folder)
        size = overrides.get("image_size", TINY["image_size"])
        ViTImageProcessor(
            size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
        ).save_pretrained(folder)
    return model


def make_dataset(folder: Path, num_labels: int, n: int = 24, seed: int = 0, size: int = 16):
    """A tiny image dataset (save_to_disk) whose label is encoded in the image colour."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        y = i % num_labels
        arr = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        arr[..., y % 3] += np.uint8(120 + 40 * (y // 3))
        images.append(Image.fromarray(arr))
        labels.append(y)
    ds = datasets.Dataset.from_dict(
        {"image": images, "label": labels},
        features=datasets.Features(
            {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=num_labels)}
        ),
    )
    ds.save_to_disk(str(folder))
    return ds


@pytest.fixture(scope="session")
def micro_suite(tmp_path_factory) -> Path:
    """A shared-init 'suite' of 3 random tiny ViTs with disjoint labels (mechanics only)."""
    root = tmp_path_factory.mktemp("micro_suite")
    base = make_vit(root / "base", labels=("x", "y"), seed=0)
    tasks = []
    for i, labels in enumerate([("0", "1"), ("2", "3", "4"), ("1", "5")]):
        name = f"task{i}"
        make_vit(root / "models" / name, labels=labels, seed=10 + i, base=base)
        for split, n in (("train", 24), ("test", 12)):
            make_dataset(root / "data" / name / split, len(labels), n=n, seed=i * 10 + (split == "test"))
        tasks.append(
            {
                "name": name,
                "model": f"models/{name}",
                "labels": list(labels),
                "train": f"data/{name}/train",
                "test": f"data/{name}/test",
                "image_column": "image",
                "label_column": "label",
            }
        )
    suite = {"name": "micro", "init": "shared", "base_model": "base", "tasks": tasks}
    (root / "suite.json").write_text(json.dumps(suite, indent=2))
    return root / "suite.json"
