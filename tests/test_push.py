"""push_folder over real HTTP against a local Hub-protocol server (tests/hub_server.py)."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import pytest
from conftest import make_vit
from hub_server import HubServer

from hf_vitmerge.hub import PushError, push_folder, retry_command

TOKEN = "hf_test_token"


@pytest.fixture
def hub_env(monkeypatch):
    """Point huggingface_hub at a URL set later, with Xet off (the test server speaks LFS)."""
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(hc, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)

    def point_at(url: str) -> None:
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setattr(hc, "ENDPOINT", url)

    return point_at


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("push") / "merged"
    make_vit(folder, seed=0)
    (folder / "README.md").write_text(
        "---\nlibrary_name: transformers\nbase_model_relation: merge\n---\n# merged\n"
    )
    (folder / "merge_config.yaml").write_text("method: average\nmodels: [a, b]\n")
    return folder


def is_private(create_request: dict) -> bool:
    """huggingface_hub 1.x asks for ``visibility: private``, 0.x for ``private: true``."""
    return create_request.get("visibility") == "private" or create_request.get("private") is True


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_push_uploads_every_file(hub_env, model_folder):
    with HubServer(token=TOKEN) as hub:
        hub_env(hub.url)
        url = push_folder(model_folder, "me/merged-vit", private=True, token=TOKEN)
        repo = hub.repos["me/merged-vit"]
    assert url.startswith(f"{hub.url}/me/merged-vit/commit/")
    assert is_private(repo["request"])
    local = {p.name: p.read_bytes() for p in model_folder.iterdir()}
    assert set(repo["files"]) == set(local)
    for name, data in local.items():
        assert repo["files"][name] == data, name
    # the weights went through the LFS batch API + PUT, the small files inline in the commit
    assert ("PUT", f"/lfs-objects/{hashlib.sha256(local['model.safetensors']).hexdigest()}") in hub.requests
    assert ("POST", "/api/validate-yaml") in hub.requests
    assert b"base_model_relation: merge" in repo["files"]["README.md"]


def test_push_to_existing_repo_adds_a_commit(hub_env, model_folder):
    with HubServer(token=TOKEN) as hub:
        hub_env(hub.url)
        first = push_folder(model_folder, "me/again", token=TOKEN)
        second = push_folder(model_folder, "me/again", token=TOKEN, commit_message="second")
        commits = hub.repos["me/again"]["commits"]
    assert first != second and [c["summary"] for c in commits][-1] == "second"


def test_push_rejected_token_raises_and_keeps_folder(hub_env, model_folder):
    before = _snapshot(model_folder)
    with HubServer(reject_all=True) as hub:
        hub_env(hub.url)
        with pytest.raises(PushError) as info:
            push_folder(model_folder, "me/merged-vit", token="hf_bad")
    msg = str(info.value)
    assert "401" in msg and str(model_folder.resolve()) in msg
    assert retry_command(model_folder, "me/merged-vit") in msg
    assert _snapshot(model_folder) == before


def test_push_server_down_raises_and_keeps_folder(hub_env, model_folder):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hub_env(f"http://127.0.0.1:{port}")
    before = _snapshot(model_folder)
    with pytest.raises(PushError, match="intact at") as info:
        push_folder(model_folder, "me/merged-vit", token=TOKEN, private=True)
    assert f"hf upload me/merged-vit {model_folder.resolve()} . --repo-type model --private" in str(
        info.value
    )
    assert _snapshot(model_folder) == before


def test_push_refuses_a_non_model_folder(tmp_path):
    with pytest.raises(PushError, match="not a model folder"):
        push_folder(tmp_path, "me/x")


def test_hub_rejects_a_card_with_a_local_base_model(hub_env, tmp_path):
    """The test Hub validates metadata as the Hub does: a local path in base_model is refused."""
    folder = tmp_path / "bad-card"
    make_vit(folder, seed=0)
    (folder / "README.md").write_text(
        f"---\nbase_model:\n- {tmp_path}/models/inverted\nbase_model_relation: merge\n---\n# merged\n"
    )
    with HubServer(token=TOKEN) as hub:
        hub_env(hub.url)
        with pytest.raises(PushError, match="base_model"):
            push_folder(folder, "me/bad", token=TOKEN)
        assert not hub.repos["me/bad"]["files"]


def _merge_config(micro_suite: Path) -> dict:
    root = micro_suite.parent
    return {
        "method": "task_arithmetic",
        "base_model": str(root / "base"),
        "models": [{"model": str(root / "models" / f"task{i}"), "task": f"task{i}"} for i in range(3)],
        "parameters": {"scaling": 0.4},
        "heads": "union",
    }


def _assert_pushed_card_is_valid(hub, repo_id: str, out: Path) -> None:
    import yaml

    repo = hub.repos[repo_id]
    assert set(repo["files"]) == {p.name for p in out.iterdir()}
    assert repo["files"]["README.md"] == (out / "README.md").read_bytes()
    # the card run_merge generated went through the Hub's metadata validation and passed
    assert hub.validated and all(errors == [] for _, errors in hub.validated)
    front = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert "base_model" not in front  # local inputs only: no base_model, they are listed in the body
    assert str(out.parent) not in json.dumps(front.get("base_model"))


def test_run_merge_pushes_its_card(hub_env, micro_suite, tmp_path, monkeypatch):
    from hf_vitmerge import run_merge

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "merged"
    with HubServer(token=TOKEN) as hub:
        hub_env(hub.url)
        run = run_merge(_merge_config(micro_suite), out, push_to_hub="me/ta-merge", private=True, quiet=True)
        _assert_pushed_card_is_valid(hub, "me/ta-merge", out)
        assert is_private(hub.repos["me/ta-merge"]["request"])
    assert run.push_url.startswith(f"{hub.url}/me/ta-merge/commit/")


def test_cli_push_to_hub(hub_env, micro_suite, tmp_path, monkeypatch, capsys):
    import yaml

    from hf_vitmerge.cli import main

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_merge_config(micro_suite)))
    out = tmp_path / "merged"
    with HubServer(token=TOKEN) as hub:
        hub_env(hub.url)
        assert main(["merge", str(cfg), "--out", str(out), "--push-to-hub", "me/cli-merge", "--quiet"]) == 0
        _assert_pushed_card_is_valid(hub, "me/cli-merge", out)
    assert f"pushed to {hub.url}/me/cli-merge/commit/" in capsys.readouterr().out


def test_cli_push_failure_keeps_the_folder(hub_env, micro_suite, tmp_path, monkeypatch, capsys):
    import yaml

    from hf_vitmerge.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_merge_config(micro_suite)))
    out = tmp_path / "merged"
    with HubServer(reject_all=True) as hub:
        hub_env(hub.url)
        assert main(["merge", str(cfg), "--out", str(out), "--push-to-hub", "me/x", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "intact at" in err and "hf upload me/x" in err
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
