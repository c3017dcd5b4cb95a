"""Merge-then-heal: a short distillation of the input models' ensemble into the merged model.

Training-free merging of differently initialised transformers stays well below the inputs
(ZipIt! issue #31; FS-Merge, https://arxiv.org/abs/2410.01483), and a short fine-tune after an
alignment-based fusion recovers them (Imfeld et al., "Transformer Fusion with Optimal
Transport", ICLR 2024, https://arxiv.org/abs/2310.05719). ``heal:`` (INTERFACES.md section 3)
does that step without labels:

* images: ``samples_per_task`` images of every task's calibration split (a seeded subset; the
  test split is never read);
* teacher: the ensemble of the input models, run once on those images: per task, the task
  model's log-softmax over its own labels (for models that share one label space: the log of
  the mean of their softmaxes);
* student: the merged model's per-task log-softmaxes (its ``task_logits`` when it has them, else
  its union logits split into the tasks' label blocks, else its shared logits);
* loss: the mean over tasks of ``KL(teacher || student)``, every image distilled on every task's
  head, so the joint rule (argmax over the concatenated per-task log-softmaxes) is learnt too;
* optimiser: ``transformers.Trainer`` (AdamW, ``lr``, linear decay after a 10 % warm-up) for
  ``steps`` steps of ``batch_size`` images; all weights train, the class stays the same.

The merge then involved training: the card says so and how much (steps, images, seconds).
"""

from __future__ import annotations

import tempfile
import time

import torch
from torch import nn
from torch.nn import functional as F

from .errors import ConfigError


class _Distillation(torch.utils.data.Dataset):
    def __init__(self, pixels: torch.Tensor, teacher: torch.Tensor):
        self.pixels, self.teacher = pixels, teacher

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.pixels[i], "teacher": self.teacher[i]}


def heal_images(ctx, samples_per_task: int, processor) -> torch.Tensor:
    """``samples_per_task`` images of every task's calibration split, preprocessed (task order)."""
    from .data import load_entry_data

    out = []
    for i, entry in enumerate(ctx.config.models):
        if entry.data is None:
            raise ConfigError(
                f"heal needs images: model {ctx.sources[i].ref!r} has no `data:` entry in the config"
            )
        data = load_entry_data(entry.data).subset(samples_per_task, seed=ctx.seed)
        out += list(data.batches(processor, 64))
    return torch.cat(out)


def student_blocks(outputs, sizes: list[int]) -> list[torch.Tensor]:
    """The merged model's per-task logits: ``task_logits`` when it has them, else its logits
    split into the tasks' label blocks (one block when the tasks share labels)."""
    blocks = getattr(outputs, "task_logits", None)
    if blocks is not None:
        return list(blocks)
    logits = outputs.logits
    if logits.shape[-1] != sum(sizes):
        raise ValueError(f"heal: the merged model has {logits.shape[-1]} logits, expected {sum(sizes)}")
    return list(logits.split(sizes, dim=-1))


@torch.no_grad()
def teacher_log_probs(ctx, pixels: torch.Tensor, shared: bool, batch_size: int = 128) -> torch.Tensor:
    """Per-task log-softmaxes of the input models on ``pixels``, concatenated in task order
    (shared labels: the log of the ensemble's mean probabilities, one block)."""
    device = ctx.device
    per_model = []
    for model in ctx.models():
        model.to(device).eval()
        outs = [
            torch.log_softmax(model(pixel_values=px.to(device)).logits.float(), -1).cpu()
            for px in pixels.split(batch_size)
        ]
        per_model.append(torch.cat(outs))
        model.to("cpu")
    if shared:
        return torch.logsumexp(torch.stack(per_model), 0) - torch.log(torch.tensor(float(len(per_model))))
    return torch.cat(per_model, -1)


def distillation_loss(outputs, teacher: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Mean over tasks of ``KL(teacher || student)`` on each task's log-softmax (batch mean)."""
    student = student_blocks(outputs, sizes)
    targets = teacher.split(sizes, dim=-1)
    losses = [
        F.kl_div(torch.log_softmax(s.float(), -1), t, log_target=True, reduction="batchmean")
        for s, t in zip(student, targets, strict=True)
    ]
    return torch.stack(losses).mean()


@torch.no_grad()
def evaluate_distillation(model: nn.Module, dataset: _Distillation, sizes: list[int], device: str) -> float:
    """The distillation loss of ``model`` over a whole dataset (eval mode)."""
    model.to(device).eval()
    total, count = 0.0, 0
    for start in range(0, len(dataset), 128):
        px = dataset.pixels[start : start + 128].to(device)
        t = dataset.teacher[start : start + 128].to(device)
        total += float(distillation_loss(model(pixel_values=px), t, sizes)) * len(px)
        count += len(px)
    return total / count


def _trainer_class():
    from transformers import Trainer

    class DistillationTrainer(Trainer):
        def __init__(self, *args, sizes: list[int], **kwargs):
            super().__init__(*args, **kwargs)
            self.sizes = sizes

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(pixel_values=inputs["pixel_values"])
            loss = distillation_loss(outputs, inputs["teacher"], self.sizes)
            return (loss, outputs) if return_outputs else loss

    return DistillationTrainer


def heal_model(ctx, model: nn.Module, heal) -> dict:
    """Distil the inputs' ensemble into ``model`` in place; returns facts for the card and bench."""
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    start = time.perf_counter()
    shared = ctx.heads_mode == "shared"
    sizes = [len(ctx.label_lists[0])] if shared else [len(x) for x in ctx.label_lists]
    pixels = heal_images(ctx, heal.samples_per_task, ctx.sources[0].image_processor())
    dataset = _Distillation(pixels, teacher_log_probs(ctx, pixels, shared))
    device = ctx.device
    before = evaluate_distillation(model, dataset, sizes, device)
    torch.manual_seed(ctx.seed)
    with tempfile.TemporaryDirectory(prefix="hf_vitmerge_heal_") as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            max_steps=heal.steps,
            learning_rate=heal.lr,
            per_device_train_batch_size=heal.batch_size,
            weight_decay=0.0,
            lr_scheduler_type="linear",
            warmup_steps=max(1, heal.steps // 10),
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            report_to="none",
            dataloader_num_workers=0,
            remove_unused_columns=False,
            seed=ctx.seed,
            data_seed=ctx.seed,
            use_cpu=not str(device).startswith("cuda"),
            disable_tqdm=ctx.quiet,
        )
        trainer = _trainer_class()(model=model, args=args, train_dataset=dataset, sizes=sizes)
        if ctx.quiet:
            trainer.remove_callback(PrinterCallback)
        result = trainer.train()
    after = evaluate_distillation(model, dataset, sizes, device)
    model.to("cpu").eval()
    seconds = round(time.perf_counter() - start, 3)
    return {
        "heal_steps": int(result.global_step),
        "heal_images": len(dataset),
        "heal_batch_size": heal.batch_size,
        "heal_lr": heal.lr,
        "heal_loss_before": round(before, 5),
        "heal_loss_after": round(after, 5),
        "heal_seconds": seconds,
        "training_note": (
            f"The merge involved training: after merging, the ensemble of the input models was distilled "
            f"into the merged model (no labels; per-task log-softmaxes) for {int(result.global_step)} "
            f"steps of {heal.batch_size} images ({len(dataset)} calibration images, learning rate "
            f"{heal.lr:g}, {seconds:.1f} s); distillation loss {before:.4f} -> {after:.4f}."
        ),
    }
