"""The small, deterministic training loop shared by every zoo suite.

Plain PyTorch on pre-computed pixel tensors: the images are run once through the model's own
image processor (loaded back with ``AutoImageProcessor`` from the saved folder, exactly as evaluation
code will), so training and evaluation see identical inputs.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm
from transformers import (
    AutoImageProcessor,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    get_cosine_schedule_with_warmup,
    set_seed,
)

from ..threads import intra_op_threads

#: The normalisation every zoo model uses (pixels in [-1, 1]).
IMAGE_MEAN = [0.5, 0.5, 0.5]
IMAGE_STD = [0.5, 0.5, 0.5]


@dataclass(frozen=True)
class ArchSpec:
    """The ViT shape shared by all models of one suite (labels aside)."""

    image_size: int
    patch_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int

    def config(self, labels: Sequence[str]) -> ViTConfig:
        """A ``ViTConfig`` of this shape whose ``id2label`` is ``labels`` (in order)."""
        return ViTConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=3,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            hidden_act="gelu",
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            qkv_bias=True,
            id2label={i: str(name) for i, name in enumerate(labels)},
            label2id={str(name): i for i, name in enumerate(labels)},
        )

    def processor(self) -> ViTImageProcessor:
        """The image processor matching this shape: resize is a no-op on the stored images."""
        return ViTImageProcessor(
            do_resize=True,
            size={"height": self.image_size, "width": self.image_size},
            resample=Image.Resampling.BILINEAR,
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=True,
            image_mean=IMAGE_MEAN,
            image_std=IMAGE_STD,
        )


@dataclass(frozen=True)
class TrainSpec:
    """Optimisation recipe: AdamW, linear warm-up then cosine decay to 0.

    ``steps`` is the number of optimiser steps; when ``epochs`` is given instead (Hub-style fine-tuning
    recipes are stated in epochs), the steps are ``ceil(epochs * n / batch_size)`` for ``n`` examples.
    """

    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    max_shift: int = 0  # random translation (pixels, edge-replicated) applied to each training sample
    epochs: float | None = None
    head_lr_scale: float = 1.0  # the classifier's lr is ``lr * head_lr_scale`` (a new head learns faster)

    def num_steps(self, n: int) -> int:
        """Optimiser steps for ``n`` training examples."""
        if self.epochs is None:
            return self.steps
        return max(1, math.ceil(self.epochs * n / min(self.batch_size, n)))

    def describe(self, n: int | None = None) -> str:
        """One line for READMEs: optimiser, steps/epochs, batch, lr, schedule."""
        steps = self.steps if n is None else self.num_steps(n)
        length = f"{self.epochs:g} epochs ({steps} steps)" if self.epochs is not None else f"{steps} steps"
        head = f" ({self.head_lr_scale:g}x for the new classifier)" if self.head_lr_scale != 1 else ""
        return (
            f"AdamW, {length} of batch {self.batch_size}, lr {self.lr:g}{head}, weight decay {self.weight_decay:g}, "
            f"{self.warmup_fraction:.0%} linear warm-up then cosine decay (`get_cosine_schedule_with_warmup`), "
            "gradient clipping 1.0"
            + (f", random shifts of up to {self.max_shift} px" if self.max_shift else "")
        )


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch with ``transformers.set_seed`` (the zoo also passes explicit generators)."""
    set_seed(seed)


def derive_seed(*parts: int | str) -> int:
    """A stable 31-bit seed from a tuple of ints/strings (independent of ``PYTHONHASHSEED``).

    The zoo's one seed-derivation scheme: every seed of a build (initialisations, heads, batch order,
    drops) is ``derive_seed(suite seed, what, ...)``.
    """
    h = 1469598103934665603
    for part in parts:
        for byte in str(part).encode() + b"\x00":
            h = ((h ^ byte) * 1099511628211) % 2**64
    return h % 2**31


