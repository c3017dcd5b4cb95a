"""Inputs saved as pytorch_model.bin, as sharded safetensors and as sharded .bin merge exactly
like the same weights in one model.safetensors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_vit
from safetensors.torch import load_file, save_file

import hf_vitmerge as hv
from hf_vitmerge.loading import ModelLoadError, resolve_model

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def to_bin(folder) -> None:
    tensors = load_file(folder / "model.safetensors")
    torch.save(tensors, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def to_shards(folder, fmt: str) -> None:
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    keys = sorted(tensors)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    prefix, suffix = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    weight_map = {}
    for i, part in enumerate(halves, start=1):
        name = f"{prefix}-{i:05d}-of-00002.{suffix}"
        shard = {k: tensors[k].contiguous() for k in part}
        if fmt == "safetensors":
            save_file(shard, folder / name, metadata={"format": "pt"})
        else:
            torch.save(shard, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())}}
    (folder / f"{prefix}.{suffix}.index.json").write_text(json.dumps({**index, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    base = make_vit(root / "base", seed=0)
    for i, name in enumerate(("a", "b", "c")):
        make_vit(root / name, seed=1 + i, base=base)
        shutil.copytree(root / name, root / f"{name}-alt")
    to_bin(root / "a-alt")
    to_shards(root / "b-alt", "safetensors")
    to_shards(root / "c-alt", "bin")
    return root


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_each_format_loads_to_the_same_model(formats, name):
    original = resolve_model(formats / name).load_model()
    source = resolve_model(formats / f"{name}-alt")
    assert [f.suffix for f in source.weight_files()] == (
        [".bin"] if name == "a" else [".safetensors"] * 2 if name == "b" else [".bin"] * 2
    )
    with torch.no_grad():
        torch.testing.assert_close(source.load_model()(X).logits, original(X).logits)


@pytest.mark.parametrize("method", ["average", "task_arithmetic"])
def test_merges_match_the_safetensors_originals(formats, method):
    kwargs = {"base_model": str(formats / "base")} if method == "task_arithmetic" else {}
    want = hv.merge([str(formats / n) for n in "abc"], method, quiet=True, **kwargs)
    got = hv.merge([str(formats / f"{n}-alt") for n in "abc"], method, quiet=True, **kwargs)
    with torch.no_grad():
        torch.testing.assert_close(got(X).logits, want(X).logits)


def test_missing_shard_and_nan_in_a_bin_are_named(formats, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(formats / "b-alt", folder)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors"):
        resolve_model(folder)
    nan = tmp_path / "nan-bin"
    shutil.copytree(formats / "a-alt", nan)
    tensors = torch.load(nan / "pytorch_model.bin", weights_only=True)
    key = next(k for k in tensors if k.endswith("intermediate.dense.weight"))
    tensors[key][0, 0] = float("inf")
    torch.save(tensors, nan / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=rf"{nan}.*{key}.*infinite"):
        resolve_model(nan)
