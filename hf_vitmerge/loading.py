"""Resolve, validate and load the models to merge: Hub ids (with revisions), local folders
and the Hugging Face cache.

Hub ids go through ``huggingface_hub.snapshot_download``, so ``HF_HUB_OFFLINE=1`` with a
populated cache, private repos (``HF_TOKEN``) and custom ``HF_ENDPOINT`` all work as in the
rest of the ecosystem. The resolved commit SHA is kept for the model card.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .arch import IncompatibleModelError, ViTAdapter, check_compatible
from .errors import InputError

WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.md", "*.py", "*.txt"]


class ModelLoadError(InputError):
    """A model could not be found, read or validated."""


@dataclass
class ModelSource:
    """A model to merge, resolved to a local folder but not necessarily loaded."""

    ref: str  # what the user gave: Hub id or folder
    path: Path  # local folder holding config.json and weights
    revision: str | None = None  # as requested
    commit: str | None = None  # resolved commit SHA for Hub models
    name: str | None = None  # task name in the merged model
    config: object = None
    adapter: ViTAdapter = None
    _model: torch.nn.Module | None = field(default=None, repr=False)

    @property
    def is_hub(self) -> bool:
        return self.commit is not None

    @property
    def labels(self) -> list[str]:
        id2label = self.config.id2label
        return [str(id2label[i]) for i in range(len(id2label))]

    def weight_files(self) -> list[Path]:
        return _weight_files(self.path, self.ref)

    def load_model(self, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """The ``ViTForImageClassification`` (cached on this source)."""
        if self._model is None:
            self._model = _load_hf_model(self)
        return self._model.to(dtype)

    def tensors(self) -> TensorReader:
        return TensorReader(self)

    def image_processor(self):
        from transformers import AutoImageProcessor

        try:
            return AutoImageProcessor.from_pretrained(self.path)
        except (OSError, ValueError) as err:
            raise ModelLoadError(
                f"model {self.ref!r} has no usable image processor (preprocessor_config.json): {err}. "
                "Save one next to the model with `processor.save_pretrained(folder)`."
            ) from err

    def describe(self) -> dict:
        return {"model": self.ref, "revision": self.revision, "commit": self.commit, "task": self.name}


class TensorReader:
    """Streams canonical tensors from a model's safetensors (or .bin) files, one at a time."""

    def __init__(self, source: ModelSource):
        self.source = source
        self._where: dict[str, tuple[Path, str]] = {}
        self._bins: dict[Path, dict] = {}  # .bin checkpoints, memory-mapped
        for file in source.weight_files():
            for key in _file_keys(file, source.ref):
                canon = source.adapter.canonical_key(key)
                if canon is not None:
                    self._where[canon] = (file, key)

    def keys(self) -> list[str]:
        return list(self._where)

    def file_key(self, key: str) -> str:
        """The name a canonical tensor has in the checkpoint file (what the user can look up)."""
        return self._where[key][1]

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get_finite(self, key: str) -> torch.Tensor:
        """:meth:`get`, refusing NaN or infinite values (:func:`require_finite`)."""
        tensor = self.get(key)
        require_finite(self.source, self.file_key(key), tensor)
        return tensor

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor. safetensors files are opened per call, so pages read for earlier tensors
        are not kept mapped (peak memory stays near one tensor per input, whatever the input count)."""
        try:
            file, file_key = self._where[key]
        except KeyError:
            raise ModelLoadError(f"model {self.source.ref!r} has no tensor {key!r} in its weights") from None
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as handle:
                return handle.get_tensor(file_key)
        if file not in self._bins:
            self._bins[file] = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        return self._bins[file][file_key].clone()

    def close(self) -> None:
        self._bins.clear()


def _weight_files(path: Path, ref: str) -> list[Path]:
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if (path / single).is_file():
            return [path / single]
        index = path / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [path / s for s in shards]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ModelLoadError(f"model {ref!r}: shards {missing} listed in {index_name} are missing")
            return files
    raise ModelLoadError(
        f"model {ref!r} has no weights in {path} (expected model.safetensors, a sharded "
        "model.safetensors.index.json or pytorch_model.bin). Save it with `model.save_pretrained(folder)`."
    )


def _file_keys(file: Path, ref: str) -> list[str]:
    try:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                return list(f.keys())
        return list(torch.load(file, map_location="cpu", mmap=True, weights_only=True))
    except (SafetensorError, OSError, RuntimeError, EOFError) as err:
        raise ModelLoadError(
            f"model {ref!r}: weights file {file.name} is corrupt or unreadable ({err})"
        ) from err


def _load_hf_model(source: ModelSource) -> torch.nn.Module:
    from transformers import ViTForImageClassification, ViTModel

    cls = ViTForImageClassification if source.adapter.prefix else ViTModel
    try:
        model, info = cls.from_pretrained(source.path, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelLoadError(f"model {source.ref!r} could not be loaded: {err}") from err
    missing = [k for k in info.get("missing_keys", []) if "pooler" not in k]
    mismatched = info.get("mismatched_keys", [])
    if missing or mismatched:
        raise ModelLoadError(
            f"model {source.ref!r} loaded with missing weights {sorted(missing)[:5]} "
            f"or mismatched shapes {list(mismatched)[:5]}: its checkpoint does not match its config."
        )
    return model.eval()


def resolve_model(
    ref: str | os.PathLike,
    revision: str | None = None,
    name: str | None = None,
    *,
    check_finite: bool = True,
) -> ModelSource:
    """Find a model folder locally or on the Hub (or in the HF cache) and validate it.

    ``check_finite=False`` skips reading every weight to refuse NaN or infinite values: for the
    tensorwise merge engine, which checks every tensor it merges and names the input behind a
    non-finite one (``MergeContext.run_tensorwise``), so that no input is read twice."""
    from transformers import AutoConfig

    ref_str = str(ref)
    local = Path(ref_str).expanduser()
    commit = None
    if local.is_dir():
        if revision not in (None, "main"):
            raise ModelLoadError(
                f"model {ref_str!r} is a local folder: a revision ({revision!r}) cannot apply"
            )
        path = local
    elif _looks_like_path(ref_str) or local.exists():
        what = "is a file, not a model folder" if local.exists() else "does not exist"
        raise ModelLoadError(f"model folder {ref_str!r} {what}. {_folder_hint(ref_str)}Check the path.")
    else:
        path, commit = _download(ref_str, revision)
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"model {ref_str!r} has no config.json in {path}: it is not a Hugging Face model folder"
        )
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"model {ref_str!r}: config.json cannot be read ({err})") from err
    if getattr(config, "model_type", None) != "vit":
        raise IncompatibleModelError(
            f"model {ref_str!r} is a {getattr(config, 'model_type', '?')!r} model; hf_vitmerge merges ViT models "
            "(ViTForImageClassification / ViTModel, model_type 'vit')."
        )
    archs = getattr(config, "architectures", None) or ["ViTForImageClassification"]
    with_classifier = "ViTModel" not in archs
    source = ModelSource(ref=ref_str, path=path, revision=revision, commit=commit, name=name, config=config)
    # a bare ViTModel backbone may carry a pooler (ViTModel's default); its checkpoint says so
    has_pooler = not with_classifier and any(
        k.startswith("pooler.") for f in _weight_files(path, ref_str) for k in _file_keys(f, ref_str)
    )
    source.adapter = ViTAdapter.from_config(config, with_classifier=with_classifier, has_pooler=has_pooler)
    _validate_weights(source, check_finite)
    return source


def _validate_weights(source: ModelSource, check_finite: bool = True) -> None:
    adapter = source.adapter
    reader = TensorReader(source)
    if check_finite:
        _check_finite(source, reader)
    missing = [k for k in adapter.keys if k not in reader]
    if missing:
        raise ModelLoadError(
            f"model {source.ref!r}: weights are missing {len(missing)} tensors required by its config "
            f"(e.g. {missing[:3]}). The checkpoint is incomplete or belongs to another architecture."
        )
    for key in (
        adapter.key("patch", "weight"),
        adapter.classifier_keys[0] if adapter.classifier_keys else None,
    ):
        if key is None:
            continue
        shape = tuple(reader.get(key).shape)
        if shape != adapter.info(key).shape:
            raise ModelLoadError(
                f"model {source.ref!r}: tensor {key} has shape {shape}, but its config implies "
                f"{adapter.info(key).shape}. The checkpoint does not match config.json."
            )


_FINITE_CHECKED: set[tuple] = set()  # weight files (path, size, mtime) already found finite


def _check_finite(source: ModelSource, reader: TensorReader) -> None:
    """Refuse NaN or infinite weights (they would spread silently into every merged tensor)."""
    files = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in source.weight_files()]
    if all(f in _FINITE_CHECKED for f in files):
        return
    try:
        for key in list(reader._where):
            reader.get_finite(key)
    finally:
        reader.close()
    _FINITE_CHECKED.update(files)


def require_finite(source: ModelSource, file_key: str, tensor: torch.Tensor) -> None:
    """Raise :class:`ModelLoadError` naming the model and tensor if ``tensor`` holds NaN or infinity.

    One reduction decides: the sum of a tensor with a NaN or an infinity is not finite (the
    exact count is only taken then, for the message; a sum that overflowed on finite values
    passes)."""
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum())):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise ModelLoadError(
            f"model {source.ref!r}: tensor {file_key!r} holds {bad} NaN or infinite "
            f"value(s) out of {tensor.numel()}. Merging it would spread them into the merged model; "
            "use a checkpoint whose weights are all finite (was it saved after a diverged training run?)."
        )


def weights_sha256(source: ModelSource) -> dict[str, str]:
    """``{file name: sha256}`` of a model's weight files (what the model card records for local inputs)."""
    import hashlib

    out = {}
    for file in source.weight_files():
        digest = hashlib.sha256()
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(2**22), b""):
                digest.update(chunk)
        out[file.name] = digest.hexdigest()
    return out


