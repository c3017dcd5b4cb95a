"""push_folder over real HTTP against a local Hub-protocol server (tests/hub_server.py)."""

from __future__ import annotations

import hashlib
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


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_push_uploads_every_file(hub_env, model_folder):
    with HubServer(token=TOKEN) as hub:
        hub_env(hub.url)
        url = push_folder(model_folder, "me/merged-vit", private=True, token=TOKEN)
        repo = hub.repos["me/merged-vit"]
    assert url.startswith(f"{hub.url}/me/merged-vit/commit/")
    assert repo["request"]["visibility"] == "private"
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
