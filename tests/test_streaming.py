"""The streaming tensorwise engine (issue 15): positioned reads, the in-place method stack, the
fused TIES kernel and the memory benchmark's method check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_vit
from safetensors.torch import load_file

from hf_vitmerge.loading import resolve_model
from hf_vitmerge.merging import prepare
from hf_vitmerge.methods import get_method
from hf_vitmerge.methods._stack import TensorStack
from hf_vitmerge.methods.dare import drop_and_rescale
from hf_vitmerge.methods.ties import disjoint_mean, elect_sign, ties_task_vector_, trim_top_k
from hf_vitmerge.streaming import StackBuffers, StreamReader, file_order

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    base = make_vit(root / "base", seed=0)
    for i in range(3):
        make_vit(root / f"m{i}", seed=1 + i, base=base)
    return root


def _config(models, method: str) -> dict:
    """A merge of the three fixture models onto their base."""
    return {
        "method": method,
        "base_model": str(models / "base"),
        "models": [{"model": str(models / f"m{i}")} for i in range(3)],
    }


def test_reader_reads_every_tensor_exactly_in_file_order(models):
    source = resolve_model(models / "m0")
    reader = StreamReader(source)
    on_disk = load_file(str(models / "m0" / "model.safetensors"))
    keys = file_order(source.adapter.keys, reader)
    assert sorted(keys) == sorted(source.adapter.keys)
    offsets = [reader.position(k)[1] for k in keys]
    assert offsets == sorted(offsets)
    buffers = StackBuffers(1)
    for key in keys:
        stack, _ = buffers.views(reader.shape(key))
        reader.read_into(key, stack[0])
        file_key = reader._reader._where[key][1]
        assert torch.equal(stack[0], on_disk[file_key]), key
    reader.close()


def test_sink_and_dict_modes_agree_and_methods_get_a_stack(models):
    ctx = prepare(_config(models, "ties"), quiet=True)
    spec = get_method("ties")
    params = spec.validate_params({"density": 0.5})
    keys = ctx.adapter.backbone_keys
    as_dict = ctx.run_tensorwise(spec, params, keys)
    seen: dict[str, torch.Tensor] = {}
    empty = ctx.run_tensorwise(spec, params, keys, sink=lambda k, t: seen.__setitem__(k, t.clone()))
    assert empty == {} and seen.keys() == as_dict.keys()
    for k in keys:
        assert torch.equal(seen[k], as_dict[k]), k
    # a method returning a view of the engine's buffer still gets its own tensor in dict mode
    first = get_method("average")
    out = ctx.run_tensorwise(first, {"weights": None}, keys[:3])
    direct = [ctx.sources[0].tensors().get(k) for k in keys[:3]]
    assert all(o.data_ptr() != d.data_ptr() for o, d in zip(out.values(), direct, strict=True))


def test_tensor_stack_is_a_list_and_in_place_use_is_allowed():
    stacked = torch.arange(12.0).reshape(3, 4)
    ts = TensorStack(stacked)
    assert isinstance(ts, list) and len(ts) == 3 and torch.equal(ts[1], stacked[1])
    average = get_method("average").fn
    torch.testing.assert_close(average(TensorStack(stacked.clone())), stacked.mean(0))
    plain = [t.clone() for t in stacked]
    average(plain)
    assert all(torch.equal(a, b) for a, b in zip(plain, stacked, strict=True))  # lists are not modified


@pytest.mark.parametrize("shape", [(3, 50, 40), (4, 600, 512)])  # exact and sampled thresholds
def test_fused_ties_matches_the_step_by_step_definition(shape):
    g = torch.Generator().manual_seed(0)
    tv = torch.randn(*shape, generator=g) * torch.linspace(0.2, 3.0, shape[-1])
    trimmed = trim_top_k(tv, 0.2)
    want = disjoint_mean(trimmed, elect_sign(trimmed))
    got = ties_task_vector_(tv.clone(), 0.2)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    kept = (trimmed != 0).float().mean(dim=(1, 2))
    assert ((kept - 0.2).abs() < 0.01).all(), kept  # sampled quantile: within 1% of n
    if tv[0].numel() <= 1 << 17:
        assert ((trimmed != 0).sum(dim=(1, 2)) == round(0.2 * tv[0].numel())).all()


def test_dare_mask_rate_and_rescale():
    tv = torch.ones(1, 200_000)
    out = drop_and_rescale(tv, 0.9, torch.Generator().manual_seed(0))
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.1) < 0.003
    assert torch.allclose(out[kept], torch.full_like(out[kept], 65536 / (65536 - round(0.9 * 65536))))


def test_memory_benchmark_rejects_unknown_methods():
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "memory.py"),
            "--size",
            "tiny",
            "--n",
            "1",
            "--methods",
            "average,nope",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode != 0
    assert "unknown merge method 'nope'" in res.stderr and "average" in res.stderr


@pytest.mark.parametrize("method, params", [("dare", {"drop_rate": 0.5}), ("ties", {"density": 0.3})])
def test_engine_threads_do_not_change_the_result(models, monkeypatch, method, params):
    """Several engine threads read and merge tensors in any order; each key's random generator is
    seeded from the key, so one thread and four give bit-identical merges."""
    results = []
    for threads in ("1", "4"):
        monkeypatch.setenv("HF_VITMERGE_MERGE_THREADS", threads)
        ctx = prepare(_config(models, method), quiet=True)
        spec = get_method(method)
        results.append(ctx.run_tensorwise(spec, spec.validate_params(params), ctx.adapter.backbone_keys))
    assert results[0].keys() == results[1].keys()
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key


def test_non_finite_merge_from_finite_inputs_is_reported(models):
    """Inputs are finite, but a scaling beyond float32 range (1e40) makes them infinite: the engine's output check names the
    method and tensor instead of writing infinities."""
    from hf_vitmerge.errors import HFVitMergeError
    from hf_vitmerge.loading import ModelLoadError

    ctx = prepare(_config(models, "task_arithmetic"), quiet=True)
    spec = get_method("task_arithmetic")
    keys = ctx.adapter.backbone_keys
    with pytest.raises(
        HFVitMergeError, match=r"task_arithmetic: the merged tensor .* NaN or infinite"
    ) as err:
        ctx.run_tensorwise(spec, spec.validate_params({"scaling": 1e40}), keys)
    assert not isinstance(err.value, ModelLoadError)  # no input is blamed
