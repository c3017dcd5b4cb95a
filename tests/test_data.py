"""Task data from `datasets`: saved folders, DatasetDicts, image folders, column detection, errors."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
from conftest import make_dataset
from PIL import Image
from transformers import ViTImageProcessor

from hf_vitmerge.data import DataError, load_task_data

PROC = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def test_saved_dataset_detects_columns_and_batches(tmp_path):
    make_dataset(tmp_path / "d", num_labels=3, n=10)
    data = load_task_data(tmp_path / "d", num_labels=3)
    assert (data.image_column, data.label_column, len(data)) == ("image", "label", 10)
    batches = list(data.batches(PROC, batch_size=4, with_labels=True))
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    assert batches[0][0].shape[1:] == (3, 16, 16)
    assert data.labels().tolist() == [i % 3 for i in range(10)]
    sub = data.subset(4, seed=1)
    assert (
        len(sub) == 4
        and sub.subset(4, seed=1).dataset[:]["label"] == data.subset(4, seed=1).dataset[:]["label"]
    )


def test_dataset_dict_split_selection(tmp_path):
    ds = make_dataset(tmp_path / "single", num_labels=2, n=6)
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_task_data(tmp_path / "dd")) == 6
    assert len(load_task_data(tmp_path / "dd", "test")) == 2
    with pytest.raises(DataError, match="no split 'validation'"):
        load_task_data(tmp_path / "dd", "validation")


def test_image_folder(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    data = load_task_data(tmp_path / "imgs")
    assert len(data) == 6 and data.label_column == "label" and sorted(set(data.labels().tolist())) == [0, 1]


def test_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_task_data("./no/such/data")
    make_dataset(tmp_path / "d", num_labels=4, n=8)
    with pytest.raises(DataError, match=r"labels \[2, 3\].*out of range.*2 labels"):
        load_task_data(tmp_path / "d", num_labels=2)
    with pytest.raises(DataError, match="no column 'img'"):
        load_task_data(tmp_path / "d", image_column="img")
    ds = datasets.Dataset.from_dict({"a": [Image.new("RGB", (4, 4))], "b": [Image.new("RGB", (4, 4))]})
    ds.save_to_disk(str(tmp_path / "ambiguous"))
    with pytest.raises(DataError, match="which column.*images"):
        load_task_data(tmp_path / "ambiguous")
    empty = datasets.Dataset.from_dict({"image": [], "label": []})
    empty.save_to_disk(str(tmp_path / "empty"))
    # datasets 5 cannot even reload it; datasets 4 reloads it empty
    with pytest.raises(DataError, match="could not be loaded|is empty"):
        load_task_data(tmp_path / "empty")
