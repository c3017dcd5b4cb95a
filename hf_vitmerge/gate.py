"""The task router of gated and EMR merging: data, training with ``transformers.Trainer``, loading.

The router (:class:`~hf_vitmerge.modeling.gated.TaskGate`) learns to tell from an image which
task (or domain) it comes from; the class labels are never used. Its default kind,
``features``, is a small head on the merged backbone's own features (CLS and mean patch token
of the equally weighted merged ViT, computed once per calibration image by
:func:`router_features`); the ``cnn`` kind is a small CNN on the image. Following the
paper (Ye et al., https://arxiv.org/abs/2312.16240) and its released code, the target is the
index of the source dataset. Deviations from the released code (github.com/harveyhuang18/Mixture_of_Weights):

* cross-entropy on the gate's logits; the released code applies CE to softmax outputs
  (a double softmax), which flattens the gradients;
* the gate sees the **train** split of every task (the released script used the test splits
  it then evaluates on), with a held-back part of it for the validation accuracy we report;
* the ViT's own features (or a small CNN trained from scratch) instead of an ImageNet
  MobileNetV2, no TrivialAugment
  (flips or shifts would erase domains such as "mirrored" or "shifted"), and AdamW with
  lr 1e-3 instead of Adam 1e-4 (which suits fine-tuning a pretrained network);
* images are preprocessed by the first input model's image processor, so the gate reads the
  same ``pixel_values`` as the ViT and the merged model needs no second processor.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from .errors import ConfigError, InputError
from .modeling.gated import TaskGate, TaskGateConfig

__all__ = [
    "TaskGate",
    "TaskGateConfig",
    "gate_pixels",
    "load_gate",
    "router_features",
    "train_gate",
    "trainer_arguments",
]

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

# The features head is small and its inputs are precomputed, so more epochs cost little.
FEATURES_TRAINER_ARGS = {
    "num_train_epochs": 10,
    "per_device_train_batch_size": 64,
    "learning_rate": 1e-3,
    "weight_decay": 0.01,
}


class _TaskImages(torch.utils.data.Dataset):
    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, key: str = "pixel_values"):
        self.pixels, self.labels, self.key = pixels, labels, key

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {self.key: self.pixels[i], "labels": self.labels[i]}


@torch.no_grad()
def router_features(model, pixels: Sequence[torch.Tensor], batch_size: int = 64) -> list[torch.Tensor]:
    """The features router's inputs for every task's images, from a routed merged model."""
    model.eval()
    return [
        torch.cat(
            [model.router_features(x[i : i + batch_size]).float() for i in range(0, len(x), batch_size)]
        )
        for x in pixels
    ]


def trainer_arguments(
    output_dir: str,
    *,
    seed: int,
    device: str,
    quiet: bool,
    overrides: dict | None,
    defaults: dict | None = None,
):
    """``TrainingArguments`` for the gate: defaults above, ``overrides`` from the config on top.

    Unknown keys raise ``ValueError`` naming them (checked against the dataclass fields).
    """
    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(
            f"gated: unknown `trainer` argument(s) {unknown}; these are passed to "
            "transformers.TrainingArguments, whose fields include num_train_epochs, learning_rate, "
            "per_device_train_batch_size, weight_decay, warmup_steps, max_steps, optim, lr_scheduler_type"
        )
    if "output_dir" in overrides:
        raise ConfigError(
            "gated: `trainer.output_dir` is managed by hf_vitmerge (the gate is saved in the model)"
        )
    kwargs = {
        **DEFAULT_TRAINER_ARGS,
        **(defaults or {}),
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
    kind: str = "cnn",
    hidden: int = 256,
    channels: Sequence[int] = (16, 32, 64),
    pool_size: int = 4,
    validation_fraction: float = 0.1,
    trainer: dict | None = None,
    seed: int = 0,
    device: str = "cpu",
    quiet: bool = False,
) -> tuple[TaskGate, dict]:
    """Train a task router: ``kind="cnn"`` on preprocessed images (one ``[N_k, C, H, W]`` tensor
    per task), ``kind="features"`` on backbone features (one ``[N_k, D]`` tensor per task, from
    :func:`router_features`) through a head with ``hidden`` units.

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
        raise ConfigError(f"gate_validation_fraction must be in [0, 1), got {validation_fraction}")
    train_x, train_y, val_x, val_y = _split(list(pixels), validation_fraction, seed)
    torch.manual_seed(seed)
    features = kind == "features"
    config = TaskGateConfig(
        task_names=list(task_names),
        kind=kind,
        num_channels=1 if features else int(train_x.shape[1]),
        channels=list(channels),
        pool_size=pool_size,
        in_features=int(train_x.shape[1]) if features else 0,
        hidden=hidden,
    )
    gate = TaskGate(config)
    key = "features" if features else "pixel_values"
    with tempfile.TemporaryDirectory(prefix="hf_vitmerge_gate_") as tmp:
        args = trainer_arguments(
            tmp,
            seed=seed,
            device=device,
            quiet=quiet,
            overrides=trainer,
            defaults=FEATURES_TRAINER_ARGS if features else None,
        )
        runner = Trainer(model=gate, args=args, train_dataset=_TaskImages(train_x, train_y, key))
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
            logits = runner.predict(_TaskImages(val_x, val_y, key)).predictions
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
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type != TaskGateConfig.model_type:
        raise InputError(
            f"gated: `gate: {path}` holds a {model_type!r} model, not a saved router ({TaskGateConfig.model_type!r}). "
            "Save a routed model's router with `model.gate.save_pretrained(folder)` and pass that folder."
        )
    gate = TaskGate.from_pretrained(folder)
    if list(gate.config.task_names) != list(task_names):
        raise InputError(
            f"gated: the gate in {path} was trained for tasks {gate.config.task_names}, but this merge has "
            f"tasks {list(task_names)} (same order needed). Train a new gate by removing `gate:`."
        )
    return gate.eval()


