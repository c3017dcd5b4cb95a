"""Activation statistics: FeatureStats maths, hook semantics, joint stats, cache, data parallel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_dataset, make_vit

from hf_vitmerge.arch import ViTAdapter
from hf_vitmerge.data import load_task_data
from hf_vitmerge.stats import (
    FeatureStats,
    collect_joint_stats,
    collect_model_stats,
    load_stats,
    statistics_points,
)

ALL_KINDS = ("residual", "residual_tokens", "qk", "vo", "mlp", "attn_in", "fc1_in")
WORKER = Path(__file__).with_name("dist_stats_worker.py")


def _stats_of(x: torch.Tensor) -> FeatureStats:
    st = FeatureStats.zeros(x.shape[1])
    st.update(x)
    return st


def _processor():
    from transformers import ViTImageProcessor

    return ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats")
    make_dataset(root / "a", 3, n=10, seed=0)
    make_dataset(root / "b", 2, n=7, seed=1)
    models = [make_vit(root / f"m{i}", seed=i) for i in range(3)]
    data = [load_task_data(root / "a"), load_task_data(root / "b")]
    return root, models, data


# ------------------------------------------------------------------------------------ FeatureStats
def test_feature_stats_moments_match_torch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5, 3.0]) + 1.5
    st = FeatureStats.zeros(4)
    st.update(x[:20].float())
    st.update(x[20:].float())
    xf = x.float().double()
    assert st.count == 50
    # the per-batch products are float32 (added to float64 totals): ~1e-7 relative error
    close = dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(st.mean(), xf.mean(0))
    torch.testing.assert_close(st.covariance(), torch.cov(xf.T, correction=0), **close)
    torch.testing.assert_close(st.correlation(), torch.corrcoef(xf.T), **close)
    torch.testing.assert_close(st.gram(), xf.T @ xf / 50, **close)
    torch.testing.assert_close(st.gram(normalize=False), xf.T @ xf, **close)
    assert st.outer.dtype == torch.float64


def test_correlation_masks_zero_variance_features():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    x[:, 1] = 2.0  # constant feature
    st = _stats_of(x)
    corr = st.correlation()
    assert st.valid().tolist() == [True, False, True]
    assert corr[1].tolist() == [0.0, 1.0, 0.0] and corr[:, 1].tolist() == [0.0, 1.0, 0.0]
    assert torch.isfinite(corr).all()
    torch.testing.assert_close(corr[[0, 2]][:, [0, 2]], torch.corrcoef(x[:, [0, 2]].T))


def test_add_and_block():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, 6, generator=g, dtype=torch.float64)
    both = _stats_of(x[:5]) + _stats_of(x[5:])
    whole = _stats_of(x)
    assert both.count == 12
    torch.testing.assert_close(both.outer, whole.outer)
    torch.testing.assert_close(both.sum, whole.sum)
    second = whole.block(1, 2)
    torch.testing.assert_close(second.outer, _stats_of(x[:, 3:]).outer)
    with pytest.raises(ValueError):
        _stats_of(x) + _stats_of(x[:, :2])
    with pytest.raises(ValueError, match="no samples"):
        FeatureStats.zeros(2).mean()


# ------------------------------------------------------------------------------------ hook semantics
def _manual_features(model, pixels) -> dict[str, torch.Tensor]:
    """Every point computed by hand from the block input (no hooks), as [n, d] rows."""
    adapter = ViTAdapter.from_model(model)
    mod = lambda role, i=None: adapter.module(model, role, i)  # noqa: E731
    s = adapter.spec
    heads, hd = s.num_heads, s.hidden_size // s.num_heads
    out = {}
    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states
        for i in range(s.num_layers):
            x = hidden[i]
            a = mod("ln1", i)(x)
            q, k, v = mod("q", i)(a), mod("k", i)(a), mod("v", i)(a)
            split = lambda t: t.view(t.shape[0], t.shape[1], heads, hd).transpose(1, 2)  # noqa: E731
            att = torch.softmax(split(q) @ split(k).transpose(-1, -2) / hd**0.5, dim=-1) @ split(v)
            vo = att.transpose(1, 2).reshape(x.shape)
            h = mod("o", i)(vo) + x
            f_in = mod("ln2", i)(h)
            mlp = torch.nn.functional.gelu(mod("fc1", i)(f_in))
            flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
            out[f"qk.{i}"] = torch.cat([flat(q), flat(k)])
            out[f"vo.{i}"] = flat(vo)
            out[f"attn_in.{i}"] = flat(a)
            out[f"fc1_in.{i}"] = flat(f_in)
            out[f"mlp.{i}"] = flat(mlp)
            if i + 1 < s.num_layers:
                torch.testing.assert_close(mod("fc2", i)(mlp) + h, hidden[i + 1], atol=1e-5, rtol=1e-4)
        final = mod("final_ln")(hidden[-1])
        out["residual"] = final[:, 0]
        out["residual_tokens"] = flat(final)
    return out


def test_points_match_manual_computation(setup):
    _, models, data = setup
    proc = _processor()
    adapter = ViTAdapter.from_model(models[0])
    points = statistics_points(adapter, ALL_KINDS)
    assert points[:2] == ["residual", "residual_tokens"] and "mlp.1" in points
    stats = collect_model_stats(models[0], data[0], proc, points, batch_size=4, quiet=True)
    images = [im.convert("RGB") for im in data[0].dataset["image"]]
    manual = _manual_features(models[0], proc(images=images, return_tensors="pt")["pixel_values"])
    tokens = adapter.spec.num_patches + 1
    for point in points:
        ref = _stats_of(manual[point])
        assert stats[point].count == ref.count, point
        torch.testing.assert_close(stats[point].sum, ref.sum, rtol=1e-4, atol=1e-4, msg=point)
        torch.testing.assert_close(stats[point].outer, ref.outer, rtol=1e-4, atol=1e-3, msg=point)
    assert stats["residual"].count == 10
    assert stats["qk.0"].count == 2 * 10 * tokens
    assert stats["mlp.0"].dim == adapter.spec.intermediate_size


def test_joint_stats_are_the_concatenation(setup):
    _, models, data = setup
    procs = [_processor()] * 3
    points = ["residual", "qk.1", "mlp.0"]
    joint = collect_joint_stats(models, data, procs, points, batch_size=4, quiet=True)
    assert joint["mlp.0"].dim == 3 * 64 and joint["residual"].count == 17
    for m, model in enumerate(models):
        own = [collect_model_stats(model, d, procs[m], points, batch_size=4, quiet=True) for d in data]
        for p in points:
            total = own[0][p] + own[1][p]
            block = joint[p].block(m, 3)
            # float32 per-batch products (float64 totals): equal up to float32 rounding
            scale = float(total.outer.abs().max())
            torch.testing.assert_close(block.outer, total.outer, rtol=1e-6, atol=1e-6 * scale)
            torch.testing.assert_close(
                block.sum, total.sum, rtol=1e-6, atol=1e-6 * float(total.sum.abs().max())
            )
    corr = joint["residual"].correlation()
    assert corr.shape == (96, 96) and corr[:32, 32:64].abs().max() > 0.1


@pytest.mark.parametrize("num_models", [1, 3])
def test_point_groups_do_not_change_the_statistics(setup, monkeypatch, num_models):
    """Points staged and multiplied together (one buffer per kind) or each alone, with a last batch
    smaller than the others: the same statistics (exact float64 products)."""
    import hf_vitmerge.stats as stats_mod

    _, models, data = setup
    procs = [_processor()] * num_models
    points = statistics_points(ViTAdapter.from_model(models[0]), ALL_KINDS)
    monkeypatch.setattr(stats_mod, "PRODUCT_DTYPE", torch.float64)
    runs = []
    for group_bytes in (1 << 30, 1):  # one group per kind / every point alone
        monkeypatch.setattr(stats_mod, "GROUP_BYTES", group_bytes)
        runs.append(collect_joint_stats(models[:num_models], data, procs, points, batch_size=4, quiet=True))
    tokens = ViTAdapter.from_model(models[0]).spec.num_patches + 1
    for p in points:
        rows = 1 if p == "residual" else tokens * (2 if p.startswith("qk.") else 1)
        assert runs[0][p].count == runs[1][p].count == 17 * rows, p
        torch.testing.assert_close(runs[0][p].sum, runs[1][p].sum, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(runs[0][p].outer, runs[1][p].outer, rtol=1e-12, atol=1e-10)
        assert torch.equal(runs[1][p].outer, runs[1][p].outer.T)


def test_joint_cross_blocks_are_the_cross_model_products(setup):
    """Block ``(i, j)`` of the joint outer product is ``F_i^T F_j`` of the features computed by hand,
    for every pair of the three models (upper blocks come from mirroring the lower ones)."""
    _, models, data = setup
    proc = _processor()
    points = ["residual", "qk.1", "vo.0", "mlp.1"]
    joint = collect_joint_stats(models, data[:1], [proc] * 3, points, batch_size=4, quiet=True)
    images = [im.convert("RGB") for im in data[0].dataset["image"]]
    pixels = proc(images=images, return_tensors="pt")["pixel_values"]
    feats = [_manual_features(m, pixels) for m in models]
    for p in points:
        d = joint[p].dim // 3
        for i in range(3):
            torch.testing.assert_close(
                joint[p].sum[i * d : (i + 1) * d], feats[i][p].double().sum(0), rtol=1e-4, atol=1e-4, msg=p
            )
            for j in range(3):
                ref = feats[i][p].double().T @ feats[j][p].double()
                got = joint[p].outer[i * d : (i + 1) * d, j * d : (j + 1) * d]
                scale = float(ref.abs().max())
                torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * scale, msg=f"{p} ({i}, {j})")


def test_each_model_uses_its_own_processor(setup):
    _, models, data = setup
    from transformers import ViTImageProcessor

    other = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.2] * 3, image_std=[0.3] * 3)
    joint = collect_joint_stats(models[:2], data[:1], [_processor(), other], ["residual"], quiet=True)
    own = collect_model_stats(models[1], data[0], other, ["residual"], quiet=True)
    torch.testing.assert_close(joint["residual"].block(1, 2).outer, own["residual"].outer)
    plain = collect_model_stats(models[1], data[0], _processor(), ["residual"], quiet=True)
    assert not torch.allclose(plain["residual"].outer, own["residual"].outer)


def test_mixed_precision_runs_and_stays_float64(setup):
    _, models, data = setup
    ref = collect_model_stats(models[0], data[0], _processor(), ["mlp.1"], quiet=True)
    bf = collect_model_stats(models[0], data[0], _processor(), ["mlp.1"], mixed_precision="bf16", quiet=True)
    assert bf["mlp.1"].outer.dtype == torch.float64
    rel = (bf["mlp.1"].outer - ref["mlp.1"].outer).norm() / ref["mlp.1"].outer.norm()
    assert 0 < rel < 0.05


def test_bad_input_errors(setup):
    _, models, data = setup
    with pytest.raises(ValueError, match="unknown statistics point"):
        collect_model_stats(models[0], data[0], _processor(), ["mlp"], quiet=True)
    with pytest.raises(ValueError, match="only 2 blocks"):
        collect_model_stats(models[0], data[0], _processor(), ["vo.2"], quiet=True)
    with pytest.raises(ValueError, match="processors"):
        collect_joint_stats(models[:2], data, [_processor()], ["residual"], quiet=True)
    with pytest.raises(ValueError, match="point kind"):
        statistics_points(ViTAdapter.from_model(models[0]), ("residual", "attn"))


# ------------------------------------------------------------------------------------ products thread
@pytest.mark.parametrize("pending_bytes", [256 << 20, 1])
def test_background_products_equal_inline_bit_for_bit(setup, monkeypatch, pending_bytes):
    """CPU products on the worker thread: the same operations in the same order as inline, so
    the statistics are identical (the models run single-threaded in both: the worker leaves them
    one core of two); with a 1-byte backlog every batch waits for the worker. The caller's torch
    thread count survives the worker's own single-thread setting."""
    import hf_vitmerge.stats as stats_mod
    from hf_vitmerge.threads import intra_op_threads

    _, models, data = setup
    procs = [_processor()] * 2
    points = statistics_points(ViTAdapter.from_model(models[0]), ("residual", "qk", "vo", "mlp", "fc1_in"))
    monkeypatch.setattr(stats_mod, "usable_cores", lambda: 2)
    runs = {}
    for worker, threads in (("1", 1), ("0", 1), ("1", 2)):
        monkeypatch.setenv("HF_VITMERGE_STATS_WORKER", worker)
        monkeypatch.setattr(stats_mod, "PENDING_BYTES", pending_bytes)
        with intra_op_threads(threads):
            runs[worker, threads] = (
                collect_joint_stats(models[:2], data, procs, points, batch_size=4, quiet=True),
                collect_model_stats(models[0], data[0], procs[0], points, batch_size=4, quiet=True),
            )
            assert torch.get_num_threads() == threads
    for runs_2t, runs_1t in zip(runs["1", 2], runs["1", 1], strict=True):  # the models ran on 1 thread
        for p in points:
            assert torch.equal(runs_2t[p].outer, runs_1t[p].outer), p
    for with_worker, inline in zip(runs["1", 1], runs["0", 1], strict=True):
        for p in points:
            assert with_worker[p].count == inline[p].count > 0
            assert torch.equal(with_worker[p].sum, inline[p].sum), p
            assert torch.equal(with_worker[p].outer, inline[p].outer), p


