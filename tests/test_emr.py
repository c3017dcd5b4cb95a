"""EMR-Merging: elect/mask/rescale by hand, routed and task-given inference, packing, loading
with and without hf_vitmerge."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import test_gated
import torch
from test_gated import TASKS, _pixels

from hf_vitmerge import merge
from hf_vitmerge.arch import ViTAdapter
from hf_vitmerge.modeling.emr import pack_mask, unpack_mask

zoo = test_gated.zoo  # the gated tests' two-task zoo fixture


def _emr_config(zoo, **parameters) -> dict:
    return {
        "method": "emr",
        "base_model": zoo["base"],
        "models": zoo["models"],
        "parameters": {"trainer": {"num_train_epochs": 10}, **parameters},
        "seed": 0,
    }


def _tensors(path: str) -> dict[str, torch.Tensor]:
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(path)
    return ViTAdapter.from_model(model).state_dict(model)


def test_pack_unpack_round_trip():
    mask = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_mask(packed, mask.shape), mask.float())


def test_task_given_equals_hand_computed_masked_vector(zoo):
    """With ``task=k`` the model runs ``W_0 + lambda_k * M_k * tau_uni``, computed here by hand."""
    from transformers import ViTForImageClassification

    model = merge(_emr_config(zoo), quiet=True)
    base = _tensors(zoo["base"])
    keys = model.config.masked_keys
    task_sd = [_tensors(m["model"]) for m in zoo["models"]]
    taus = {k: torch.stack([sd[k] - base[k] for sd in task_sd]) for k in keys}
    # elect by hand: entry by entry on the small tensors, with a clamp on the large ones
    uni, masks = {}, {}
    for k in keys:
        t = taus[k].reshape(len(task_sd), -1)
        if t.shape[1] <= 64:
            out = torch.empty(t.shape[1])
            for j in range(t.shape[1]):
                col = t[:, j].tolist()
                sign = 1.0 if sum(col) > 0 else -1.0
                out[j] = sign * max([abs(v) for v in col if v * sign > 0], default=0.0)
        else:
            sign = (t.sum(0) > 0).float() * 2 - 1
            out = sign * (t * sign).clamp(min=0).max(0).values
        uni[k] = out.reshape(taus[k].shape[1:])
        masks[k] = taus[k] * uni[k] > 0
    lam = []
    for i in range(len(task_sd)):
        num = sum(float(taus[k][i].abs().mean()) for k in keys)
        den = sum(float((masks[k][i] * uni[k]).abs().mean()) for k in keys)
        lam.append(num / den)
    torch.testing.assert_close(model.rescalers.detach(), torch.tensor(lam), rtol=1e-5, atol=0)
    pixels, _ = _pixels(zoo)
    offset = 0
    for i, entry in enumerate(zoo["models"]):
        expected_sd = {k: base[k] + lam[i] * masks[k][i] * uni[k] for k in keys}
        reference = ViTForImageClassification.from_pretrained(entry["model"]).eval()
        ViTAdapter.from_model(reference).load_state_dict(reference, expected_sd, strict=False)
        with torch.no_grad():
            expected = torch.log_softmax(reference(pixel_values=pixels).logits, -1)
            got = model(pixel_values=pixels, task=i).logits
        n = expected.shape[1]
        torch.testing.assert_close(got[:, offset : offset + n], expected, atol=1e-5, rtol=1e-5)
        offset += n


def test_router_picks_the_task_and_info(zoo):
    model = merge(_emr_config(zoo), quiet=True)
    info = model.merge_info
    assert info["gate_validation_accuracy"] == 1.0 and info["gate_kind"] == "features"
    assert 0 < info["storage_ratio"] < 2
    assert set(info["mask_density"]) == set(TASKS)
    pixels, tasks = _pixels(zoo)
    with torch.no_grad():
        out = model(pixel_values=pixels)
        assert (out.predicted_task == tasks).all()
        for t in range(2):
            torch.testing.assert_close(
                out.logits[tasks == t], model(pixel_values=pixels[tasks == t], task=t).logits
            )


def test_emr_loads_with_auto_classes_and_remote_code(zoo, tmp_path):
    from transformers import AutoModelForImageClassification

    model = merge(_emr_config(zoo), quiet=True)
    folder = tmp_path / "emr"
    model.save_pretrained(folder)
    pixels, _ = _pixels(zoo)
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits
    loaded = AutoModelForImageClassification.from_pretrained(folder).eval()
    assert type(loaded).__name__ == "EMRMergedViTForImageClassification"
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, expected)
    torch.save({"pixels": pixels, "logits": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForImageClassification
        io = torch.load({str(tmp_path / "io.pt")!r})
        model = AutoModelForImageClassification.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(pixel_values=io["pixels"]).logits, io["logits"])
        assert not any(name.startswith("hf_vitmerge") for name in sys.modules), "hf_vitmerge was imported"
        print("OK", type(model).__name__)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_MODULES_CACHE": str(tmp_path / "modules"),
            "PYTHONPATH": "",
        },
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "OK EMRMergedViTForImageClassification" in done.stdout