def task_pixels(ctx, samples_per_task: int, method: str) -> list[torch.Tensor]:
    """Every task's training images (``data:`` of each model entry), preprocessed for the router."""
    from .data import load_entry_data

    processor = ctx.sources[0].image_processor()
    data = []
    for i, entry in enumerate(ctx.config.models):
        if entry.data is None:
            raise ConfigError(
                f"{method}: model {ctx.sources[i].ref!r} has no `data:` entry; the router needs each task's "
                "training images (or pass a trained router with `gate: folder`)"
            )
        if entry.data.split is not None and entry.data.split == entry.data.test_split:
            raise ConfigError(
                f"{method}: model {ctx.sources[i].ref!r}: `split` and `test_split` are both "
                f"{entry.data.split!r}; the router must not be trained on evaluation data"
            )
        task = load_entry_data(entry.data, labels=False)
        data.append(task.subset(samples_per_task, seed=ctx.seed))
    return gate_pixels(data, processor, ctx.config.calibration.batch_size)


_GATE_FIELDS = ("task_names", "kind", "num_channels", "channels", "pool_size", "in_features", "hidden")


def router_config(
    ctx,
    *,
    kind: str,
    gate: str | None,
    channels: Sequence[int] | None,
    hidden: int | None,
    method: str,
    passes: int = 1,
) -> dict:
    """The ``gate_config`` of a routed model: from a saved router, or for a router about to be trained.

    A features router reads the CLS and mean patch token of ``passes`` backbone passes.
    """
    from .modeling.gated import GATE_KINDS

    in_features = 2 * ctx.adapter.spec.hidden_size * passes
    if gate is not None:
        c = load_gate(gate, ctx.task_names).config
        if c.kind == "features" and c.in_features != in_features:
            raise ConfigError(
                f"{method}: the router in {gate!r} reads {c.in_features} features, but this merge's router reads "
                f"{in_features} ({passes} backbone pass(es) of width {ctx.adapter.spec.hidden_size}). Reuse a "
                "router trained with the same `router_reads`, or train a new one (drop `gate`)."
            )
        return {f: getattr(c, f) for f in _GATE_FIELDS}
    if kind not in GATE_KINDS:
        raise ConfigError(f"{method}: `gate_kind` must be one of {GATE_KINDS}, got {kind!r}")
    return {
        "task_names": list(ctx.task_names),
        "kind": kind,
        "num_channels": ctx.adapter.spec.num_channels,
        "channels": list(channels or (16, 32, 64)),
        "in_features": in_features if kind == "features" else 0,
        "hidden": int(hidden or ctx.adapter.spec.hidden_size),
    }