def test_background_products_error_reaches_the_caller(setup, monkeypatch):
    """An error on the worker thread is raised by the collection; hooks are removed and the
    thread count restored, so the models work as before."""
    import hf_vitmerge.stats as stats_mod

    _, models, data = setup
    monkeypatch.setenv("HF_VITMERGE_STATS_WORKER", "1")
    threads = torch.get_num_threads()

    def hooks() -> int:
        return sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in models[0].modules())

    before = hooks()

    def broken(*_args, **_kwargs):
        raise FloatingPointError("product failed")

    with monkeypatch.context() as m:
        m.setattr(stats_mod, "_accumulate_batched_product", broken)
        with pytest.raises(FloatingPointError, match="product failed"):
            collect_model_stats(models[0], data[0], _processor(), ["mlp.0"], batch_size=4, quiet=True)
    assert torch.get_num_threads() == threads
    assert hooks() == before
    again = collect_model_stats(models[0], data[0], _processor(), ["mlp.0"], batch_size=4, quiet=True)
    assert again["mlp.0"].count == 10 * (ViTAdapter.from_model(models[0]).spec.num_patches + 1)


def test_worker_policy(monkeypatch):
    import hf_vitmerge.stats as stats_mod

    monkeypatch.delenv("HF_VITMERGE_STATS_WORKER", raising=False)
    monkeypatch.setattr(stats_mod, "usable_cores", lambda: 2)
    assert stats_mod._stats_worker_enabled("cpu") and not stats_mod._stats_worker_enabled("cpu", processes=2)
    assert not stats_mod._stats_worker_enabled("cuda")
    monkeypatch.setattr(stats_mod, "usable_cores", lambda: 1)
    assert not stats_mod._stats_worker_enabled("cpu")
    monkeypatch.setenv("HF_VITMERGE_STATS_WORKER", "1")
    assert stats_mod._stats_worker_enabled("cpu")
    monkeypatch.setenv("HF_VITMERGE_STATS_WORKER", "off")
    monkeypatch.setattr(stats_mod, "usable_cores", lambda: 8)
    assert not stats_mod._stats_worker_enabled("cpu")