def _folder_hint(ref: str) -> str:
    """For a path that is not there: what its parent folder does hold (catches typos like models/taks0)."""
    import difflib

    path = Path(ref).expanduser()
    parent = path.parent if str(path.parent) not in ("", ".") else Path(".")
    if not parent.is_dir():
        return ""
    names = sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
    close = difflib.get_close_matches(path.name, names, n=3)
    if close:
        return f"Did you mean {', '.join(repr(str(parent / c)) for c in close)}? "
    if parent != Path("."):
        return f"Folder {str(parent)!r} exists but holds no {path.name!r}. "
    return ""


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _looks_like_path(ref: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else that is not a folder is a bad path."""
    return not _HUB_ID.match(ref)


def _download(repo_id: str, revision: str | None) -> tuple[Path, str]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=WEIGHT_PATTERNS)
    except RepositoryNotFoundError as err:
        raise ModelLoadError(
            f"model {repo_id!r} is neither a local folder nor a Hub repository you can access. "
            f"{_folder_hint(repo_id)}Check the path or id, or log in with `hf auth login` for private repos."
        ) from err
    except LocalEntryNotFoundError as err:
        raise ModelLoadError(
            f"model {repo_id!r} is not a folder here, and as a Hub id (revision {revision or 'main'}) it is "
            f"not in the local Hugging Face cache and the Hub cannot be reached (offline?). {_folder_hint(repo_id)}"
            "Pass an existing local folder, or download the Hub model once with network access."
        ) from err
    except (HfHubHTTPError, ValueError, OSError) as err:
        raise ModelLoadError(
            f"model {repo_id!r} (revision {revision or 'main'}) could not be fetched: {err}"
        ) from err
    path = Path(folder)
    return path, path.name  # snapshot folders are named by commit SHA


def load_models(
    models: Sequence[str | os.PathLike],
    revisions: Sequence[str | None] | dict | str | None = None,
    *,
    names: Sequence[str | None] | None = None,
    load_weights: bool = True,
) -> list[ModelSource]:
    """Resolve and validate several ViTs for merging.

    ``revisions`` is one revision for all, a list parallel to ``models``, or a dict by model.
    Raises ``IncompatibleModelError`` naming the models and fields when architectures differ.
    With ``load_weights`` each source's model is loaded (``source.load_model()``).
    """
    refs = [str(m) for m in models]
    if isinstance(models, (str, os.PathLike)):
        raise InputError(
            f"models must be a list of model ids or folders, got the single string {str(models)!r}"
        )
    if not refs:
        raise InputError("no models given: pass at least one model id or folder")
    if isinstance(revisions, dict):
        revs = [revisions.get(r) for r in refs]
    elif isinstance(revisions, (list, tuple)):
        if len(revisions) != len(refs):
            raise InputError(f"got {len(revisions)} revisions for {len(refs)} models: give one per model")
        revs = list(revisions)
    else:
        revs = [revisions] * len(refs)
    names = list(names) if names is not None else [None] * len(refs)
    sources = [resolve_model(r, rev, n) for r, rev, n in zip(refs, revs, names, strict=True)]
    check_compatible({s.ref: s.adapter for s in sources})
    if load_weights:
        for s in sources:
            s.load_model()
    return sources
