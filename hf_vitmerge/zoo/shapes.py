"""Procedurally drawn RGB tasks (PIL.ImageDraw): each task has its own generator and label space.

Images are drawn at 4x the model's image size and downsampled with a box filter (anti-aliasing).
Every generator has its own style (background range, shape sizes, palette use), and every task
is drawn inside its own frame (:data:`LOOKS`: a colour and a solid or dashed stroke), as images
of different real datasets differ in look: which task an image belongs to is visible in it, so
a router can be right. All randomness comes from a
``numpy.random.Generator`` seeded per (suite seed, task, split).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .data import TaskData

SUPERSAMPLE = 4

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 220, 40),
    "magenta": (205, 50, 205),
    "cyan": (40, 205, 215),
}
KINDS = ["circle", "square", "triangle", "cross"]


def _color(rng: np.random.Generator, exclude: tuple[int, ...] = ()) -> tuple[int, int, int]:
    names = [n for i, n in enumerate(PALETTE) if i not in exclude]
    base = np.array(PALETTE[names[rng.integers(len(names))]])
    return tuple(int(v) for v in np.clip(base + rng.integers(-25, 26, size=3), 0, 255))


def _dark(rng: np.random.Generator, hi: int = 60) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, hi, size=3))


def _shape(
    draw: ImageDraw.ImageDraw,
    kind: str,
    cx: float,
    cy: float,
    r: float,
    fill: tuple[int, int, int] | None,
    outline: tuple[int, int, int] | None = None,
    width: int = 0,
    rotation: float = 0.0,
) -> None:
    """Draw one shape of radius ``r`` centred on ``(cx, cy)``."""
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "circle":
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    elif kind == "square":
        draw.regular_polygon((cx, cy, r * 1.2), 4, rotation=rotation, fill=fill, outline=outline, width=width)
    elif kind == "triangle":
        draw.regular_polygon((cx, cy, r * 1.2), 3, rotation=rotation, fill=fill, outline=outline, width=width)
    elif kind == "cross":
        t = r * 0.38
        color = fill if fill is not None else outline
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=color)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=color)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")


Canvas = tuple[Image.Image, ImageDraw.ImageDraw, int]


def _canvas(size: int, background: tuple[int, int, int]) -> Canvas:
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), background)
    return img, ImageDraw.Draw(img), big


def _finish(canvas: Canvas, size: int) -> Image.Image:
    return canvas[0].resize((size, size), Image.Resampling.BOX)


SILHOUETTES = ["disc", "ring", "triangle", "cross"]


def _kind(rng: np.random.Generator, size: int) -> tuple[Image.Image, int]:
    label = int(rng.integers(len(SILHOUETTES)))
    c = _canvas(size, _dark(rng))
    s = c[2]
    r = s * rng.uniform(0.26, 0.36)
    cx, cy = rng.uniform(r + 2, s - r - 2, size=2)
    colour = _color(rng)
    if SILHOUETTES[label] == "ring":
        _shape(c[1], "circle", cx, cy, r, None, outline=colour, width=int(r * 0.35))
    else:
        kind = "circle" if SILHOUETTES[label] == "disc" else SILHOUETTES[label]
        _shape(c[1], kind, cx, cy, r, colour, rotation=rng.uniform(-8, 8))
    return _finish(c, size), label


def _colour(rng: np.random.Generator, size: int) -> tuple[Image.Image, int]:
    label = int(rng.integers(len(PALETTE)))
    g = int(rng.integers(40, 110))
    c = _canvas(size, (g, g, g))
    s = c[2]
    r = s * rng.uniform(0.15, 0.3)
    cx, cy = rng.uniform(r + 2, s - r - 2, size=2)
    kind = KINDS[rng.integers(len(KINDS))]
    base = np.array(list(PALETTE.values())[label]) + rng.integers(-25, 26, size=3)
    _shape(c[1], kind, cx, cy, r, tuple(int(v) for v in np.clip(base, 0, 255)))
    return _finish(c, size), label


def _count(rng: np.random.Generator, size: int) -> tuple[Image.Image, int]:
    label = int(rng.integers(4))
    c = _canvas(size, _dark(rng, 40))
    s = c[2]
    cell = s / 3
    colour = _color(rng)
    for k in rng.choice(9, size=label + 1, replace=False):
        cy, cx = (k // 3 + 0.5) * cell, (k % 3 + 0.5) * cell
        jitter = rng.uniform(-0.12, 0.12, size=2) * cell
        _shape(c[1], "circle", cx + jitter[0], cy + jitter[1], cell * 0.3, colour)
    return _finish(c, size), label


def _size(rng: np.random.Generator, size: int) -> tuple[Image.Image, int]:
    label = int(rng.integers(3))
    c = _canvas(size, _dark(rng))
    s = c[2]
    r = s * (0.1, 0.22, 0.4)[label] * rng.uniform(0.9, 1.1)
    cx, cy = rng.uniform(r, s - r, size=2)
    _shape(c[1], ("circle", "square")[rng.integers(2)], cx, cy, r, _color(rng))
    return _finish(c, size), label


def _orientation(rng: np.random.Generator, size: int) -> tuple[Image.Image, int]:
    label = int(rng.integers(4))
    c = _canvas(size, _dark(rng, 80))
    s = c[2]
    angle = np.deg2rad((0, 90, 45, 135)[label] + rng.uniform(-10, 10))
    half = s * rng.uniform(0.3, 0.42)
    cx, cy = s / 2 + rng.uniform(-0.1, 0.1, size=2) * s
    dx, dy = half * np.cos(angle), -half * np.sin(angle)
    c[1].line((cx - dx, cy - dy, cx + dx, cy + dy), fill=_color(rng), width=int(s * 0.09))
    return _finish(c, size), label


def _fill(rng: np.random.Generator, size: int) -> tuple[Image.Image, int]:
    label = int(rng.integers(3))
    c = _canvas(size, _dark(rng))
    img, draw, s = c
    r = s * rng.uniform(0.3, 0.4)
    cx, cy = s / 2 + rng.uniform(-0.08, 0.08, size=2) * s
    colour = _color(rng)
    kind = ("circle", "square")[rng.integers(2)]
    if label == 0:
        _shape(draw, kind, cx, cy, r, colour)
    elif label == 1:
        _shape(draw, kind, cx, cy, r, None, outline=colour, width=int(s * 0.07))
    else:
        mask = Image.new("L", img.size, 0)
        _shape(ImageDraw.Draw(mask), kind, cx, cy, r, 255)
        stripes = Image.new("L", img.size, 0)
        sd = ImageDraw.Draw(stripes)
        period = SUPERSAMPLE * 4
        for y in range(0, s, period):
            sd.rectangle((0, y, s, y + period // 2 - 1), fill=255)
        img.paste(colour, (0, 0), Image.fromarray(np.minimum(np.asarray(mask), np.asarray(stripes))))
    return _finish(c, size), label


def _position(rng: np.random.Generator, size: int) -> tuple[Image.Image, int]:
    label = int(rng.integers(4))
    c = _canvas(size, _dark(rng))
    s = c[2]
    r = s * rng.uniform(0.1, 0.16)
    qy, qx = divmod(label, 2)
    cx = qx * s / 2 + rng.uniform(r + 1, s / 2 - r - 1)
    cy = qy * s / 2 + rng.uniform(r + 1, s / 2 - r - 1)
    _shape(c[1], KINDS[rng.integers(len(KINDS))], cx, cy, r, _color(rng))
    return _finish(c, size), label


BACKGROUNDS = {
    "black": (10, 10, 10),
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
    "navy": (20, 30, 110),
    "forest": (20, 100, 40),
    "maroon": (120, 25, 30),
}


def _background(rng: np.random.Generator, size: int) -> tuple[Image.Image, int]:
    label = int(rng.integers(len(BACKGROUNDS)))
    bg = np.array(list(BACKGROUNDS.values())[label]) + rng.integers(-15, 16, size=3)
    c = _canvas(size, tuple(int(v) for v in np.clip(bg, 0, 255)))
    s = c[2]
    for _ in range(int(rng.integers(1, 3))):
        r = s * rng.uniform(0.12, 0.25)
        cx, cy = rng.uniform(r, s - r, size=2)
        _shape(c[1], KINDS[rng.integers(len(KINDS))], cx, cy, r, _color(rng))
    return _finish(c, size), label


def _texture(rng: np.random.Generator, size: int) -> tuple[Image.Image, int]:
    label = int(rng.integers(4))
    a, b = _color(rng), _dark(rng, 90)
    c = _canvas(size, b)
    img, draw, s = c
    period = SUPERSAMPLE * int(rng.integers(3, 6))
    half = period // 2
    off = int(rng.integers(period))
    for i in range(-period, s + period, period):
        p = i + off
        if label == 0:
            draw.rectangle((0, p, s, p + half - 1), fill=a)
        elif label == 1:
            draw.rectangle((p, 0, p + half - 1, s), fill=a)
        else:
            for j in range(-period, s + period, period):
                q = j + off
                if label == 2:
                    draw.rectangle((p, q, p + half - 1, q + half - 1), fill=a)
                    draw.rectangle((p + half, q + half, p + period - 1, q + period - 1), fill=a)
                else:
                    draw.ellipse((p, q, p + half, q + half), fill=a)
    return _finish(c, size), label


def _match(rng: np.random.Generator, size: int) -> tuple[Image.Image, int]:
    label = int(rng.integers(2))
    c = _canvas(size, _dark(rng, 50))
    s = c[2]
    first = int(rng.integers(len(PALETTE)))
    second = first if label == 0 else int(rng.choice([i for i in range(len(PALETTE)) if i != first]))
    names = list(PALETTE)
    for k, idx in enumerate((first, second)):
        r = s * rng.uniform(0.12, 0.2)
        cx = (k + 0.5) * s / 2 + rng.uniform(-0.05, 0.05) * s
        cy = rng.uniform(r + 2, s - r - 2)
        base = np.array(PALETTE[names[idx]]) + rng.integers(-20, 21, size=3)
        _shape(c[1], KINDS[rng.integers(len(KINDS))], cx, cy, r, tuple(int(v) for v in np.clip(base, 0, 255)))
    return _finish(c, size), label


def _aspect(rng: np.random.Generator, size: int) -> tuple[Image.Image, int]:
    label = int(rng.integers(3))
    c = _canvas(size, _dark(rng))
    s = c[2]
    long, short = s * rng.uniform(0.55, 0.8), s * rng.uniform(0.18, 0.3)
    square = s * rng.uniform(0.35, 0.55)
    w, h = ((long, short), (short, long), (square, square))[label]
    x0, y0 = rng.uniform(0, s - w), rng.uniform(0, s - h)
    c[1].rectangle((x0, y0, x0 + w, y0 + h), fill=_color(rng))
    return _finish(c, size), label


def _pointing(rng: np.random.Generator, size: int) -> tuple[Image.Image, int]:
    label = int(rng.integers(4))
    c = _canvas(size, _dark(rng))
    s = c[2]
    r = s * rng.uniform(0.22, 0.35)
    cx, cy = s / 2 + rng.uniform(-0.12, 0.12, size=2) * s
    # regular_polygon's first vertex points up for rotation 0; rotation is counter-clockwise.
    rotation = (0, 180, 90, 270)[label] + rng.uniform(-12, 12)
    c[1].regular_polygon((cx, cy, r), 3, rotation=rotation, fill=_color(rng))
    return _finish(c, size), label


def _look_colour(k: int, n: int) -> tuple[int, int, int]:
    """The ``k``-th of ``n`` evenly spaced, fully saturated hues."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb(k / n, 1.0, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


