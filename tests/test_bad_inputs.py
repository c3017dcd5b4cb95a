"""Bad inputs through the command line: a non-zero exit, one paragraph naming the input and
what to do, no traceback, and nothing written or left behind (INTERFACES.md section 1)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_dataset, make_vit
from safetensors.torch import load_file, save_file

from hf_vitmerge.cli import main


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and mtime: what 'nothing changed' compares."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def cli(capsys, *args) -> tuple[int, str]:
    code = main([*map(str, args), "--quiet"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def write_config(path: Path, **config) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    base = make_vit(root / "base", seed=0)
    make_vit(root / "a", seed=1, base=base)
    make_vit(root / "b", seed=2, base=base)
    make_dataset(root / "data-a", 3, n=12)
    make_dataset(root / "data-b", 3, n=12, seed=1)
    return root


@pytest.fixture
def readonly_dir(tmp_path) -> Path:
    """A folder this process cannot write into (a chmod'ed folder, or /sys when running as root)."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").write_text("x")
    except OSError:
        yield folder
        folder.chmod(0o755)
        return
    (folder / "probe").unlink()
    folder.chmod(0o755)
    if not Path("/sys").is_dir() or os.access("/sys", os.W_OK) and _can_write("/sys"):
        pytest.skip("no folder that this user cannot write")
    yield Path("/sys")


def _can_write(folder: str) -> bool:
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def test_nan_weight_is_refused_naming_model_and_tensor(pair, tmp_path, capsys):
    bad = tmp_path / "nan-model"
    shutil.copytree(pair / "a", bad)
    tensors = load_file(bad / "model.safetensors")
    key = next(k for k in tensors if k.endswith("attention.query.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    cfg = write_config(tmp_path / "c.yaml", method="average", models=[str(pair / "b"), str(bad)])
    code, err = cli(capsys, "merge", cfg, "--out", tmp_path / "out")
    assert code == 2 and str(bad) in err and key in err and "NaN" in err
    assert not (tmp_path / "out").exists()


def test_calibration_labels_out_of_range(pair, tmp_path, capsys):
    data = tmp_path / "five-labels"
    make_dataset(data, 5, n=10)  # labels 0..4 for models with 3 labels
    cfg = write_config(
        tmp_path / "c.yaml",
        method="fisher",
        models=[
            {"model": str(pair / "a"), "data": {"path": str(data)}},
            {"model": str(pair / "b"), "data": {"path": str(pair / "data-b")}},
        ],
    )
    code, err = cli(capsys, "merge", cfg, "--out", tmp_path / "out")
    assert code == 2 and str(data) in err and "out of range" in err and "3 labels" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda(pair, tmp_path, capsys, micro_suite):
    cfg = write_config(tmp_path / "c.yaml", method="average", models=[str(pair / "a"), str(pair / "b")])
    code, err = cli(capsys, "merge", cfg, "--out", tmp_path / "out", "--device", "cuda")
    assert code == 2 and "--device cuda" in err and "--device cpu" in err
    code, err = cli(capsys, "evaluate", pair / "a", "--suite", micro_suite, "--device", "cuda")
    assert code == 2 and "no usable CUDA device" in err
    code, err = cli(capsys, "bench", micro_suite, "--methods", "average", "--device", "cuda")
    assert code == 2 and "no usable CUDA device" in err
    assert not (tmp_path / "out").exists()


def test_calibration_data_is_never_written_to(pair, tmp_path, capsys):
    """A data folder is read only: a merge writes no cache files there, and a read-only one works."""
    data = {name: tmp_path / name for name in ("data-a", "data-b")}
    for name, folder in data.items():
        shutil.copytree(pair / name, folder)
    before = {name: listing(folder) for name, folder in data.items()}
    for folder in data.values():
        for p in [folder, *folder.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
    cfg = write_config(
        tmp_path / "c.yaml",
        method="fisher",
        models=[{"model": str(pair / m), "data": {"path": str(data[f"data-{m}"])}} for m in ("a", "b")],
        calibration={"samples_per_task": 6, "batch_size": 6},
    )
    try:
        code, _ = cli(capsys, "merge", cfg, "--out", tmp_path / "out")
    finally:
        for folder in data.values():
            for p in [folder, *folder.rglob("*")]:
                p.chmod(0o755 if p.is_dir() else 0o644)
    assert code == 0 and (tmp_path / "out" / "model.safetensors").is_file()
    assert {name: listing(folder) for name, folder in data.items()} == before


@pytest.mark.parametrize("models", [["a"], ["a", "a"], ["a", "a/"]])
def test_single_or_repeated_model(pair, tmp_path, capsys, models):
    cfg = write_config(tmp_path / "c.yaml", method="average", models=[str(pair / m) for m in models])
    code, err = cli(capsys, "merge", cfg, "--out", tmp_path / "out")
    assert code == 2 and str(pair / "a") in err
    assert ("at least two models" if len(models) == 1 else "listed twice") in err
    assert not (tmp_path / "out").exists()


def test_same_folder_under_two_spellings(pair, tmp_path, capsys, monkeypatch):
    (tmp_path / "link").symlink_to(pair / "a")
    cfg = write_config(
        tmp_path / "c.yaml", method="average", models=[str(pair / "a"), str(tmp_path / "link")]
    )
    code, err = cli(capsys, "merge", cfg, "--out", tmp_path / "out")
    assert code == 2 and ("same model" in err or "listed twice" in err)


@pytest.mark.parametrize("path", ["./no-such-data", "data/taks0"])
def test_missing_data_path_is_an_error_even_without_data_methods(pair, tmp_path, capsys, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "task0").mkdir(parents=True)
    cfg = write_config(
        tmp_path / "c.yaml",
        method="average",
        models=[{"model": str(pair / "a"), "data": {"path": path}}, str(pair / "b")],
    )
    code, err = cli(capsys, "merge", cfg, "--out", tmp_path / "out")
    assert code == 2 and path in err and "does not exist" in err
    if path == "data/taks0":
        assert "data/task0" in err  # the likely intended folder
    assert not (tmp_path / "out").exists()


def test_evaluate_missing_folders(micro_suite, tmp_path, capsys, monkeypatch):
    code, err = cli(capsys, "evaluate", tmp_path / "nowhere" / "model", "--suite", micro_suite)
    assert code == 2 and "does not exist" in err and "Repo id" not in err
    monkeypatch.chdir(micro_suite.parent)
    code, err = cli(capsys, "evaluate", "models/taks0", "--suite", micro_suite)  # a typo for models/task0
    assert code == 2 and "models/taks0" in err and "models/task0" in err


def test_architecture_mismatch_pairs_values_with_models(pair, tmp_path, capsys):
    make_vit(tmp_path / "wide", seed=3, hidden_size=48)
    cfg = write_config(
        tmp_path / "c.yaml", method="average", models=[str(pair / "a"), str(tmp_path / "wide")]
    )
    code, err = cli(capsys, "merge", cfg, "--out", tmp_path / "out")
    assert code == 2 and f"'{pair / 'a'}' vs '{tmp_path / 'wide'}': hidden_size: 32 vs 48" in err


def test_bench_unknown_method_fails_before_any_merge(micro_suite, tmp_path, capsys, monkeypatch):
    import hf_vitmerge.api as api

    def no_merge(*args, **kwargs):
        raise AssertionError("a method ran before the bad method spec was reported")

    monkeypatch.setattr(api, "_run_one", no_merge)
    monkeypatch.setattr("hf_vitmerge.evaluation.reference_results", no_merge)
    code, err = cli(
        capsys, "bench", micro_suite, "--methods", "average,nosuch", "--json", tmp_path / "b.json"
    )
    assert code == 2 and "nosuch" in err and not (tmp_path / "b.json").exists()


def test_bench_method_parameters_separated_by_commas_are_refused(micro_suite, tmp_path, capsys):
    """`gated[m=2,static_method=average]` would give `m` the value '2,static_method=average'; the
    spec is refused up front with the separator to use."""
    code, err = cli(
        capsys,
        "bench",
        micro_suite,
        "--methods",
        "ties[density=0.2,scaling=1]",
        "--json",
        tmp_path / "b.json",
    )
    assert code == 2 and "separate parameters with ';'" in err and not (tmp_path / "b.json").exists()


def test_read_only_outputs_fail_before_the_work(
    pair, micro_suite, tmp_path, capsys, readonly_dir, monkeypatch
):
    import hf_vitmerge.api as api
    import hf_vitmerge.merging as merging

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the output was checked")

    monkeypatch.setattr(api, "_run_one", no_work)
    monkeypatch.setattr(api, "prepare", no_work)
    monkeypatch.setattr(merging, "prepare", no_work)
    code, err = cli(capsys, "bench", micro_suite, "--methods", "average", "--json", readonly_dir / "b.json")
    assert code == 2 and "--json" in err and str(readonly_dir) in err and "Errno" not in err
    cfg = write_config(tmp_path / "c.yaml", method="average", models=[str(pair / "a"), str(pair / "b")])
    code, err = cli(capsys, "merge", cfg, "--out", readonly_dir / "merged")
    assert code == 2 and str(readonly_dir / "merged") in err and "writable" in err
    code, err = cli(capsys, "evaluate", pair / "a", "--suite", micro_suite, "--json", readonly_dir / "e.json")
    assert code == 2 and "--json" in err


CUSTOM_CODE = """
import os
from pathlib import Path

from transformers import ViTConfig, ViTForImageClassification

if os.environ.get("HF_VITMERGE_TEST_MARKER"):
    Path(os.environ["HF_VITMERGE_TEST_MARKER"]).write_text("the model's code ran")


class CustomViTConfig(ViTConfig):
    model_type = "hf-vitmerge-test-custom-vit"


class CustomViT(ViTForImageClassification):
    config_class = CustomViTConfig
"""


def test_evaluate_runs_shipped_code_only_with_trust_remote_code(micro_suite, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "custom"
    make_vit(folder, labels=("0", "1"), seed=4)
    (folder / "custom_vit.py").write_text(CUSTOM_CODE)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="hf-vitmerge-test-custom-vit",
        architectures=["CustomViT"],
        auto_map={
            "AutoConfig": "custom_vit.CustomViTConfig",
            "AutoModelForImageClassification": "custom_vit.CustomViT",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "ran.txt"
    monkeypatch.setenv("HF_VITMERGE_TEST_MARKER", str(marker))
    code, err = cli(capsys, "evaluate", folder, "--suite", micro_suite)
    assert code == 2 and "--trust-remote-code" in err and str(folder) in err
    assert not marker.exists()
    code, _ = cli(capsys, "evaluate", folder, "--suite", micro_suite, "--trust-remote-code")
    assert code == 0 and marker.exists()


def test_evaluate_registered_classes_need_no_flag(micro_suite, tmp_path, capsys):
    root = micro_suite.parent
    cfg = write_config(
        tmp_path / "c.yaml",
        method="average",
        models=[str(root / "models" / f"task{i}") for i in range(3)],
        heads="multi",
    )
    assert cli(capsys, "merge", cfg, "--out", tmp_path / "multi")[0] == 0
    code, err = cli(capsys, "evaluate", tmp_path / "multi", "--suite", micro_suite)
    assert code == 0, err


def test_other_exceptions_are_bugs_with_a_traceback(monkeypatch, micro_suite):
    """The CLI reports only hf_vitmerge's errors as user errors; a KeyError inside is not hidden."""
    import hf_vitmerge

    def broken(*args, **kwargs):
        raise KeyError("internal")

    monkeypatch.setattr(hf_vitmerge, "evaluate_model", broken)
    with pytest.raises(KeyError, match="internal"):
        main(["evaluate", "x", "--suite", str(micro_suite)])
