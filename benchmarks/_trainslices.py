"""Shared by the diagnostic scripts that rebuild task models by hand (``emr_ceiling.py``,
``wudi_solver.py``): a shared-base suite's backbone tensors under their canonical keys (through
the package's architecture adapter), and each task's accuracy on a slice of its **training**
split (never test), as a fraction of the task model's own accuracy there."""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from transformers import AutoImageProcessor, ViTForImageClassification

from hf_vitmerge.arch import ViTAdapter
from hf_vitmerge.data import load_task_data
from hf_vitmerge.suite import load_suite


def arguments(doc: str) -> argparse.ArgumentParser:
    """The scripts' command line: the suite, and the size and shuffle seed of the training slices."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite")
    parser.add_argument("--samples", type=int, default=256, help="training images per task")
    parser.add_argument("--seed", type=int, default=1, help="shuffle seed of the training slice")
    return parser


class TrainSlices:
    """A shared-base suite loaded for hand-built merges, with each task's training slice."""

    def __init__(self, suite_path: str, samples: int = 256, seed: int = 1):
        self.suite = load_suite(suite_path)
        if self.suite.base_model is None:
            raise SystemExit(f"{suite_path}: needs a suite with a shared base model")
        base = ViTForImageClassification.from_pretrained(self.suite.base_model)
        self.adapter = ViTAdapter.from_model(base)
        self.keys = self.adapter.backbone_keys
        self.base = self._backbone(base)
        self.models = [ViTForImageClassification.from_pretrained(t.model).eval() for t in self.suite.tasks]
        self.states = [self._backbone(m) for m in self.models]
        self.slices = []
        for task in self.suite.tasks:
            data = load_task_data(task.train, image_column=task.image_column, label_column=task.label_column)
            processor = AutoImageProcessor.from_pretrained(task.model)
            pixels, labels = zip(
                *data.subset(samples, seed=seed).batches(processor, with_labels=True), strict=True
            )
            self.slices.append((torch.cat(pixels), torch.cat(labels)))
        self.own = [self._accuracy(i, None) for i in range(len(self.models))]

    def _backbone(self, model) -> dict[str, torch.Tensor]:
        return {k: self.adapter.parameter(model, k).detach().float() for k in self.keys}

    def task_vectors(self) -> dict[str, torch.Tensor]:
        """``[K, *shape]`` task vectors per key."""
        return {k: torch.stack([s[k] - self.base[k] for s in self.states]) for k in self.keys}

    @torch.inference_mode()
    def _accuracy(self, i: int, backbone: dict | None) -> float:
        model = self.models[i]
        if backbone is not None:
            model = copy.deepcopy(model)
            self.adapter.load_state_dict(model, backbone, strict=False)
        pixels, labels = self.slices[i]
        return float((model(pixel_values=pixels).logits.argmax(-1) == labels).float().mean())

    def normalized(self, backbones: list[dict]) -> tuple[float, list[float]]:
        """Mean and per-task accuracy of task ``i``'s head on ``backbones[i]``, over its own model's."""
        ratios = [
            self._accuracy(i, b) / own if own > 0 else 0.0
            for i, (b, own) in enumerate(zip(backbones, self.own, strict=True))
        ]
        return statistics.fmean(ratios), ratios
