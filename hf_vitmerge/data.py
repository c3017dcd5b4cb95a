"""Task data from ``datasets``: Hub dataset ids, ``save_to_disk`` folders and image folders,
preprocessed with each model's own image processor."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError


class DataError(InputError):
    """Task data is missing, empty or does not match its model."""


@dataclass
class TaskData:
    """One split of one task, with its detected columns."""

    dataset: object  # datasets.Dataset
    image_column: str
    label_column: str | None
    source: str
    split: str | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def subset(self, n: int | None, seed: int = 0) -> TaskData:
        """The first ``n`` examples of a seeded shuffle (all if ``n`` is None or larger)."""
        if n is None or n >= len(self.dataset):
            return self
        # in memory: shuffle/select would otherwise write cache-*.arrow index files next to the
        # user's dataset (and fail on a read-only folder)
        ds = self.dataset.shuffle(seed=seed, keep_in_memory=True).select(range(n), keep_in_memory=True)
        return TaskData(ds, self.image_column, self.label_column, self.source, self.split)

    def labels(self) -> torch.Tensor:
        if self.label_column is None:
            raise DataError(f"data {self.source!r} has no label column")
        return torch.as_tensor(self.dataset[self.label_column], dtype=torch.long)

    def batches(self, processor, batch_size: int = 64, *, with_labels: bool = False) -> Iterator:
        """Yield ``pixel_values`` (and labels) batches preprocessed by ``processor``."""
        for start in range(0, len(self.dataset), batch_size):
            rows = self.dataset[start : start + batch_size]
            images = [
                img.convert("RGB") if hasattr(img, "convert") else img for img in rows[self.image_column]
            ]
            pixels = processor(images=images, return_tensors="pt")["pixel_values"]
            if with_labels:
                yield pixels, torch.as_tensor(rows[self.label_column], dtype=torch.long)
            else:
                yield pixels


def load_task_data(
    path: str | os.PathLike,
    split: str | None = None,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    num_labels: int | None = None,
    require_labels: bool = False,
    revision: str | None = None,
) -> TaskData:
    """Load a dataset split and detect its image and label columns.

    ``path`` is a ``save_to_disk`` folder, an image folder (``class_name/image.png``) or a
    Hub dataset id (cached datasets work offline with ``HF_HUB_OFFLINE=1``).
    """
    import datasets

    path_str = str(path)
    local = Path(path_str).expanduser()
    try:
        if local.is_dir() and _is_saved_dataset(local):
            ds = datasets.load_from_disk(str(local))
        elif local.is_dir():
            # the arrow cache goes to hf_vitmerge's cache, never into the user's image folder
            ds = datasets.load_dataset("imagefolder", data_dir=str(local), cache_dir=str(datasets_cache()))
        elif local.exists():
            raise DataError(f"dataset {path_str!r} is a file; give a dataset folder or a Hub dataset id")
        elif looks_like_local_path(path_str):
            raise DataError(
                f"dataset folder {path_str!r} does not exist. {_folder_hint(path_str)}Check the path."
            )
        else:
            ds = datasets.load_dataset(path_str, revision=revision)
    except DataError:
        raise
    except (FileNotFoundError, ValueError, OSError, ConnectionError, IndexError) as err:
        raise DataError(f"dataset {path_str!r} could not be loaded: {err}") from err
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            split = "train" if "train" in ds else (next(iter(ds)) if len(ds) == 1 else None)
            if split is None:
                raise DataError(f"dataset {path_str!r} has splits {list(ds)}; say which one with `split:`")
        if split not in ds:
            raise DataError(f"dataset {path_str!r} has no split {split!r}; available: {list(ds)}")
        ds = ds[split]
    if len(ds) == 0:
        raise DataError(f"dataset {path_str!r} (split {split}) is empty")
    image_column = image_column or _detect(ds, "image", path_str)
    if image_column not in ds.column_names:
        raise DataError(f"dataset {path_str!r} has no column {image_column!r}; columns: {ds.column_names}")
    if label_column is None:
        label_column = _detect(ds, "label", path_str, required=require_labels)
    elif label_column not in ds.column_names:
        raise DataError(f"dataset {path_str!r} has no column {label_column!r}; columns: {ds.column_names}")
    data = TaskData(ds, image_column, label_column, path_str, split)
    if label_column is not None and num_labels is not None:
        labels = data.labels()
        bad = labels[(labels < 0) | (labels >= num_labels)]
        if len(bad):
            raise DataError(
                f"dataset {path_str!r}: labels {sorted(set(bad.tolist()))[:5]} in column {label_column!r} are out "
                f"of range for a model with {num_labels} labels. Map the dataset's labels to the model's id2label."
            )
    return data


def load_entry_data(entry, *, labels: bool = True, **kwargs) -> TaskData:
    """:func:`load_task_data` on a merge config's ``data:`` entry: its path, split, image column,
    revision and (unless ``labels`` is false, when the label column is left to detection) label
    column. Other keywords go to :func:`load_task_data`."""
    return load_task_data(
        entry.path,
        entry.split,
        image_column=entry.image_column,
        label_column=entry.label_column if labels else None,
        revision=entry.revision,
        **kwargs,
    )


def datasets_cache() -> Path:
    """Where hf_vitmerge lets ``datasets`` write its cache files (``$HF_VITMERGE_CACHE/datasets``)."""
    root = os.environ.get("HF_VITMERGE_CACHE") or Path.home() / ".cache" / "hf_vitmerge"
    return Path(root) / "datasets"


_HUB_DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def is_hub_dataset_id(path: str) -> bool:
    """``name`` or ``org/name`` that is not a local file or folder."""
    return bool(_HUB_DATASET_ID.match(path)) and not Path(path).expanduser().exists()


def looks_like_local_path(path: str) -> bool:
    """A path that cannot be a Hub dataset id, or one whose first folder exists here (``data/taks0``)."""
    if path.startswith((".", "/", "~")) or not _HUB_DATASET_ID.match(path):
        return True
    return "/" in path and Path(path.split("/", 1)[0]).is_dir()


def check_data_path(path: str, what: str) -> None:
    """Early check of a data path (before any model is loaded): a local path must exist."""
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise DataError(f"{what}: dataset {path!r} is a file; give a dataset folder or a Hub dataset id")
        return
    if looks_like_local_path(path):
        raise DataError(
            f"{what}: dataset folder {path!r} does not exist. {_folder_hint(path)}"
            "Check the path (relative paths are read from the current folder)."
        )


def _folder_hint(path: str) -> str:
    from .loading import _folder_hint as hint

    return hint(path)


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file()


def _detect(ds, what: str, source: str, required: bool = True) -> str | None:
    import datasets

    feats = ds.features
    if what == "image":
        cands = [c for c, f in feats.items() if isinstance(f, datasets.Image)]
        names = ("image", "img", "pixel_values")
    else:
        cands = [c for c, f in feats.items() if isinstance(f, datasets.ClassLabel)]
        names = ("label", "labels", "fine_label")
        if not cands:
            cands = [c for c in names if c in feats and getattr(feats[c], "dtype", "").startswith("int")]
    if len(cands) == 1:
        return cands[0]
    named = [c for c in cands if c in names] if cands else [c for c in names if c in feats]
    if len(named) == 1:
        return named[0]
    if not required:
        return None
    raise DataError(
        f"cannot tell which column of dataset {source!r} holds the {what}s "
        f"(candidates: {cands or 'none'}; columns: {ds.column_names}). Set `{what}_column:` in the config."
    )