# ------------------------------------------------------------------------------------ cache
def test_cache_skips_forward_passes(setup, tmp_path):
    _, models, data = setup
    calls = []
    handles = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in models[:2]]
    procs = [_processor()] * 2
    kw = dict(batch_size=4, cache_dir=tmp_path, cache_key="two-models", quiet=True)
    try:
        first = collect_joint_stats(models[:2], data, procs, ["residual", "vo.0"], **kw)
        n_first = len(calls)
        second = collect_joint_stats(models[:2], data, procs, ["residual", "vo.0"], **{**kw, "batch_size": 7})
        assert n_first > 0 and len(calls) == n_first
        for p in first:
            assert second[p].count == first[p].count
            assert torch.equal(second[p].outer, first[p].outer) and torch.equal(second[p].sum, first[p].sum)
        files = list(tmp_path.glob("*.safetensors"))
        assert len(files) == 1 and load_stats(files[0])["vo.0"].outer.dtype == torch.float64
        # other points, other data or another key miss the cache
        collect_joint_stats(models[:2], data, procs, ["residual"], **kw)
        collect_joint_stats(models[:2], data[:1], procs, ["residual", "vo.0"], **kw)
        collect_joint_stats(models[:2], data, procs, ["residual", "vo.0"], **{**kw, "cache_key": "other"})
        assert len(list(tmp_path.glob("*.safetensors"))) == 4
        # without a key, the models' weights are hashed: changing a weight misses the cache
        collect_model_stats(models[0], data[0], procs[0], ["residual"], cache_dir=tmp_path / "h", quiet=True)
        n = len(calls)
        collect_model_stats(models[0], data[0], procs[0], ["residual"], cache_dir=tmp_path / "h", quiet=True)
        assert len(calls) == n
        other = make_vit(seed=5)
        collect_model_stats(other, data[0], procs[0], ["residual"], cache_dir=tmp_path / "h", quiet=True)
        assert len(list((tmp_path / "h").glob("*.safetensors"))) == 2
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------ data parallel
def _launch(root: Path, out: Path, extra: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    cmd += [str(WORKER), str(out), str(root / "a"), str(root / "m0"), str(root / "m1"), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize(
    "launcher", ["torch.distributed", pytest.param("accelerate", marks=pytest.mark.slow)]
)
@pytest.mark.dist
def test_two_processes_match_one(setup, tmp_path, launcher):
    root, _, _ = setup
    from transformers import AutoImageProcessor, ViTForImageClassification

    _launch(root, tmp_path, ["--accelerate"] if launcher == "accelerate" else [])
    ranks = [load_stats(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    models = [ViTForImageClassification.from_pretrained(root / f"m{i}").eval() for i in range(2)]
    procs = [AutoImageProcessor.from_pretrained(root / f"m{i}") for i in range(2)]
    points = statistics_points(ViTAdapter.from_model(models[0]), ("residual", "qk", "vo", "mlp"))
    # the workers run one thread each; so does the reference, so that the float32 forward passes are
    # bitwise the same, and so are the per-batch float32 products; what differs is the order in which
    # the float64 totals add the batches (each process its own share, then the all-reduce), <= 1e-6
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = [load_task_data(root / "a")]
        single = collect_joint_stats(models, data, procs, points, batch_size=4, quiet=True)
    finally:
        torch.set_num_threads(threads)
    assert list(ranks[0]) == points
    for p in points:
        for rank in ranks:
            assert rank[p].count == single[p].count
            for got, ref in ((rank[p].sum, single[p].sum), (rank[p].outer, single[p].outer)):
                assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-6, p
        assert torch.equal(ranks[0][p].outer, ranks[1][p].outer) and torch.equal(
            ranks[0][p].sum, ranks[1][p].sum
        )


# ------------------------------------------------------------------------------------ float32 products
def _rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


@pytest.mark.parametrize("rows", [300, 20_000])
def test_float32_products_stay_within_1e6_of_float64(rows, monkeypatch):
    """Per-batch float32 products added to float64 totals: Gram relative error <= 1e-6, and the
    ``PRODUCT_DTYPE = float64`` reference path is the exact float64 product."""
    import hf_vitmerge.stats as stats_mod

    g = torch.Generator().manual_seed(3)
    # post-GELU-like features: skewed, non-zero mean, features of different scales
    x = torch.nn.functional.gelu(torch.randn(rows, 96, generator=g) * torch.linspace(0.1, 4.0, 96) + 0.5)
    exact = x.double().T @ x.double()
    monkeypatch.setattr(stats_mod, "PRODUCT_ROWS", 4096)  # 20k rows: several float32 chunks
    fast = FeatureStats.zeros(96)
    for chunk in x.split(rows // 3 + 1):
        fast.update(chunk)
    one_call = torch.zeros(96, 96, dtype=torch.float64)
    stats_mod.accumulate_outer_(one_call, x, scratch={})
    for got in (fast.outer, one_call):
        err = _rel_error(got, exact)
        assert 0 < err <= 1e-6, err  # not exact (float32 products), but within the bound
    monkeypatch.setattr(stats_mod, "PRODUCT_DTYPE", torch.float64)
    ref = FeatureStats.zeros(96)
    ref.update(x)
    assert _rel_error(ref.outer, exact) < 1e-13


def test_collected_grams_within_1e6_of_float64_path(setup, monkeypatch):
    import hf_vitmerge.stats as stats_mod

    _, models, data = setup
    procs = [_processor()] * 2
    points = statistics_points(ViTAdapter.from_model(models[0]), ("residual", "qk", "vo", "mlp", "fc1_in"))
    fast_joint = collect_joint_stats(models[:2], data, procs, points, batch_size=4, quiet=True)
    fast_one = collect_model_stats(models[0], data[0], procs[0], points, batch_size=4, quiet=True)
    monkeypatch.setattr(stats_mod, "PRODUCT_DTYPE", torch.float64)
    ref_joint = collect_joint_stats(models[:2], data, procs, points, batch_size=4, quiet=True)
    ref_one = collect_model_stats(models[0], data[0], procs[0], points, batch_size=4, quiet=True)
    for fast, ref in ((fast_joint, ref_joint), (fast_one, ref_one)):
        for p in points:
            assert fast[p].count == ref[p].count
            assert _rel_error(fast[p].gram(), ref[p].gram()) <= 1e-6, p
            # the per-batch sums are float32, like the products; the totals float64
            scale = float(ref[p].sum.abs().max())
            torch.testing.assert_close(fast[p].sum, ref[p].sum, rtol=1e-6, atol=1e-6 * scale)
            assert torch.equal(fast[p].outer, fast[p].outer.T)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_statistics_match_cpu_and_float64(setup, monkeypatch):
    """On CUDA the same scheme holds (float32 products without TF32, float64 totals): within 1e-6
    of the float64 path, and of the CPU statistics."""
    import hf_vitmerge.stats as stats_mod

    _, models, data = setup
    procs = [_processor()] * 2
    points = statistics_points(ViTAdapter.from_model(models[0]), ("residual", "qk", "vo", "mlp"))
    cpu = collect_joint_stats(models[:2], data, procs, points, batch_size=4, quiet=True)
    try:
        gpu = collect_joint_stats(models[:2], data, procs, points, batch_size=4, device="cuda", quiet=True)
        monkeypatch.setattr(stats_mod, "PRODUCT_DTYPE", torch.float64)
        ref = collect_joint_stats(models[:2], data, procs, points, batch_size=4, device="cuda", quiet=True)
    finally:
        for m in models:  # the fixture's models serve the other tests, on CPU
            m.to("cpu")
    for p in points:
        assert gpu[p].outer.dtype == torch.float64 and gpu[p].count == cpu[p].count
        assert _rel_error(gpu[p].outer.cpu(), ref[p].outer.cpu()) <= 1e-6, p
        assert _rel_error(gpu[p].outer.cpu(), cpu[p].outer) <= 1e-6, p
        assert torch.equal(gpu[p].outer, gpu[p].outer.T)