@dataclass(frozen=True)
class Look:
    """A task's frame: colour, and a solid or dashed stroke (dash length in pixels; 0 = solid)."""

    colour: tuple[int, int, int]
    dash: int = 0

    def apply(self, image: Image.Image) -> Image.Image:
        """``image`` with its outer ``max(1, size // 12)`` pixels replaced by the frame."""
        size = image.size[0]
        width = max(1, size // 12)
        arr = np.asarray(image).copy()
        ring = np.zeros(arr.shape[:2], dtype=bool)
        ring[:width], ring[-width:], ring[:, :width], ring[:, -width:] = True, True, True, True
        if self.dash:
            yy, xx = np.indices(ring.shape)
            ring &= ((yy + xx) // self.dash) % 2 == 0
        arr[ring] = self.colour
        return Image.fromarray(arr)


@dataclass(frozen=True)
class ShapeTask:
    """A drawn task: its name, label names, a generator and a one-line description."""

    name: str
    labels: tuple[str, ...]
    draw: Callable[[np.random.Generator, int], tuple[Image.Image, int]]
    description: str
    look: Look | None = None


SHAPE_TASKS: tuple[ShapeTask, ...] = (
    ShapeTask(
        "shape-kind",
        tuple(KINDS),
        _kind,
        "kind of one shape (random colour, place, tilt) on a dark background",
    ),
    ShapeTask(
        "shape-color", tuple(PALETTE), _colour, "colour of one shape of random kind on a gray background"
    ),
    ShapeTask(
        "shape-count", ("1", "2", "3", "4"), _count, "number of same-coloured discs (1-4) on a 3x3 grid"
    ),
    ShapeTask("shape-size", ("small", "medium", "large"), _size, "size of one disc or square"),
    ShapeTask(
        "bar-orientation",
        ("horizontal", "vertical", "diagonal-up", "diagonal-down"),
        _orientation,
        "direction of one thick bar",
    ),
    ShapeTask("fill-style", ("solid", "outline", "striped"), _fill, "fill of one large disc or square"),
    ShapeTask(
        "position",
        ("top-left", "top-right", "bottom-left", "bottom-right"),
        _position,
        "quadrant holding one small shape",
    ),
    ShapeTask("background", tuple(BACKGROUNDS), _background, "background colour behind one or two shapes"),
    ShapeTask(
        "texture",
        ("h-stripes", "v-stripes", "checker", "dots"),
        _texture,
        "full-frame pattern, random colours and period",
    ),
    ShapeTask("color-match", ("same", "different"), _match, "whether two shapes share a colour"),
    ShapeTask("aspect", ("wide", "tall", "square"), _aspect, "aspect ratio of one rectangle"),
    ShapeTask("pointing", ("up", "down", "left", "right"), _pointing, "direction a triangle points to"),
)
#: Each task's own frame: 12 hues 30 degrees apart, solid and dashed strokes alternating, so
#: neighbouring hues also differ in stroke.
LOOKS: tuple[Look, ...] = tuple(Look(_look_colour(k, 12), dash=2 * (k % 2)) for k in range(12))
SHAPE_TASKS = tuple(
    ShapeTask(
        t.name, t.labels, t.draw, f"{t.description}; framed ({'dashed' if look.dash else 'solid'})", look
    )
    for t, look in zip(SHAPE_TASKS, LOOKS, strict=True)
)


def draw_samples(
    task: ShapeTask, n: int, image_size: int, rng: np.random.Generator
) -> tuple[list, list[int]]:
    """``n`` images of ``task`` at ``image_size`` and their label indices."""
    pairs = [task.draw(rng, image_size) for _ in range(n)]
    images = [task.look.apply(p[0]) if task.look else p[0] for p in pairs]
    return images, [p[1] for p in pairs]


def shape_tasks(image_size: int, n_train: int, n_test: int, seed: int) -> list[TaskData]:
    """All :data:`SHAPE_TASKS`, each with its own seeded train and test draws."""
    tasks = []
    for k, task in enumerate(SHAPE_TASKS):
        train = draw_samples(task, n_train, image_size, np.random.default_rng([seed, k, 0]))
        test = draw_samples(task, n_test, image_size, np.random.default_rng([seed, k, 1]))
        tasks.append(TaskData(task.name, list(task.labels), *train, *test, description=task.description))
    return tasks


def source_mixture(image_size: int, n_per_task: int, seed: int) -> TaskData:
    """Pretraining data for the shared base: images from every generator, labelled by generator.

    Knowing *which generator drew an image* needs generic colour/shape/layout features but none of
    the tasks' own labels, so the fine-tuned models still have to move away from the base.
    """
    train_images, train_labels, test_images, test_labels = [], [], [], []
    for k, task in enumerate(SHAPE_TASKS):
        images, _ = draw_samples(task, n_per_task, image_size, np.random.default_rng([seed, k, 2]))
        test, _ = draw_samples(task, max(1, n_per_task // 4), image_size, np.random.default_rng([seed, k, 3]))
        train_images += images
        train_labels += [k] * len(images)
        test_images += test
        test_labels += [k] * len(test)
    return TaskData(
        "source",
        [t.name for t in SHAPE_TASKS],
        train_images,
        train_labels,
        test_images,
        test_labels,
        description="which task generator drew the image",
    )
