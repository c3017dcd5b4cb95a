"""The merge engine: registry, tensorwise streaming, heads for any label spaces, determinism."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from conftest import make_vit

from hf_vitmerge import ViTAdapter, merge
from hf_vitmerge.merging import resolve_heads, union_labels
from hf_vitmerge.methods import available_methods, get_method

X = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_registry_lists_and_rejects():
    assert {"average", "task_arithmetic"} <= set(available_methods())
    with pytest.raises(ValueError, match="unknown merge method 'nope'"):
        get_method("nope")
    spec = get_method("task_arithmetic")
    assert spec.needs_base and spec.kind == "tensorwise" and "arxiv.org" in spec.reference
    assert set(spec.defaults) == {"scaling"}


def test_average_and_task_arithmetic_hand_computed():
    avg, ta = get_method("average").fn, get_method("task_arithmetic").fn
    a, b, base = torch.tensor([1.0, 3.0]), torch.tensor([3.0, -1.0]), torch.tensor([1.0, 1.0])
    torch.testing.assert_close(avg([a, b], None), torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(avg([a, b], None, weights=[3, 1]), torch.tensor([1.5, 2.0]))
    # base + 0.5 * ((a - base) + (b - base)) = [1, 1] + 0.5 * [2, 0] = [2, 1]
    torch.testing.assert_close(ta([a, b], base, scaling=0.5), torch.tensor([2.0, 1.0]))
    with pytest.raises(ValueError, match="weights"):
        avg([a, b], None, weights=[1])


def test_averaging_identical_models_changes_nothing(tmp_path):
    model = make_vit(tmp_path / "m", seed=3)
    for copy in ("m2", "m3"):  # the same folder twice is refused: identical copies in their own folders
        shutil.copytree(tmp_path / "m", tmp_path / copy)
    merged = merge([tmp_path / "m", tmp_path / "m2", tmp_path / "m3"], "average", quiet=True)
    torch.testing.assert_close(merged(X).logits, model(X).logits)


def test_task_arithmetic_on_models(tmp_path):
    # Three models and scaling 0.4 (not 1/K): the result depends on the base, so a merge that
    # ignored it (or averaged) would fail here.
    base = make_vit(tmp_path / "base", seed=0)
    make_vit(tmp_path / "other", seed=9, base=base, noise=0.5)
    inputs = [make_vit(tmp_path / f"m{i}", seed=i, base=base) for i in (1, 2, 3)]
    paths = [tmp_path / f"m{i}" for i in (1, 2, 3)]

    def ta(base_dir):
        return merge(paths, "task_arithmetic", base_model=str(base_dir), scaling=0.4, quiet=True)

    merged = ta(tmp_path / "base")
    state = ViTAdapter.from_model(merged).state_dict(merged)
    s0 = ViTAdapter.from_model(base).state_dict(base)
    sk = [ViTAdapter.from_model(m).state_dict(m) for m in inputs]
    assert set(state) == set(s0)
    for key in state:  # every tensor, the shared classifier head included
        expected = s0[key] + 0.4 * sum(s[key] - s0[key] for s in sk)
        torch.testing.assert_close(state[key], expected, msg=key)
    key = ViTAdapter.from_model(merged).key("fc2", "weight", 1)
    avg = sum(s[key] for s in sk) / 3
    assert (state[key] - avg).abs().max() > 1e-3  # not the average
    moved = ta(tmp_path / "other")
    moved_state = ViTAdapter.from_model(moved).state_dict(moved)
    assert (moved_state[key] - state[key]).abs().max() > 1e-3  # another base, another result
    assert not torch.allclose(moved(X).logits, merged(X).logits)


def test_union_labels_keep_colliding_names_apart():
    labels = union_labels(["shape", "colour", "size"], [["circle", "red"], ["red", "blue"], ["small"]])
    assert labels == ["circle", "shape:red", "colour:red", "blue", "small"]
    assert resolve_heads("auto", [["a"], ["a"]]) == "shared"
    assert resolve_heads("auto", [["a"], ["b"]]) == "union"
    with pytest.raises(ValueError, match="heads: shared"):
        resolve_heads("shared", [["a"], ["b"]])


def _backbone_features(model, x):
    vit = model.vit
    return vit(x).last_hidden_state[:, 0]


def test_union_and_multi_heads_keep_each_task_head(tmp_path):
    base = make_vit(tmp_path / "base", labels=("x",), seed=0)
    a = make_vit(tmp_path / "a", labels=("cat", "dog"), seed=1, base=base)
    b = make_vit(tmp_path / "b", labels=("dog", "car", "bus"), seed=2, base=base)
    union = merge([tmp_path / "a", tmp_path / "b"], "average", tasks=["pets", "vehicles"], quiet=True)
    assert list(union.config.id2label.values()) == ["cat", "pets:dog", "vehicles:dog", "car", "bus"]
    feats = _backbone_features(union, X)
    torch.testing.assert_close(union(X).logits[:, :2], a.classifier(feats))
    torch.testing.assert_close(union(X).logits[:, 2:], b.classifier(feats))

    multi = merge(
        [tmp_path / "a", tmp_path / "b"], "average", tasks=["pets", "vehicles"], heads="multi", quiet=True
    )
    out = multi(X)
    assert type(multi).__name__ == "ViTMultiHeadForImageClassification"
    torch.testing.assert_close(out.task_logits[0], a.classifier(feats))
    torch.testing.assert_close(out.logits[:, :2], torch.log_softmax(a.classifier(feats), -1))
    restricted = multi(X, task=1).logits
    assert torch.isinf(restricted[:, :2]).all() and torch.isfinite(restricted[:, 2:]).all()

    multi.save_pretrained(tmp_path / "multi")
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForImageClassification as A\n"
        f"m = A.from_pretrained({str(tmp_path / 'multi')!r}, trust_remote_code=True)\n"
        "assert 'hf_vitmerge' not in sys.modules\n"
        f"x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))\n"
        "print(type(m).__name__, m(x).logits.shape[-1])\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "ViTMultiHeadForImageClassification 5" in res.stdout


def test_merge_is_deterministic_and_byte_identical(tmp_path):
    # DARE draws random masks: the same seed must give the same bytes, another seed other bytes.
    base = make_vit(tmp_path / "base", seed=0)
    for i in (1, 2):
        make_vit(tmp_path / f"m{i}", seed=i, base=base)

    def dare_bytes(seed: int, run: str) -> bytes:
        m = merge(
            [tmp_path / "m1", tmp_path / "m2"],
            "dare",
            base_model=str(tmp_path / "base"),
            drop_rate=0.5,
            seed=seed,
            quiet=True,
        )
        m.save_pretrained(tmp_path / run)
        return (tmp_path / run / "model.safetensors").read_bytes()

    first, again, other = dare_bytes(0, "a"), dare_bytes(0, "b"), dare_bytes(1, "c")
    assert first == again
    assert first != other


def test_model_weights_from_config(tmp_path):
    make_vit(tmp_path / "a", seed=1)
    make_vit(tmp_path / "b", seed=2)
    cfg = {
        "method": "average",
        "models": [
            {"model": str(tmp_path / "a"), "weight": 1.0},
            {"model": str(tmp_path / "b"), "weight": 0.0},
        ],
    }
    merged = merge(cfg, quiet=True)
    a = make_vit(seed=1)
    torch.testing.assert_close(merged(X).logits, a(X).logits)
