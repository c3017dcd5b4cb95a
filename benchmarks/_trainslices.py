"""Shared by the diagnostic scripts that rebuild task models by hand (``emr_ceiling.py``,
``wudi_solver.py``): a shared-base suite's tensors, and each task's accuracy on a slice of its
**training** split (never test), as a fraction of the task model's own accuracy there."""

from __future__ import annotations

import statistics

import torch
from transformers import AutoImageProcessor, ViTForImageClassification

from hf_vitmerge.data import load_task_data
from hf_vitmerge.suite import load_suite


class TrainSlices:
    """A shared-base suite loaded for hand-built merges, with each task's training slice."""

    def __init__(self, suite_path: str, samples: int = 256, seed: int = 1):
        self.suite = load_suite(suite_path)
        if self.suite.base_model is None:
            raise SystemExit(f"{suite_path}: needs a suite with a shared base model")
        base = ViTForImageClassification.from_pretrained(self.suite.base_model)
        self.keys = [k for k, _ in base.named_parameters() if not k.startswith("classifier")]
        self.base = {k: v.detach().float() for k, v in base.named_parameters() if k in self.keys}
        self.states = []
        self.slices = []
        for task in self.suite.tasks:
            model = ViTForImageClassification.from_pretrained(task.model)
            self.states.append({k: v.detach().float() for k, v in model.named_parameters() if k in self.keys})
            data = load_task_data(task.train, image_column=task.image_column, label_column=task.label_column)
            processor = AutoImageProcessor.from_pretrained(task.model)
            pixels, labels = zip(
                *data.subset(samples, seed=seed).batches(processor, with_labels=True), strict=True
            )
            self.slices.append((torch.cat(pixels), torch.cat(labels)))
        self.own = [self._accuracy(i, None) for i in range(len(self.suite.tasks))]

    def task_vectors(self) -> dict[str, torch.Tensor]:
        """``[K, *shape]`` task vectors per key."""
        return {k: torch.stack([s[k] - self.base[k] for s in self.states]) for k in self.keys}

    @torch.inference_mode()
    def _accuracy(self, i: int, backbone: dict | None) -> float:
        model = ViTForImageClassification.from_pretrained(self.suite.tasks[i].model).eval()
        if backbone is not None:
            model.load_state_dict(backbone, strict=False)
        pixels, labels = self.slices[i]
        return float((model(pixel_values=pixels).logits.argmax(-1) == labels).float().mean())

    def normalized(self, backbones: list[dict]) -> tuple[float, list[float]]:
        """Mean and per-task accuracy of task ``i``'s head on ``backbones[i]``, over its own model's."""
        ratios = [
            self._accuracy(i, b) / own if own > 0 else 0.0
            for i, (b, own) in enumerate(zip(backbones, self.own, strict=True))
        ]
        return statistics.fmean(ratios), ratios