@contextlib.contextmanager
def deterministic_torch(num_threads: int = 1) -> Iterator[None]:
    """Deterministic algorithms and at most ``num_threads`` CPU threads; restores the settings after.

    One thread by default: on a shared 2-core machine, two intra-op threads are often ten times slower.
    """
    old_det = torch.are_deterministic_algorithms_enabled()
    with intra_op_threads(max(1, min(num_threads, torch.get_num_threads()))):
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(old_det)


def new_model(arch: ArchSpec, labels: Sequence[str], seed: int) -> ViTForImageClassification:
    """A freshly initialised ``ViTForImageClassification`` (initialisation seeded by ``seed``)."""
    torch.manual_seed(seed)
    return ViTForImageClassification(arch.config(labels)).eval()


def reset_head(model: ViTForImageClassification, labels: Sequence[str], seed: int) -> None:
    """Give ``model`` a new, freshly initialised classifier sized to ``labels`` (seeded)."""
    cfg = model.config
    cfg.id2label = {i: str(name) for i, name in enumerate(labels)}
    cfg.label2id = {str(name): i for i, name in enumerate(labels)}
    cfg.num_labels = len(labels)
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(cfg.hidden_size, len(labels))
    with torch.no_grad():
        head.weight.normal_(0.0, cfg.initializer_range, generator=gen)
        head.bias.zero_()
    model.classifier = head
    model.num_labels = len(labels)


def processor_pixels(
    processor: ViTImageProcessor, images: Sequence[Image.Image], batch_size: int = 256
) -> torch.Tensor:
    """Run ``images`` through the image processor *as evaluation will load it* and stack the pixels."""
    with tempfile.TemporaryDirectory() as tmp:
        processor.save_pretrained(tmp)
        loaded = AutoImageProcessor.from_pretrained(tmp)
    chunks = [
        loaded(list(images[i : i + batch_size]), return_tensors="pt")["pixel_values"]
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks).float()


def _random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels in each direction (edges replicated)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])


def train_classifier(
    model: ViTForImageClassification,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    spec: TrainSpec,
    seed: int,
    *,
    desc: str = "train",
    quiet: bool = False,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> ViTForImageClassification:
    """Train ``model`` in place on ``(pixels, labels)`` for ``spec.num_steps(n)`` steps; returns it in eval mode.

    Batches are drawn epoch by epoch from a seeded permutation, so the run is fully determined by
    ``seed`` (with :func:`deterministic_torch` active).
    """
    gen = torch.Generator().manual_seed(seed)
    set_seed(seed)
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        decays = p.ndim >= 2 and "embeddings" not in name
        groups.setdefault((name.startswith("classifier."), decays), []).append(p)
    opt = torch.optim.AdamW(
        [
            {
                "params": params,
                "weight_decay": spec.weight_decay if decays else 0.0,
                "lr": spec.lr * (spec.head_lr_scale if head else 1.0),
            }
            for (head, decays), params in groups.items()
        ],
        lr=spec.lr,
        betas=(0.9, 0.999),
    )
    n = len(labels)
    steps = spec.num_steps(n)
    sched = get_cosine_schedule_with_warmup(opt, max(1, int(spec.warmup_fraction * steps)), steps)
    batch = min(spec.batch_size, n)
    order = torch.randperm(n, generator=gen)
    cursor = 0
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=quiet, leave=False)
    for _ in bar:
        if cursor + batch > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor : cursor + batch]
        cursor += batch
        x = pixels[idx]
        if spec.max_shift:
            x = _random_shift(x, spec.max_shift, gen)
        loss = loss_fn(model(pixel_values=x).logits, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()


@torch.no_grad()
def predict(model: ViTForImageClassification, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Arg-max predictions of ``model`` on ``pixels``."""
    model.eval()
    return torch.cat(
        [
            model(pixel_values=pixels[i : i + batch_size]).logits.argmax(-1)
            for i in range(0, len(pixels), batch_size)
        ]
    )


def accuracy(model: ViTForImageClassification, pixels: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(pixels, labels)``."""
    return float((predict(model, pixels) == labels).float().mean())
