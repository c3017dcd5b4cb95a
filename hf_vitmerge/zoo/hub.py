"""The ``hub-tasks`` suite: Hub-style fine-tunes of one broadly pretrained ViT, one image kind per task.

The regime users merge in (FusionBench's CLIP ViT 8-task setting): each task has its own kind of
image (handwritten digits, road signs, textures, satellite-like tiles, letters, gauges, bar charts,
flags), so a task can be told from its images, and its own label space. The base is pretrained to
convergence on an *upstream mixture* of more image kinds than there are tasks, labelled with
upstream labels that are not the tasks' labels (coarse groups of each kind's classes, and the own
classes of upstream-only kinds), the way ImageNet relates to Hub fine-tunes. Each task model is then
fine-tuned Hub-style: whole network plus a new head, a learning rate far below pretraining's, a few
epochs, warm-up.

Every generator draws at 4x the model's image size and box-downsamples (anti-aliasing); all
randomness comes from a ``numpy.random.Generator`` seeded per (suite seed, kind, split).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import shapes
from .data import TaskData
from .digits import digit_arrays, split_indices

SS = shapes.SUPERSAMPLE
Draw = Callable[[np.random.Generator, int, str], tuple[Image.Image, int]]


def _jitter(rgb, rng: np.random.Generator, amount: int = 20) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.clip(np.array(rgb) + rng.integers(-amount, amount + 1, size=3), 0, 255))


def _canvas(size: int, bg) -> tuple[Image.Image, ImageDraw.ImageDraw, int]:
    big = size * SS
    img = Image.new("RGB", (big, big), tuple(int(v) for v in bg))
    return img, ImageDraw.Draw(img), big


def _done(img: Image.Image, size: int) -> Image.Image:
    return img.resize((size, size), Image.Resampling.BOX)


# ----------------------------------------------------------------------------- task image kinds
DIGIT_LABELS = [str(d) for d in range(10)]


@lru_cache(maxsize=4)
def _digit_pools(size: int, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    images, targets = digit_arrays(size)
    train, test = split_indices(targets, seed)
    return {"train": (images[train], targets[train]), "test": (images[test], targets[test])}


def _digits(rng: np.random.Generator, size: int, split: str) -> tuple[Image.Image, int]:
    """A handwritten digit (scikit-learn's digits), pale ink on a dark slate background."""
    pool, targets = _digit_pools(size, 0)[split]  # one fixed stratified split; draws vary with the seed
    i = int(rng.integers(len(pool)))
    a = pool[i].astype(np.float64)[..., None] / 255.0
    ink = np.array(_jitter((235, 235, 215), rng, 20))
    bg = np.array(_jitter((45, 50, 60), rng, 15))
    return Image.fromarray((a * ink + (1 - a) * bg).round().astype(np.uint8), mode="RGB"), int(targets[i])


SIGN_LABELS = ["stop", "yield", "no-entry", "warning", "speed-limit", "mandatory", "parking", "priority"]


def _signs(rng: np.random.Generator, size: int, split: str) -> tuple[Image.Image, int]:
    """A road sign on a pale sky-and-road background."""
    label = int(rng.integers(len(SIGN_LABELS)))
    img, d, s = _canvas(size, _jitter((150, 185, 215), rng, 25))
    d.rectangle((0, int(s * rng.uniform(0.7, 0.85)), s, s), fill=_jitter((95, 95, 100), rng, 15))
    r = s * rng.uniform(0.3, 0.38)
    cx, cy = s / 2 + rng.uniform(-0.08, 0.08, size=2) * s
    red, white, blue, yellow = (205, 30, 35), (245, 245, 245), (30, 70, 190), (245, 200, 30)
    name = SIGN_LABELS[label]
    if name == "stop":
        d.regular_polygon((cx, cy, r), 8, rotation=22.5, fill=_jitter(red, rng), outline=white, width=SS)
        d.rectangle((cx - r * 0.6, cy - r * 0.12, cx + r * 0.6, cy + r * 0.12), fill=white)
    elif name == "yield":
        d.regular_polygon((cx, cy, r), 3, rotation=180, fill=_jitter(red, rng))
        d.regular_polygon((cx, cy, r * 0.55), 3, rotation=180, fill=white)
    elif name == "no-entry":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_jitter(red, rng))
        d.rectangle((cx - r * 0.7, cy - r * 0.18, cx + r * 0.7, cy + r * 0.18), fill=white)
    elif name == "warning":
        d.regular_polygon((cx, cy, r), 3, fill=_jitter(red, rng))
        d.regular_polygon((cx, cy + r * 0.08, r * 0.6), 3, fill=white)
        d.rectangle((cx - r * 0.06, cy - r * 0.2, cx + r * 0.06, cy + r * 0.25), fill=(20, 20, 20))
    elif name == "speed-limit":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_jitter(red, rng))
        d.ellipse((cx - r * 0.72, cy - r * 0.72, cx + r * 0.72, cy + r * 0.72), fill=white)
        d.rectangle(
            (cx - r * 0.35, cy - r * 0.3, cx + r * 0.35, cy + r * 0.3), outline=(20, 20, 20), width=SS
        )
    elif name == "mandatory":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_jitter(blue, rng))
        d.regular_polygon((cx, cy, r * 0.5), 3, rotation=float(rng.choice([0, 90, 270])), fill=white)
    elif name == "parking":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=_jitter(blue, rng))
        d.rectangle((cx - r * 0.35, cy - r * 0.6, cx - r * 0.1, cy + r * 0.6), fill=white)
        d.ellipse((cx - r * 0.35, cy - r * 0.6, cx + r * 0.4, cy + r * 0.05), outline=white, width=2 * SS)
    else:  # priority
        d.regular_polygon((cx, cy, r), 4, fill=white)
        d.regular_polygon((cx, cy, r * 0.7), 4, fill=_jitter(yellow, rng))
    return _done(img, size), label


