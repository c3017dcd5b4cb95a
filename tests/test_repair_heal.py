"""REPAIR (per-feature statistics restored after an alignment merge) and heal (distillation of the
inputs' ensemble into the merged model), on tiny random ViTs."""

from __future__ import annotations

import pytest
import torch
from conftest import make_dataset, make_vit

import hf_vitmerge.repair as repair_mod
from hf_vitmerge import merge
from hf_vitmerge.api import parse_methods, suite_config
from hf_vitmerge.arch import ViTAdapter
from hf_vitmerge.merging import execute, prepare


@pytest.fixture(scope="module")
def different_pair(tmp_path_factory):
    """Two differently initialised tiny ViTs with their own labels, and calibration images."""
    root = tmp_path_factory.mktemp("repair")
    make_vit(root / "a", labels=("a", "b", "c"), seed=0, initializer_range=0.3)
    make_vit(root / "b", labels=("d", "e", "f"), seed=1, initializer_range=0.3)
    make_dataset(root / "da", 3, n=40, seed=0)
    make_dataset(root / "db", 3, n=40, seed=1)
    return [str(root / "a"), str(root / "b")], [str(root / "da"), str(root / "db")]


def _merged_statistics(model, ctx, layers, blocks):
    batches = repair_mod.pixel_batches(ctx, ctx.sources[0].image_processor(), 32, "cpu")
    modules = {
        (r, i): repair_mod.block_module(b, r)
        for i, b in zip(layers, blocks, strict=True)
        for r in repair_mod.ROLES
    }
    return repair_mod._measure(lambda px: model(pixel_values=px), batches, modules, False)


@pytest.mark.parametrize("params", [{"beta": 0.5}, {"beta": 0.5, "stop_block": 1}])
def test_repair_restores_per_feature_mean_and_std(different_pair, monkeypatch, params):
    models, data = different_pair
    captured = {}
    original = repair_mod.repair_targets

    def spy(*args, **kwargs):
        captured["targets"] = original(*args, **kwargs)
        return captured["targets"]

    original_repair = repair_mod.repair_model

    def spy_ctx(ctx, *args, **kwargs):
        captured["ctx"] = ctx
        return original_repair(ctx, *args, **kwargs)

    monkeypatch.setattr(repair_mod, "repair_targets", spy)
    monkeypatch.setattr(repair_mod, "repair_model", spy_ctx)
    repaired = merge(models, "zipit", data=data, quiet=True, **params)
    plain = merge(models, "zipit", data=data, quiet=True, repair=False, **params)
    ctx = captured["ctx"]
    targets = captured["targets"]
    assert repaired.merge_info["repair"] is True and "repair" not in plain.merge_info
    if "stop_block" in params:
        layers, blocks = [0], lambda m: list(m.trunk.layers)
    else:
        layers = [0, 1]

        def blocks(m):
            adapter = ViTAdapter.from_model(m)
            return [adapter.block(m, i) for i in layers]

    assert set(targets) == {(r, i) for i in layers for r in repair_mod.ROLES}
    after = _merged_statistics(repaired, ctx, layers, blocks(repaired))
    before = _merged_statistics(plain, ctx, layers, blocks(plain))
    worst_before = 0.0
    for key, (t_mu, t_sd) in targets.items():
        mu, sd = after[key]
        scale = float(t_sd.abs().max()) + float(t_mu.abs().max())
        assert (mu - t_mu).abs().max() <= 1e-4 * scale, key
        assert (sd - t_sd).abs().max() <= 1e-4 * scale, key
        worst_before = max(worst_before, float((before[key][1] - t_sd).abs().max()) / scale)
    assert worst_before > 1e-2  # the unrepaired merge really was off


@torch.no_grad()
@pytest.mark.parametrize("method", ["permute", "zipit", "mudsc"])
def test_repair_leaves_an_exact_self_merge_unchanged(tmp_path, method):
    from test_alignment import _permuted_copy, _pixels, _randomise_norms
    from transformers import ViTImageProcessor

    model = _randomise_norms(make_vit(seed=0, initializer_range=0.3))
    model.save_pretrained(tmp_path / "a")
    _permuted_copy(model, seed=2).save_pretrained(tmp_path / "b")
    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    for name in ("a", "b"):
        processor.save_pretrained(tmp_path / name)
    make_dataset(tmp_path / "data", 3, n=40, seed=0)
    data = str(tmp_path / "data")
    params = (
        {"beta": 0.0}
        if method == "zipit"
        else ({"lam": 0.0, "solver": "hungarian"} if method == "mudsc" else {})
    )
    merged = merge(
        [str(tmp_path / "a"), str(tmp_path / "b")], method, data=[data, data], quiet=True, **params
    )
    assert merged.merge_info["repair"] is True
    assert (
        abs(merged.merge_info["repair_scale_min"] - 1) < 1e-3
        and abs(merged.merge_info["repair_scale_max"] - 1) < 1e-3
    )
    x = _pixels(8, seed=4)
    assert (merged(x).logits - model(x).logits).abs().max() <= 1e-4


def test_bench_spec_with_heal_becomes_the_config_heal_section(micro_suite):
    ((name, params),) = parse_methods("zipit[stop_block=1;heal={steps: 300, lr: 1.0e-3}]")
    assert name == "zipit" and params == {"stop_block": 1, "heal": {"steps": 300, "lr": 1e-3}}
    config = suite_config(micro_suite, name, params)
    assert config.heal.steps == 300 and config.heal.lr == 1e-3 and config.heal.samples_per_task == 512
    assert "heal" not in config.parameters
    assert suite_config(micro_suite, "average", {"heal": True}).heal.steps == 300
    assert suite_config(micro_suite, "average", {}).heal is None


@pytest.mark.slow
def test_heal_reduces_the_distillation_loss_and_never_reads_a_test_split(micro_suite, monkeypatch):
    import hf_vitmerge.data as data_mod
    import hf_vitmerge.methods.base as base_mod

    loaded = []
    real = data_mod.load_task_data

    def recording(path, split=None, **kwargs):
        loaded.append((str(path), split))
        return real(path, split, **kwargs)

    monkeypatch.setattr(data_mod, "load_task_data", recording)
    monkeypatch.setattr(base_mod, "load_task_data", recording)
    config = suite_config(
        micro_suite, "average", {"heal": {"steps": 15, "lr": 1e-3, "samples_per_task": 16, "batch_size": 8}}
    )
    ctx = prepare(config, quiet=True)
    model, info = execute(ctx)
    assert info["heal_steps"] == 15 and info["heal_images"] == 3 * 16
    assert info["heal_loss_after"] < info["heal_loss_before"]
    assert "involved training" in info["training_note"]
    assert loaded and all("/test" not in path and split != "test" for path, split in loaded)
    assert type(model).__name__ == "ViTForImageClassification"


@torch.no_grad()
def test_partial_zip_logits_follow_the_one_joint_rule(different_pair):
    from hf_vitmerge.evaluation import joint_predictions

    models, data = different_pair
    merged = merge(models, "zipit", data=data, quiet=True, stop_block=1)
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = merged(x)
    blocks = [out.logits[:, :3], out.logits[:, 3:]]
    rule = joint_predictions([torch.as_tensor(t) for t in out.task_logits])
    assert torch.equal(joint_predictions(blocks), rule) and torch.equal(out.logits.argmax(-1), rule)
    torch.testing.assert_close(torch.cat([torch.log_softmax(b, -1) for b in blocks], -1), out.logits)
