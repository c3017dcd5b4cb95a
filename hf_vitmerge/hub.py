"""Publishing a merged model folder to the Hugging Face Hub.

A thin layer over ``huggingface_hub.HfApi`` (``create_repo`` + ``upload_folder``), so tokens,
``HF_ENDPOINT``, Xet/LFS uploads and retries behave as everywhere else in the ecosystem. What
it adds is the failure mode: a push that fails never touches the local folder, and the error
says where the folder is and the exact command that retries the upload.
"""

from __future__ import annotations

import importlib
import os
import shlex
from pathlib import Path

from .errors import HFVitMergeError


class PushError(HFVitMergeError, RuntimeError):
    """Uploading a merged model failed; the local folder is intact (see the message)."""


def retry_command(out_dir: str | os.PathLike, repo_id: str, private: bool = False) -> str:
    """The ``hf upload`` command (huggingface_hub CLI) that uploads ``out_dir`` to ``repo_id``."""
    cmd = ["hf", "upload", repo_id, str(Path(out_dir).resolve()), ".", "--repo-type", "model"]
    if private:
        cmd.append("--private")
    return shlex.join(cmd)


def push_folder(
    out_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload merged model (hf_vitmerge)",
) -> str:
    """Create ``repo_id`` if needed and upload every file of ``out_dir``; return the commit URL.

    ``token`` defaults to the logged-in token (``hf auth login`` or ``HF_TOKEN``). Raises
    :class:`PushError` when the Hub cannot be reached, refuses the token or rejects the upload.
    """
    from huggingface_hub import HfApi

    folder = Path(out_dir)
    if not (folder / "config.json").is_file():
        raise PushError(f"{folder} is not a model folder (no config.json): nothing to push")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id, folder_path=folder, repo_type="model", commit_message=commit_message
        )
    except _push_errors() as err:
        metadata = "Invalid metadata" in str(err)
        advice = (
            "Fix the metadata of its model card (README.md front matter)"
            if metadata
            else "Check your network and token (`hf auth login`, or HF_TOKEN with write access)"
        )
        raise PushError(
            f"pushing {folder} to the Hub repo {repo_id!r} at {api.endpoint} failed: "
            f"{type(err).__name__}: {_reason(err, lines=6 if metadata else 1)}\n"
            f"The merged model is intact at {folder.resolve()}. {advice}, then retry with:\n"
            f"  {retry_command(folder, repo_id, private)}"
        ) from err
    return str(info.commit_url)


def _push_errors() -> tuple[type[BaseException], ...]:
    """Errors a failed upload can raise: Hub HTTP errors, the HTTP client's transport errors
    (``httpx2`` in huggingface_hub 1.x+, ``requests`` before, both wrapped as OSError/RuntimeError
    in places), and ``ValueError`` for responses or metadata the client rejects."""
    from huggingface_hub.errors import HfHubHTTPError

    errors: list[type[BaseException]] = [HfHubHTTPError, OSError, RuntimeError, ValueError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).HTTPError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _reason(err: BaseException, lines: int = 1) -> str:
    """The first ``lines`` lines of the error (the Hub lists each metadata problem on its own line)."""
    text = str(err).strip()
    return "\n".join(text.splitlines()[:lines]) if text else "(no message)"