TEXTURE_LABELS = ["h-stripes", "v-stripes", "diagonal-up", "diagonal-down", "checker", "grid"]


def _textures(rng: np.random.Generator, size: int, split: str) -> tuple[Image.Image, int]:
    """A full-frame two-colour pattern with random colours and period."""
    label = int(rng.integers(len(TEXTURE_LABELS)))
    a = tuple(int(v) for v in rng.integers(0, 256, size=3))
    b = tuple(int(v) for v in rng.integers(0, 256, size=3))
    while sum(abs(x - y) for x, y in zip(a, b, strict=True)) < 200:
        b = tuple(int(v) for v in rng.integers(0, 256, size=3))
    img, d, s = _canvas(size, b)
    p = SS * int(rng.integers(5, 9))
    h = p // 2
    off = int(rng.integers(p))
    name = TEXTURE_LABELS[label]
    rng_sp = range(-2 * p, s + 2 * p, p)
    if name == "h-stripes":
        for i in rng_sp:
            d.rectangle((0, i + off, s, i + off + h - 1), fill=a)
    elif name == "v-stripes":
        for i in rng_sp:
            d.rectangle((i + off, 0, i + off + h - 1, s), fill=a)
    elif name == "diagonal-up":
        for i in range(-2 * s, 2 * s, p):
            d.line((i + off, s, i + off + s, 0), fill=a, width=h)
    elif name == "diagonal-down":
        for i in range(-2 * s, 2 * s, p):
            d.line((i + off, 0, i + off + s, s), fill=a, width=h)
    elif name == "grid":  # lines two pixels wide: one-pixel lines blur into a checker at 24 px
        for i in rng_sp:
            d.rectangle((0, i + off, s, i + off + 2 * SS - 1), fill=a)
            d.rectangle((i + off, 0, i + off + 2 * SS - 1, s), fill=a)
    else:  # checker
        for i in rng_sp:
            for j in rng_sp:
                if ((i - rng_sp.start) // p + (j - rng_sp.start) // p) % 2 == 0:
                    d.rectangle((i + off, j + off, i + off + p - 1, j + off + p - 1), fill=a)
    return _done(img, size), label


TILE_LABELS = ["forest", "water", "farmland", "residential", "highway", "desert"]


def _tiles(rng: np.random.Generator, size: int, split: str) -> tuple[Image.Image, int]:
    """A top-down, satellite-like land-use tile."""
    label = int(rng.integers(len(TILE_LABELS)))
    name = TILE_LABELS[label]
    base = {
        "forest": (35, 85, 40),
        "water": (35, 75, 140),
        "farmland": (120, 150, 70),
        "residential": (130, 130, 125),
        "highway": (95, 120, 70),
        "desert": (205, 180, 120),
    }[name]
    img, d, s = _canvas(size, _jitter(base, rng, 15))
    if name == "forest":
        for x, y in rng.uniform(0, s, size=(int(rng.integers(25, 45)), 2)):
            r = s * rng.uniform(0.04, 0.09)
            d.ellipse((x - r, y - r, x + r, y + r), fill=_jitter((25, 110, 35), rng, 20))
    elif name == "water":
        for _ in range(int(rng.integers(4, 8))):
            y = rng.uniform(0, s)
            d.arc(
                (rng.uniform(-s, 0), y, rng.uniform(s, 2 * s), y + s * 0.1),
                0,
                180,
                fill=(90, 130, 190),
                width=SS,
            )
    elif name == "farmland":
        cuts = np.sort(rng.uniform(0, s, size=3))
        edges = [0, *cuts, s]
        vertical = rng.random() < 0.5
        for k in range(4):
            colour = _jitter(((150, 170, 60), (190, 170, 80), (90, 140, 60), (160, 120, 70))[k], rng, 15)
            box = (edges[k], 0, edges[k + 1], s) if vertical else (0, edges[k], s, edges[k + 1])
            d.rectangle(box, fill=colour)
    elif name == "residential":
        cell = s / 4
        for i in range(4):
            for j in range(4):
                if rng.random() < 0.8:
                    x, y = i * cell + cell * 0.2, j * cell + cell * 0.2
                    d.rectangle(
                        (x, y, x + cell * 0.55, y + cell * 0.55), fill=_jitter((170, 80, 60), rng, 30)
                    )
    elif name == "highway":
        w = s * rng.uniform(0.1, 0.16)
        if rng.random() < 0.5:
            y = rng.uniform(w, s - w)
            d.line((0, y + rng.uniform(-s * 0.2, s * 0.2), s, y), fill=(70, 70, 75), width=int(w))
        else:
            x = rng.uniform(w, s - w)
            d.line((x + rng.uniform(-s * 0.2, s * 0.2), 0, x, s), fill=(70, 70, 75), width=int(w))
    else:  # desert
        for _ in range(int(rng.integers(3, 6))):
            y = rng.uniform(0, s)
            d.arc(
                (rng.uniform(-s / 2, s / 2), y, rng.uniform(s / 2, 1.5 * s), y + s * 0.25),
                180,
                360,
                fill=(225, 205, 150),
                width=2 * SS,
            )
    return _done(img, size), label


LETTER_LABELS = list("ACEHLOTX")


@lru_cache(maxsize=8)
def _font(px: int):
    return ImageFont.load_default(size=px)


def _letters(rng: np.random.Generator, size: int, split: str) -> tuple[Image.Image, int]:
    """A printed capital letter, dark ink on cream paper."""
    label = int(rng.integers(len(LETTER_LABELS)))
    img, d, s = _canvas(size, _jitter((240, 230, 200), rng, 12))
    px = int(s * rng.uniform(0.75, 0.9))
    cx, cy = s / 2 + rng.uniform(-0.05, 0.05, size=2) * s
    d.text((cx, cy), LETTER_LABELS[label], fill=_jitter((30, 30, 60), rng, 25), font=_font(px), anchor="mm")
    return _done(img, size), label


GAUGE_LABELS = ["N", "NE", "E", "SE", "S", "SW", "W", "NW"]


def _gauges(rng: np.random.Generator, size: int, split: str) -> tuple[Image.Image, int]:
    """A round dial whose needle points in one of 8 directions."""
    label = int(rng.integers(len(GAUGE_LABELS)))
    img, d, s = _canvas(size, _jitter((40, 40, 45), rng, 10))
    r = s * rng.uniform(0.4, 0.47)
    cx = cy = s / 2
    d.ellipse(
        (cx - r, cy - r, cx + r, cy + r),
        fill=_jitter((235, 235, 225), rng, 10),
        outline=(10, 10, 10),
        width=SS,
    )
    angle = np.deg2rad(90 - 45 * label + rng.uniform(-8, 8))
    d.line(
        (cx, cy, cx + 0.85 * r * np.cos(angle), cy - 0.85 * r * np.sin(angle)),
        fill=_jitter((200, 30, 30), rng),
        width=2 * SS,
    )
    d.ellipse((cx - SS * 1.5, cy - SS * 1.5, cx + SS * 1.5, cy + SS * 1.5), fill=(10, 10, 10))
    return _done(img, size), label


CHART_LABELS = ["first", "second", "third", "fourth"]


def _charts(rng: np.random.Generator, size: int, split: str) -> tuple[Image.Image, int]:
    """A white bar chart of four bars; the label is which bar is tallest."""
    label = int(rng.integers(len(CHART_LABELS)))
    img, d, s = _canvas(size, (250, 250, 250))
    heights = rng.uniform(0.15, 0.6, size=4)
    heights[label] = rng.uniform(0.72, 0.85)
    colour = _jitter((60, 110, 200), rng, 40)
    w = s / 4
    d.line((0, s - SS, s, s - SS), fill=(0, 0, 0), width=SS)
    for k, h in enumerate(heights):
        d.rectangle((k * w + w * 0.18, s - SS - h * s, k * w + w * 0.82, s - SS), fill=colour)
    return _done(img, size), label


FLAG_COLOURS = {"red": (200, 30, 40), "white": (245, 245, 245), "blue": (30, 60, 160)}
FLAG_LABELS = [f"{o}-{c}" for o in ("horizontal", "vertical") for c in FLAG_COLOURS]


def _flags(rng: np.random.Generator, size: int, split: str) -> tuple[Image.Image, int]:
    """A tricolour flag on a pole; label: stripe orientation and the middle stripe's colour."""
    label = int(rng.integers(len(FLAG_LABELS)))
    vertical, middle = divmod(label, len(FLAG_COLOURS))
    img, d, s = _canvas(size, _jitter((180, 215, 240), rng, 15))
    others = [c for c in ((20, 20, 20), (240, 200, 30), (30, 140, 60), (230, 120, 30))]
    outer = [others[i] for i in rng.choice(len(others), size=2, replace=False)]
    colours = [outer[0], list(FLAG_COLOURS.values())[middle], outer[1]]
    x0, y0 = s * rng.uniform(0.12, 0.2), s * rng.uniform(0.12, 0.25)
    w, h = s * rng.uniform(0.68, 0.8), s * rng.uniform(0.45, 0.6)
    d.rectangle((x0 - SS * 2, y0, x0 - SS, s), fill=(90, 70, 50))
    for k, colour in enumerate(colours):
        box = (
            (x0 + k * w / 3, y0, x0 + (k + 1) * w / 3, y0 + h)
            if vertical
            else (x0, y0 + k * h / 3, x0 + w, y0 + (k + 1) * h / 3)
        )
        d.rectangle(box, fill=_jitter(colour, rng, 15))
    return _done(img, size), label


# ----------------------------------------------------------------------------- upstream-only kinds
SCENE_LABELS = ["day", "night", "sunset"]


def _scenes(rng: np.random.Generator, size: int, split: str) -> tuple[Image.Image, int]:
    """A landscape: sky, ground and a sun or moon (upstream only)."""
    label = int(rng.integers(len(SCENE_LABELS)))
    sky = ((120, 180, 240), (15, 20, 50), (240, 140, 70))[label]
    img, d, s = _canvas(size, _jitter(sky, rng, 20))
    horizon = s * rng.uniform(0.55, 0.75)
    d.rectangle((0, horizon, s, s), fill=_jitter(((60, 140, 50), (20, 40, 20), (90, 70, 40))[label], rng, 20))
    r = s * rng.uniform(0.07, 0.12)
    x, y = rng.uniform(r, s - r), rng.uniform(r, horizon - r)
    d.ellipse((x - r, y - r, x + r, y + r), fill=((250, 240, 150), (230, 230, 230), (250, 90, 40))[label])
    return _done(img, size), label


MOSAIC_LABELS = ["warm", "cool", "gray"]


def _mosaic(rng: np.random.Generator, size: int, split: str) -> tuple[Image.Image, int]:
    """A mosaic of random rectangles in warm, cool or gray tones (upstream only)."""
    label = int(rng.integers(len(MOSAIC_LABELS)))
    img, d, s = _canvas(size, (128, 128, 128))
    for _ in range(int(rng.integers(6, 12))):
        x0, y0 = rng.uniform(0, s, size=2)
        x1, y1 = x0 + rng.uniform(0.1, 0.5) * s, y0 + rng.uniform(0.1, 0.5) * s
        if label == 0:
            c = (int(rng.integers(160, 256)), int(rng.integers(40, 160)), int(rng.integers(0, 80)))
        elif label == 1:
            c = (int(rng.integers(0, 80)), int(rng.integers(80, 200)), int(rng.integers(150, 256)))
        else:
            g = int(rng.integers(20, 236))
            c = (g, g, g)
        d.rectangle((x0, y0, x1, y1), fill=c)
    return _done(img, size), label


def _from_shapes(task: shapes.ShapeTask) -> Draw:
    def draw(rng: np.random.Generator, size: int, split: str) -> tuple[Image.Image, int]:
        return task.draw(rng, size)

    return draw


@dataclass(frozen=True)
class ImageKind:
    """A kind of image: its generator, its own labels, and whether it is one of the suite's tasks."""

    name: str
    labels: tuple[str, ...]
    draw: Draw
    description: str
    task: bool = True


_SHAPE = {t.name: t for t in shapes.SHAPE_TASKS}


def _shapes_kind(name: str, shape_task: str, description: str) -> ImageKind:
    """A kind that is no task of its own, drawn like the shapes suite's task ``shape_task``."""
    task = _SHAPE[shape_task]
    return ImageKind(name, task.labels, _from_shapes(task), description, task=False)


KINDS: tuple[ImageKind, ...] = (
    ImageKind(
        "digits", tuple(DIGIT_LABELS), _digits, "handwritten digit (scikit-learn digits), pale ink on slate"
    ),
    ImageKind("road-signs", tuple(SIGN_LABELS), _signs, "road sign over a sky-and-road background"),
    ImageKind("textures", tuple(TEXTURE_LABELS), _textures, "full-frame two-colour pattern"),
    ImageKind("land-use", tuple(TILE_LABELS), _tiles, "satellite-like top-down land-use tile"),
    ImageKind("letters", tuple(LETTER_LABELS), _letters, "printed capital letter on cream paper"),
    ImageKind("gauges", tuple(GAUGE_LABELS), _gauges, "dial needle direction (8 compass points)"),
    ImageKind("bar-charts", tuple(CHART_LABELS), _charts, "which of four bars is tallest"),
    ImageKind("flags", tuple(FLAG_LABELS), _flags, "tricolour flag: stripe direction and middle colour"),
    ImageKind("scenes", tuple(SCENE_LABELS), _scenes, "landscape at day, night or sunset", task=False),
    ImageKind("mosaics", tuple(MOSAIC_LABELS), _mosaic, "mosaic in warm, cool or gray tones", task=False),
    _shapes_kind("silhouettes", "shape-kind", "one shape on a dark background"),
    _shapes_kind("disc-counts", "shape-count", "1-4 discs on a grid"),
)
TASK_KINDS = tuple(k for k in KINDS if k.task)


def draw(kind: ImageKind, n: int, size: int, rng: np.random.Generator, split: str) -> tuple[list, list[int]]:
    """``n`` images of ``kind`` and their label indices."""
    pairs = [kind.draw(rng, size, split) for _ in range(n)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def hub_tasks(image_size: int, n_train: int, n_test: int, seed: int) -> list[TaskData]:
    """The suite's tasks (every kind with ``task=True``), each with its own seeded train/test draws."""
    tasks = []
    for k, kind in enumerate(KINDS):
        if not kind.task:
            continue
        train = draw(kind, n_train, image_size, np.random.default_rng([seed, k, 0]), "train")
        test = draw(kind, n_test, image_size, np.random.default_rng([seed, k, 1]), "test")
        tasks.append(TaskData(kind.name, list(kind.labels), *train, *test, description=kind.description))
    return tasks


def upstream_label(kind: ImageKind, label: int, group: int, shift: int = 0) -> str:
    """The upstream label of an image: the kind's own label for upstream-only kinds, else a coarse group.

    A task kind's classes (cyclically shifted by ``shift``) are merged into consecutive groups of
    ``group``: with ``group=2`` and ``shift=0`` digits 0 and 1 share one upstream label, with
    ``shift=1`` digits 1 and 2 do.
    """
    if not kind.task:
        return f"{kind.name}/{kind.labels[label]}"
    n = len(kind.labels)
    start = ((label - shift) % n) // group * group + shift
    members = [kind.labels[(start + i) % n] for i in range(group) if (start - shift + i) < n]
    return f"{kind.name}/{'|'.join(members)}"


def upstream_mixture(
    image_size: int, n_per_kind: int, seed: int, group: int = 2, groupings: int = 2
) -> TaskData:
    """Pretraining data of the base: every kind (tasks' and upstream-only), fresh draws, upstream labels.

    A task kind's classes are merged into groups of ``group`` (coarse labels: none is a task's
    label). With ``groupings=2`` each image of a task kind gets, at random, one of two overlapping
    groupings (shifted by one class), like the overlapping categories of a large upstream label set;
    their intersection pins down every class, so the base learns each kind's distinctions without
    ever seeing a task label. The best possible accuracy on these labels is therefore below 1.
    """
    for kind in TASK_KINDS:
        if len(kind.labels) % group:
            raise ValueError(f"{kind.name}: {len(kind.labels)} classes do not split into groups of {group}")
    names: list[str] = []
    for kind in KINDS:
        for shift in range(groupings if kind.task else 1):
            for i in range(len(kind.labels)):
                name = upstream_label(kind, i, group, shift)
                if name not in names:
                    names.append(name)
    index = {n: i for i, n in enumerate(names)}
    out: dict[str, list] = {"train_images": [], "train_labels": [], "test_images": [], "test_labels": []}
    for k, kind in enumerate(KINDS):
        for split, n, stream in (("train", n_per_kind, 2), ("test", max(1, n_per_kind // 5), 3)):
            rng = np.random.default_rng([seed, k, stream])
            images, labels = draw(kind, n, image_size, rng, split)
            shifts = rng.integers(0, groupings if kind.task else 1, size=len(labels))
            out[f"{split}_images"] += images
            out[f"{split}_labels"] += [
                index[upstream_label(kind, y, group, int(sh))] for y, sh in zip(labels, shifts, strict=True)
            ]
    return TaskData("upstream", names, **out, description="upstream mixture with upstream (coarse) labels")
