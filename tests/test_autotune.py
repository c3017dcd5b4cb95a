"""`auto` parameters: chosen on the calibration split only, recorded everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import yaml

from hf_vitmerge.api import bench, run_merge, suite_config
from hf_vitmerge.merging import execute, prepare
from hf_vitmerge.methods import get_method


@pytest.fixture
def opened_datasets(monkeypatch):
    """Every folder ``datasets.load_from_disk`` opens during the test."""
    seen: list[str] = []
    real = datasets.load_from_disk

    def spy(path, *args, **kwargs):
        seen.append(str(Path(path).resolve()))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_from_disk", spy)
    return seen


def test_auto_never_reads_a_test_split(micro_suite, opened_datasets):
    config = suite_config(micro_suite, "task_arithmetic", {"scaling": "auto"}, samples_per_task=8)
    ctx = prepare(config, quiet=True)
    model, info = execute(ctx)
    assert opened_datasets, "the search must read the calibration data"
    test_dirs = [
        str((micro_suite.parent / "data" / t / "test").resolve()) for t in ("task0", "task1", "task2")
    ]
    assert not [p for p in opened_datasets if p in test_dirs]
    assert all(p.endswith("/train") for p in opened_datasets)
    grid = get_method("task_arithmetic").auto_grid("scaling")
    chosen = info["auto"]["chosen"]["scaling"]
    assert chosen in grid and len(info["auto"]["trials"]) == len(grid)
    assert ctx.config.parameters["scaling"] == chosen  # resolved in the config itself
    best = max(t["score"] for t in info["auto"]["trials"])
    assert [t["score"] for t in info["auto"]["trials"] if t["scaling"] == chosen] == [best]


def test_validation_slice_is_disjoint_from_the_calibration_sample(micro_suite):
    from hf_vitmerge.autotune import validation_slice

    config = suite_config(micro_suite, "task_arithmetic", {"scaling": "auto"}, samples_per_task=8)
    ctx = prepare(config, quiet=True)
    calib = ctx.calibration_data(0).dataset
    val, disjoint = validation_slice(ctx, 0, samples=10)
    val = val.dataset
    assert disjoint
    ids = lambda ds: {(row["label"], bytes(row["image"].tobytes())) for row in ds}  # noqa: E731
    assert len(val) == 10 and not ids(calib) & ids(val)


def test_auto_is_recorded_in_config_card_and_bench(micro_suite, tmp_path):
    config = suite_config(micro_suite, "consensus", {"mask_lambda": "auto", "k": 1}, samples_per_task=8)
    run = run_merge(config, tmp_path / "merged", quiet=True)
    saved = yaml.safe_load((tmp_path / "merged" / "merge_config.yaml").read_text())
    assert isinstance(saved["parameters"]["mask_lambda"], float)
    card = (tmp_path / "merged" / "README.md").read_text()
    assert f"mask_lambda: {saved['parameters']['mask_lambda']}" in card and '"chosen"' in card
    assert run.info["auto"]["chosen"]["mask_lambda"] == saved["parameters"]["mask_lambda"]

    report = bench(
        micro_suite,
        "task_arithmetic[scaling=auto]",
        seeds="0,1",
        samples_per_task=8,
        json_path=tmp_path / "b.json",
        quiet=True,
    )
    result = json.loads((tmp_path / "b.json").read_text())["results"][0]
    assert report["results"][0]["method"] == "task_arithmetic"
    for run_ in result["per_seed"]:
        assert isinstance(run_["params"]["scaling"], float)
        # each seed's search is kept: the chosen value is the best-scoring candidate
        trials = run_["auto"]["trials"]
        assert len(trials) > 1 and run_["auto"]["chosen"]["scaling"] == run_["params"]["scaling"]
        assert max(trials, key=lambda t: t["score"])["scaling"] == run_["params"]["scaling"]
    assert isinstance(result["params"]["scaling"], float)


def test_auto_needs_calibration_data(tmp_path):
    from conftest import make_vit

    from hf_vitmerge import merge

    make_vit(tmp_path / "base", seed=0)
    for i in range(2):
        make_vit(tmp_path / f"ft{i}", seed=i + 1)
    with pytest.raises(ValueError, match="no `data:` entry"):
        merge(
            [str(tmp_path / "ft0"), str(tmp_path / "ft1")],
            "task_arithmetic",
            base_model=str(tmp_path / "base"),
            scaling="auto",
            quiet=True,
        )
