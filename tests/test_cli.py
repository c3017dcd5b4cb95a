"""The command line: thin over the API, clear one-paragraph errors, no tracebacks, no overwrites."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from conftest import assert_complete_merged_folder

from hf_vitmerge.cli import main
from hf_vitmerge.methods import get_method


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "hf_vitmerge.cli", *args], capture_output=True, text=True, cwd=cwd
    )


def test_help_for_every_command():
    for cmd in ([], ["demo"], ["zoo", "build"], ["merge"], ["evaluate"], ["bench"], ["inspect"]):
        with pytest.raises(SystemExit) as exc:
            main([*cmd, "--help"])
        assert exc.value.code == 0


def test_zoo_list(capsys):
    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    for suite in ("digits-split", "digits-split5", "digits-domains", "shapes-tasks"):
        assert suite in out


def test_bad_config_is_one_paragraph_without_traceback(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"method": "average", "models": ["a"], "paramters": {}}))
    res = run_cli("merge", str(cfg), "--out", str(tmp_path / "out"))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "paramters: unknown key" in res.stderr and str(cfg) in res.stderr
    assert not (tmp_path / "out").exists()


def test_parameter_errors_found_with_the_models_are_one_paragraph_too(tmp_path, micro_suite):
    """A rule that needs the models (``stop_block`` against the number of blocks) fails after
    loading, still as a user error (exit 2, no traceback), and writes nothing."""
    root = micro_suite.parent
    cfg = tmp_path / "c.yaml"
    models = [
        {"model": str(root / f"models/task{i}"), "data": {"path": str(root / f"data/task{i}/train")}}
        for i in range(2)
    ]
    cfg.write_text(yaml.safe_dump({"method": "zipit", "models": models, "parameters": {"stop_block": 99}}))
    res = run_cli("merge", str(cfg), "--out", str(tmp_path / "out"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "stop_block must be in [0, 2]" in res.stderr
    assert not (tmp_path / "out").exists()


def test_missing_model_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"method": "average", "models": ["./nowhere/a", "./nowhere/b"]}))
    res = run_cli("merge", str(cfg), "--out", str(tmp_path / "out"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "./nowhere/a" in res.stderr and "does not exist" in res.stderr


def test_merge_writes_loadable_folder_and_refuses_to_overwrite(tmp_path, micro_suite):
    from transformers import AutoModelForImageClassification

    root = micro_suite.parent
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "method": "task_arithmetic",
                "base_model": str(root / "base"),
                "models": [
                    {"model": str(root / "models" / f"task{i}"), "task": f"task{i}"} for i in range(3)
                ],
                "parameters": {"scaling": 0.4},
                "heads": "union",
            }
        )
    )
    out = tmp_path / "merged"
    assert main(["merge", str(cfg), "--out", str(out), "--quiet"]) == 0
    assert_complete_merged_folder(out)
    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.config.num_labels == 7
    before = (out / "model.safetensors").read_bytes()
    res = run_cli("merge", str(cfg), "--out", str(out))
    assert res.returncode == 2 and "already exists" in res.stderr and "--overwrite" in res.stderr
    assert (out / "model.safetensors").read_bytes() == before
    assert main(["merge", str(cfg), "--out", str(out), "--overwrite", "--quiet"]) == 0
    assert (out / "model.safetensors").read_bytes() == before  # same config and seed: same bytes
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")], "no temporary folders left"


def test_evaluate_writes_json(tmp_path, micro_suite, capsys):
    root = micro_suite.parent
    out = tmp_path / "ev.json"
    assert (
        main(
            [
                "evaluate",
                str(root / "models" / "task0"),
                "--suite",
                str(micro_suite),
                "--json",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert set(res["per_task_accuracy"]) == {"task0", "task1", "task2"}
    from hf_vitmerge import reference_results

    own = reference_results(micro_suite)["individual"]["per_task_accuracy"]["task0"]
    assert res["per_task_accuracy"]["task0"] == pytest.approx(own)
    assert res["per_task_accuracy"]["task1"] is None and res["model"].endswith("task0")


def test_bench_json_and_markdown(tmp_path, micro_suite):
    js, md = tmp_path / "b.json", tmp_path / "b.md"
    assert (
        main(
            [
                "bench",
                str(micro_suite),
                "--methods",
                "average,task_arithmetic[scaling=0.5]",
                "--json",
                str(js),
                "--markdown",
                str(md),
                "--quiet",
            ]
        )
        == 0
    )
    report = json.loads(js.read_text())
    assert report["suite"] == "micro" and [r["method"] for r in report["results"]] == [
        "average",
        "task_arithmetic",
    ]
    assert report["results"][1]["params"] == {"scaling": 0.5}
    assert report["results"][0]["params"] == get_method("average").defaults  # defaults filled in
    for r in report["results"]:
        assert r["peak_rss_mb"] > 0 and r["num_parameters"] > 0 and r["merge_seconds"] >= 0
        assert set(r["per_task_accuracy"]) == {"task0", "task1", "task2"}
    assert set(report["reference"]) == {"individual", "ensemble"}
    assert "| average |" in md.read_text()


@pytest.mark.dist
def test_merge_launched_on_two_processes(tmp_path, micro_suite):
    """`torchrun --nproc_per_node 2 hf-vitmerge merge ...`: statistics are sharded, one process saves."""
    import os
    from pathlib import Path

    from safetensors.torch import load_file

    root = micro_suite.parent
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "method": "permute",
                "models": [
                    {
                        "model": str(root / "models" / f"task{i}"),
                        "task": f"task{i}",
                        "data": {"path": str(root / "data" / f"task{i}" / "train")},
                    }
                    for i in range(2)
                ],
                "calibration": {"samples_per_task": 16, "batch_size": 4},
            }
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    dist = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        "-m",
        "hf_vitmerge.cli",
        "merge",
        str(cfg),
        "--out",
        str(tmp_path / "two"),
        "--quiet",
    ]
    res = subprocess.run(dist, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    single = [
        sys.executable,
        "-m",
        "hf_vitmerge.cli",
        "merge",
        str(cfg),
        "--out",
        str(tmp_path / "one"),
        "--quiet",
    ]
    res = subprocess.run(single, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    two, one = (load_file(tmp_path / d / "model.safetensors") for d in ("two", "one"))
    assert two.keys() == one.keys()
    for key in one:
        assert (two[key] - one[key]).abs().max() <= 1e-5, key
    assert "| statistics_processes | 2 |" in (tmp_path / "two" / "README.md").read_text()
