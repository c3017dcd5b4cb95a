"""End to end on the embedded zoo (tiny): the acceptance flows of the README, CLI included.

Slow (each suite trains on this machine), still run in CI. Suites are built once per session.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hub_server import validate_metadata

from hf_vitmerge.cli import main

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def zoo_root(tmp_path_factory) -> Path:
    """A session folder whose hf_vitmerge cache holds the tiny suites (the demo reuses them)."""
    root = tmp_path_factory.mktemp("e2e")
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_VITMERGE_CACHE", str(root / "cache"))
    yield root
    mp.undo()


def _suite(zoo_root: Path, name: str) -> Path:
    """Build (once) into the cache and expose it as ./zoo/<name>, where the examples expect it."""
    from hf_vitmerge.zoo import build_suite

    suite = Path(build_suite(name, size="tiny", seed=0, quiet=True))
    link = zoo_root / "zoo" / name
    if not link.exists():
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(suite.parent, target_is_directory=True)
    return link / "suite.json"


def test_digits_domains_bench(zoo_root):
    suite = _suite(zoo_root, "digits-domains")
    out = zoo_root / "dd.json"
    assert (
        main(["bench", str(suite), "--methods", "average,task_arithmetic", "--json", str(out), "--quiet"])
        == 0
    )
    report = json.loads(out.read_text())
    assert report["reference"]["individual"]["avg_task_accuracy"] >= 0.90
    avg = next(r for r in report["results"] if r["method"] == "average")
    # merging domains of one base is neither trivial nor hopeless
    assert 0.3 <= avg["normalized_accuracy"] <= 0.95
    assert avg["joint_accuracy"] is None  # shared label space


def test_digits_split_evaluate_individual(zoo_root):
    suite = _suite(zoo_root, "digits-split")
    meta = json.loads(suite.read_text())
    first = meta["tasks"][0]
    out = zoo_root / "ev.json"
    assert (
        main(
            [
                "evaluate",
                str(suite.parent / first["model"]),
                "--suite",
                str(suite),
                "--json",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert res["per_task_accuracy"][first["name"]] >= 0.90
    assert res["per_task_accuracy"][meta["tasks"][1]["name"]] is None
    assert 0.3 < res["joint_accuracy"] < 0.7  # one model knows only half of the union's labels


def test_demo_writes_a_loadable_model(zoo_root):
    from transformers import pipeline

    from hf_vitmerge.showcase import DEMO_METHODS

    _suite(zoo_root, "hub-tasks")
    out = zoo_root / "demo"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["results"]] == [m for m, _ in DEMO_METHODS]
    assert set(results["reference"]) == {"individual", "ensemble"}
    chosen = results["recommended"]
    assert chosen["method"] in {m for m, _ in DEMO_METHODS}
    model_dir = out / chosen["folder"]
    from PIL import Image

    classify = pipeline("image-classification", model=str(model_dir), trust_remote_code=True)
    assert len(classify(Image.new("RGB", (24, 24), "white"), top_k=3)) == 3
    by_method = {r["method"]: r for r in results["results"]}
    assert (
        by_method[chosen["method"]]["normalized_accuracy"]
        > by_method["average"]["normalized_accuracy"] - 1e-9
    )
    # every input is a local zoo folder: none may appear in `base_model` (the Hub accepts repo ids only)
    front = yaml.safe_load((model_dir / "README.md").read_text().split("---\n")[1])
    assert "base_model" not in front and validate_metadata(front) == []
    assert all(i["local"] and i["weights_sha256"] for i in front["hf_vitmerge"]["inputs"])
    assert (out / "results.md").is_file()
    assert main(["demo", "--out", str(out), "--quiet"]) == 2  # refuses to overwrite


def test_shapes_tasks_example_configs(zoo_root, monkeypatch):
    _suite(zoo_root, "shapes-tasks")
    monkeypatch.chdir(zoo_root)  # the examples expect the zoo at ./zoo/<suite>
    out = zoo_root / "ties"
    assert (
        main(["merge", str(REPO / "examples" / "shapes-tasks-ties.yaml"), "--out", str(out), "--quiet"]) == 0
    )
    assert (
        main(["merge", str(REPO / "examples" / "shapes-tasks-ties.yaml"), "--out", str(out), "--quiet"]) == 2
    )
    ev = zoo_root / "ties.json"
    assert (
        main(["evaluate", str(out), "--suite", "zoo/shapes-tasks/suite.json", "--json", str(ev), "--quiet"])
        == 0
    )
    res = json.loads(ev.read_text())
    assert len(res["per_task_accuracy"]) >= 10 and all(
        v is not None for v in res["per_task_accuracy"].values()
    )
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md").data
    assert card.base_model is None and validate_metadata(card.to_dict()) == []
    inputs = card.to_dict()["hf_vitmerge"]["inputs"]
    assert len(inputs) >= 11 and all(i["local"] and i["weights_sha256"] for i in inputs)