def fit_router(
    ctx,
    model,
    *,
    gate: str | None,
    samples_per_task: int,
    validation_fraction: float,
    trainer: dict | None,
    method: str,
) -> dict:
    """Put a router into a routed merged ``model``: load ``gate`` or train one on the tasks'
    training images (a features router reads ``model``'s own equally weighted backbone).
    Returns the facts for the card (validation accuracy, sample counts, loss)."""
    if trainer is not None and not isinstance(trainer, dict):
        raise ConfigError(
            f"{method}: `trainer` must be a mapping of TrainingArguments fields, got {trainer!r}"
        )
    cfg = model.gate.config
    if gate is not None:
        trained = load_gate(gate, ctx.task_names)
        info = {"gate": str(gate), "gate_validation_accuracy": trained.config.validation_accuracy}
    else:
        pixels = task_pixels(ctx, samples_per_task, method)
        inputs = router_features(model, pixels) if cfg.kind == "features" else pixels
        trained, info = train_gate(
            inputs,
            ctx.task_names,
            kind=cfg.kind,
            hidden=cfg.hidden,
            channels=cfg.channels,
            validation_fraction=validation_fraction,
            trainer=trainer,
            seed=ctx.seed,
            device=ctx.device,
            quiet=ctx.quiet,
        )
    model.gate.load_state_dict(trained.state_dict())
    model.gate.config.validation_accuracy = trained.config.validation_accuracy
    model.config.gate_config["validation_accuracy"] = trained.config.validation_accuracy
    info["gate_kind"] = cfg.kind
    return info


@torch.inference_mode()
def true_task_accuracy(model, suite, processor, *, batch_size: int = 64) -> dict:
    """The routing ceiling: a routed model's accuracy when the true task is given (``task=``).

    Per task, predictions within the task's own labels; ``normalized_accuracy`` divides by the
    suite's individual accuracies.
    """
    from .evaluation import individual_accuracies, label_positions, load_test_data

    labels = [str(model.config.id2label[i]) for i in range(len(model.config.id2label))]
    per_task = {}
    for ti, task in enumerate(suite.tasks):
        data = load_test_data(task)
        pos = torch.tensor(label_positions(labels, task))
        hits = []
        for pixels, y in data.batches(processor, batch_size, with_labels=True):
            logits = model(pixel_values=pixels, task=ti).logits[:, pos]
            hits.append(logits.argmax(-1) == y)
        per_task[task.name] = float(torch.cat(hits).double().mean())
    individual = individual_accuracies(suite, batch_size=batch_size)
    normalized = sum(per_task[t] / individual[t] for t in per_task) / len(per_task)
    return {"per_task_accuracy": per_task, "normalized_accuracy": normalized}


def task_identifiability(
    suite, *, samples_per_task: int = 600, epochs: int = 15, seed: int = 0, quiet: bool = True
) -> dict:
    """How visible the task is in the image: a CNN router trained on ``samples_per_task`` training
    images of every task (20 % held back) to tell the task; its held-out accuracy, overall and
    per task."""
    from transformers import AutoImageProcessor

    from .data import load_task_data

    processor = AutoImageProcessor.from_pretrained(suite.tasks[0].model)
    data = [
        load_task_data(t.train, image_column=t.image_column).subset(samples_per_task, seed=seed)
        for t in suite.tasks
    ]
    _, metrics = train_gate(
        gate_pixels(data, processor),
        suite.task_names,
        kind="cnn",
        validation_fraction=0.2,
        trainer={"num_train_epochs": epochs},
        seed=seed,
        quiet=quiet,
    )
    return {
        "identifiability": metrics["gate_validation_accuracy"],
        "per_task": metrics["gate_validation_accuracy_per_task"],
        "samples": metrics["gate_train_samples"] + metrics["gate_validation_samples"],
    }
