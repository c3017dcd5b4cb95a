"""The task gate of gated merging: data, training with ``transformers.Trainer``, loading.

The gate (:class:`~hf_vitmerge.modeling.gated.TaskGate`, a small CNN) learns to tell from an
image which task (or domain) it comes from; the class labels are never used. Following the
paper (Ye et al., https://arxiv.org/abs/2312.16240) and its released code, the target is the
index of the source dataset. Deviations from the released code (github.com/harveyhuang18/Mixture_of_Weights):

* cross-entropy on the gate's logits; the released code applies CE to softmax outputs
  (a double softmax), which flattens the gradients;
* the gate sees the **train** split of every task (the released script used the test splits
  it then evaluates on), with a held-back part of it for the validation accuracy we report;
* a small CNN trained from scratch instead of an ImageNet MobileNetV2, no TrivialAugment
  (flips or shifts would erase domains such as "mirrored" or "shifted"), and AdamW with
  lr 1e-3 instead of Adam 1e-4 (which suits fine-tuning a pretrained network);
* images are preprocessed by the first input model's image processor, so the gate reads the
  same ``pixel_values`` as the ViT and the merged model needs no second processor.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from .errors import InputError
from .modeling.gated import TaskGate, TaskGateConfig

__all__ = ["TaskGate", "TaskGateConfig", "gate_pixels", "load_gate", "train_gate", "trainer_arguments"]

DEFAULT_TRAINER_ARGS = {
    "num_train_epochs": 5,  # paper / released code
    "per_device_train_batch_size": 32,  # released code
    "per_device_eval_batch_size": 128,
    "learning_rate": 1e-3,
    "weight_decay": 0.0,
    "lr_scheduler_type": "linear",
    "save_strategy": "no",
    "eval_strategy": "no",
    "logging_strategy": "no",
    "report_to": "none",
    "dataloader_num_workers": 0,
}


class _TaskImages(torch.utils.data.Dataset):
    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor):
        self.pixels, self.labels = pixels, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


def trainer_arguments(output_dir: str, *, seed: int, device: str, quiet: bool, overrides: dict | None):
    """``TrainingArguments`` for the gate: defaults above, ``overrides`` from the config on top.

    Unknown keys raise ``ValueError`` naming them (checked against the dataclass fields).
    """
    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"gated: unknown `trainer` argument(s) {unknown}; these are passed to "
            "transformers.TrainingArguments, whose fields include num_train_epochs, learning_rate, "
            "per_device_train_batch_size, weight_decay, warmup_steps, max_steps, optim, lr_scheduler_type"
        )
    if "output_dir" in overrides:
        raise ValueError(
            "gated: `trainer.output_dir` is managed by hf_vitmerge (the gate is saved in the model)"
        )
    kwargs = {
        **DEFAULT_TRAINER_ARGS,
        "seed": seed,
        "data_seed": seed,
        "use_cpu": not str(device).startswith("cuda"),
        "disable_tqdm": quiet,
        **overrides,
    }
    return TrainingArguments(output_dir=output_dir, **kwargs)


def gate_pixels(task_data: Sequence, processor, batch_size: int = 64) -> list[torch.Tensor]:
    """Preprocess every task's images (``TaskData``) with one image processor."""
    return [torch.cat(list(data.batches(processor, batch_size))) for data in task_data]


def _split(pixels: list[torch.Tensor], fraction: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    train_x, train_y, val_x, val_y = [], [], [], []
    for task, x in enumerate(pixels):
        if len(x) < 2:
            raise InputError(f"gated: task {task} has {len(x)} image(s); the gate needs at least 2 per task")
        order = torch.randperm(len(x), generator=gen)
        n_val = min(len(x) - 1, max(1, round(fraction * len(x)))) if fraction > 0 else 0
        val_x.append(x[order[:n_val]])
        train_x.append(x[order[n_val:]])
        val_y.append(torch.full((n_val,), task, dtype=torch.long))
        train_y.append(torch.full((len(x) - n_val,), task, dtype=torch.long))
    return torch.cat(train_x), torch.cat(train_y), torch.cat(val_x), torch.cat(val_y)


def train_gate(
    pixels: Sequence[torch.Tensor],
    task_names: Sequence[str],
    *,
    channels: Sequence[int] = (16, 32, 64),
    pool_size: int = 4,
    validation_fraction: float = 0.1,
    trainer: dict | None = None,
    seed: int = 0,
    device: str = "cpu",
    quiet: bool = False,
) -> tuple[TaskGate, dict]:
    """Train a task gate on preprocessed images, one tensor ``[N_k, C, H, W]`` per task.

    A seeded ``validation_fraction`` of each task is held back. Returns the gate (in eval mode,
    on CPU, its ``config.validation_accuracy`` set) and metrics: overall and per-task
    validation accuracy, sample counts, training loss.
    """
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback

    if len(pixels) != len(task_names):
        raise ValueError(f"train_gate: {len(pixels)} image sets for {len(task_names)} task names")
    if len(pixels) < 2:
        raise ValueError("train_gate: a gate needs at least two tasks")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"gate_validation_fraction must be in [0, 1), got {validation_fraction}")
    train_x, train_y, val_x, val_y = _split(list(pixels), validation_fraction, seed)
    torch.manual_seed(seed)
    config = TaskGateConfig(
        task_names=list(task_names),
        num_channels=int(train_x.shape[1]),
        channels=list(channels),
        pool_size=pool_size,
    )
    gate = TaskGate(config)
    with tempfile.TemporaryDirectory(prefix="hf_vitmerge_gate_") as tmp:
        args = trainer_arguments(tmp, seed=seed, device=device, quiet=quiet, overrides=trainer)
        runner = Trainer(model=gate, args=args, train_dataset=_TaskImages(train_x, train_y))
        if quiet:
            runner.remove_callback(PrinterCallback)
        result = runner.train()
        metrics: dict = {
            "gate_train_samples": len(train_y),
            "gate_validation_samples": len(val_y),
            "gate_train_loss": round(float(result.training_loss), 4),
            "gate_train_steps": int(result.global_step),
        }
        if len(val_y):
            logits = runner.predict(_TaskImages(val_x, val_y)).predictions
            pred = torch.as_tensor(logits).argmax(-1)
            correct = pred == val_y
            metrics["gate_validation_accuracy"] = round(float(correct.double().mean()), 4)
            metrics["gate_validation_accuracy_per_task"] = {
                name: round(float(correct[val_y == k].double().mean()), 4)
                for k, name in enumerate(task_names)
            }
    gate = gate.to("cpu").eval()
    gate.config.validation_accuracy = metrics.get("gate_validation_accuracy")
    return gate, metrics


def load_gate(path: str | Path, task_names: Sequence[str]) -> TaskGate:
    """Load a trained gate (a folder saved with ``gate.save_pretrained``) for these tasks."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise InputError(f"gated: `gate: {path}` is not a folder holding a saved TaskGate (config.json)")
    gate = TaskGate.from_pretrained(folder)
    if list(gate.config.task_names) != list(task_names):
        raise InputError(
            f"gated: the gate in {path} was trained for tasks {gate.config.task_names}, but this merge has "
            f"tasks {list(task_names)} (same order needed). Train a new gate by removing `gate:`."
        )
    return gate.eval()
