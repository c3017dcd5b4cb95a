"""Gated merging: similarity ranking, dynamic layers, router training (features and CNN kinds),
grouped inference, Trainer compatibility, save/load and trust_remote_code loading."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from hf_vitmerge import merge
from hf_vitmerge.arch import ViTAdapter
from hf_vitmerge.errors import InputError
from hf_vitmerge.gate import train_gate, trainer_arguments
from hf_vitmerge.methods.gated import dynamic_keys, least_similar, mean_pairwise_cosine, resolve_m

LAYERS = 2
TASKS = {"red": (["a", "b", "c"], (200, 30, 30)), "blue": (["x", "y"], (30, 30, 200))}


def _vit_config(num_labels: int):
    from transformers import ViTConfig

    return ViTConfig(
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        id2label={i: str(i) for i in range(num_labels)},
        label2id={str(i): i for i in range(num_labels)},
    )


def _images(color, n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        arr = np.clip(np.array(color) + rng.normal(0, 25, (16, 16, 3)), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(arr))
    return out


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A shared-init 2-task zoo: the tasks' layer-1 blocks differ much more than layer 0's."""
    import datasets
    from transformers import ViTForImageClassification, ViTImageProcessor

    root = tmp_path_factory.mktemp("gated_zoo")
    processor = ViTImageProcessor(size={"height": 16, "width": 16})
    torch.manual_seed(0)
    base = ViTForImageClassification(_vit_config(3)).eval()
    base.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    adapter = ViTAdapter.from_model(base)
    base_sd = {k: v.clone() for k, v in adapter.state_dict(base).items()}
    models = []
    for t, (name, (labels, color)) in enumerate(TASKS.items()):
        model = ViTForImageClassification(_vit_config(len(labels))).eval()
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {v: i for i, v in enumerate(labels)}
        gen = torch.Generator().manual_seed(100 + t)
        tensors = {}
        for p in adapter.params:
            if p.kind == "head":
                continue
            scale = 0.5 if p.layer == 1 else 0.01
            tensors[p.key] = base_sd[p.key] + scale * torch.randn(p.shape, generator=gen)
        ViTAdapter.from_model(model).load_state_dict(model, tensors, strict=False)
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
        ds = datasets.Dataset.from_dict(
            {"image": _images(color, 40, t), "label": [i % len(labels) for i in range(40)]},
            features=datasets.Features(
                {"image": datasets.Image(), "label": datasets.ClassLabel(names=labels)}
            ),
        )
        ds.save_to_disk(str(root / "data" / name / "train"))
        models.append(
            {"model": str(root / name), "task": name, "data": {"path": str(root / "data" / name / "train")}}
        )
    return {"root": root, "base": str(root / "base"), "models": models, "processor": processor}


def _config(zoo, **parameters) -> dict:
    params = {
        "trainer": {"num_train_epochs": 3, "per_device_train_batch_size": 16},
        "gate_channels": [8, 8],
        **parameters,
    }
    return {
        "method": "gated",
        "base_model": zoo["base"],
        "models": zoo["models"],
        "parameters": params,
        "seed": 0,
    }


@pytest.fixture(scope="module")
def gated_model(zoo):
    return merge(_config(zoo, m=1), quiet=True)


def _pixels(zoo, per_task: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    images, tasks = [], []
    for t, (_labels, color) in enumerate(TASKS.values()):
        images += _images(color, per_task, 1000 + t)
        tasks += [t] * per_task
    return zoo["processor"](images=images, return_tensors="pt")["pixel_values"], torch.tensor(tasks)


def test_mean_pairwise_cosine_and_ranking():
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([0.0, 1.0])
    c = torch.tensor([1.0, 1.0])
    # pairs: (a,b)=0, (a,c)=(b,c)=1/sqrt(2)
    assert mean_pairwise_cosine([a, b, c]) == pytest.approx(2 / np.sqrt(2) / 3)
    assert mean_pairwise_cosine([a, a, 2 * a]) == pytest.approx(1.0)
    sims = {0: 0.9, 1: 0.2, 2: 0.5, 3: 0.2}
    assert least_similar(sims, 0) == []
    assert least_similar(sims, 1) == [1]  # tie with layer 3: lower layer first
    assert least_similar(sims, 3) == [1, 2, 3]


def test_similarity_picks_the_blocks_that_differ(gated_model):
    info = gated_model.merge_info
    assert info["dynamic_blocks"] == {"attention": [1], "mlp": [1]}
    sims = info["block_similarity"]
    assert sims["attention"]["1"] < sims["attention"]["0"]
    assert sims["mlp"]["1"] < sims["mlp"]["0"]


def test_dynamic_tensor_counts():
    adapter = ViTAdapter.from_config(_vit_config(3))
    none = dynamic_keys(adapter, {"attention": [], "mlp": []})
    every = dynamic_keys(adapter, {"attention": [0, 1], "mlp": [0, 1]})
    static_patch = dynamic_keys(adapter, {"attention": [], "mlp": []}, patch_embedding=False)
    norms = 2 * 2 * LAYERS + 2  # ln_before, ln_after (weight, bias) per block + final LayerNorm
    assert len(none) == 4 + norms  # cls, pos, patch weight and bias
    assert len(static_patch) == 2 + norms
    assert len(every) == len(none) + LAYERS * (8 + 4)  # q,k,v,o and fc1,fc2 (weight, bias)
    assert set(every) == set(adapter.backbone_keys)
    assert resolve_m("all", 12) == 12 and resolve_m(None, 12) == 5
    with pytest.raises(ValueError, match="`m`"):
        resolve_m(13, 12)


def test_gate_learns_tasks(zoo):
    pixels, tasks = _pixels(zoo, per_task=30)
    split = [pixels[tasks == t] for t in range(2)]
    gate, metrics = train_gate(split, list(TASKS), trainer={"num_train_epochs": 3}, seed=0, quiet=True)
    assert metrics["gate_validation_samples"] == 6
    assert metrics["gate_validation_accuracy"] == 1.0
    test_pixels, test_tasks = _pixels(zoo)
    with torch.no_grad():
        assert (gate(test_pixels).logits.argmax(-1) == test_tasks).all()


def test_trainer_arguments_are_validated(tmp_path):
    args = trainer_arguments(
        str(tmp_path), seed=3, device="cpu", quiet=True, overrides={"learning_rate": 0.01}
    )
    assert args.learning_rate == 0.01 and args.seed == 3 and args.use_cpu
    with pytest.raises(ValueError, match="learn_rate"):
        trainer_arguments(str(tmp_path), seed=0, device="cpu", quiet=True, overrides={"learn_rate": 0.1})


def test_merge_info_and_storage(gated_model):
    from transformers import ViTForImageClassification

    info = gated_model.merge_info
    assert info["gate_validation_accuracy"] == 1.0
    # Counted by hand for m=1 on the 2-layer tiny ViT (hidden 32, MLP 64, 16 patches of 4x4x3):
    # cls, position, patch weight and bias; two LayerNorms per layer and the final one (weight,
    # bias); layer 1's attention (q, k, v, o: weight, bias) and MLP (fc1, fc2: weight, bias).
    assert info["num_dynamic_tensors"] == 4 + (2 * LAYERS + 1) * 2 + 8 + 4
    h, i, patches = 32, 64, (16 // 4) ** 2
    dynamic = h + (patches + 1) * h + (h * 3 * 4 * 4 + h) + (2 * LAYERS + 1) * 2 * h
    dynamic += 4 * (h * h + h) + (i * h + i) + (h * i + h)
    backbone = sum(
        p.numel()
        for n, p in ViTForImageClassification(_vit_config(3)).named_parameters()
        if not n.startswith("classifier")
    )
    heads = (3 * h + 3) + (2 * h + 2)
    gate = sum(p.numel() for p in gated_model.gate.parameters())
    # the static tensors once, the dynamic ones once per task, both heads and the gate
    assert info["num_parameters"] == backbone + len(TASKS) * dynamic - dynamic + heads + gate
    assert info["storage_ratio"] == pytest.approx(info["num_parameters"] / (2 * backbone + heads), abs=1e-4)
    assert gated_model.config.id2label == dict(enumerate(["a", "b", "c", "x", "y"]))


@contextlib.contextmanager
def _granularity(model, granularity: str):
    """Switch the (module-scoped) model's granularity for one test, restoring it even on failure."""
    before = model.config.granularity
    model.config.granularity = granularity
    try:
        yield model
    finally:
        model.config.granularity = before


def test_mixed_batch_grouping_equals_per_image_routing(gated_model, zoo):
    """Hard routing groups a mixed batch by predicted task: the same logits as one image at a time."""
    assert gated_model.config.granularity == "hard"
    pixels, tasks = _pixels(zoo)
    perm = torch.randperm(len(tasks), generator=torch.Generator().manual_seed(0))
    pixels, tasks = pixels[perm], tasks[perm]
    calls = []
    hook = gated_model.vit.layernorm.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        mixed = gated_model(pixel_values=pixels)
    hook.remove()
    # the router's passes (one per row of task weights it reads) plus one pass per predicted task,
    # not one per image
    router_passes = len(gated_model.config.router_task_weights or [None])
    assert len(calls) == router_passes + mixed.predicted_task.unique().numel() <= router_passes + 2
    assert (mixed.predicted_task == tasks).all()
    with torch.no_grad():
        for i in range(len(tasks)):
            one = gated_model(pixel_values=pixels[i : i + 1])
            torch.testing.assert_close(mixed.logits[i : i + 1], one.logits, atol=1e-5, rtol=0)


def test_topk_routing_mixes_the_top_tasks_per_group(gated_model, zoo):
    pixels, _ = _pixels(zoo)
    gated_model.config.granularity = "topk"
    try:
        with torch.no_grad():
            probs = torch.softmax(gated_model.route(pixels).float(), -1)
            predicted, weights, inverse = gated_model._groups(probs)
            out = gated_model(pixel_values=pixels)
    finally:
        gated_model.config.granularity = "hard"
    # two tasks, top-2: one group for the whole batch, mixing with the batch's mean probabilities
    assert weights.shape == (1, 2) and (inverse == 0).all()
    torch.testing.assert_close(weights[0], probs.mean(0) / probs.mean(0).sum())
    assert torch.equal(out.predicted_task, predicted)
    with torch.no_grad():
        states = __import__("hf_vitmerge.modeling.gated", fromlist=["run_backbone"]).run_backbone(
            gated_model.vit, pixels, gated_model.task_params(weights[0])
        )
    torch.testing.assert_close(out.task_logits[0], gated_model.heads[0](states[:, 0]))


def test_batch_granularity_mixes_a_mixed_batch(gated_model, zoo):
    """The released per-batch mode is wrong on mixed batches, which is why it is not the default."""
    pixels, tasks = _pixels(zoo)
    with torch.no_grad(), _granularity(gated_model, "batch"):
        out = gated_model(pixel_values=pixels)
    assert out.predicted_task.unique().numel() == 1


def test_all_dynamic_with_known_task_reproduces_each_model(zoo):
    from transformers import ViTForImageClassification

    from hf_vitmerge.loading import resolve_model

    model = merge(_config(zoo, m="all", granularity="hard"), quiet=True)
    adapter = resolve_model(zoo["models"][0]["model"]).adapter
    assert model.merge_info["num_dynamic_tensors"] == len(adapter.backbone_keys)
    pixels, _ = _pixels(zoo)
    offset = 0
    for t, entry in enumerate(zoo["models"]):
        original = ViTForImageClassification.from_pretrained(entry["model"]).eval()
        with torch.no_grad():
            expected = torch.log_softmax(original(pixel_values=pixels).logits, -1)
            got = model(pixel_values=pixels, task=t).logits
        n = expected.shape[1]
        torch.testing.assert_close(got[:, offset : offset + n], expected, atol=1e-5, rtol=0)
        assert torch.isinf(got[:, :offset]).all() and torch.isinf(got[:, offset + n :]).all()
        offset += n


def test_m0_stores_less_than_m_all(zoo, gated_model):
    m0 = merge(_config(zoo, m=0, static_method="average"), quiet=True)
    assert m0.merge_info["dynamic_blocks"] == {"attention": [], "mlp": []}
    assert m0.merge_info["num_parameters"] < gated_model.merge_info["num_parameters"]


def test_save_load_round_trip(gated_model, zoo, tmp_path):
    from transformers import AutoModelForImageClassification

    gated_model.save_pretrained(tmp_path / "gated")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "gated").eval()
    assert type(loaded).__name__ == "GatedMergedViTForImageClassification"
    pixels, _ = _pixels(zoo)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(pixel_values=pixels).logits, gated_model(pixel_values=pixels).logits
        )


def test_trust_remote_code_without_hf_vitmerge(gated_model, zoo, tmp_path):
    folder = tmp_path / "remote"
    gated_model.save_pretrained(folder)
    pixels, _ = _pixels(zoo)
    with torch.no_grad():
        expected = gated_model(pixel_values=pixels)
    torch.save(
        {"pixels": pixels, "logits": expected.logits, "tasks": expected.predicted_task}, tmp_path / "io.pt"
    )
    assert json.loads((folder / "config.json").read_text())["auto_map"]
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForImageClassification
        io = torch.load({str(tmp_path / "io.pt")!r})
        model = AutoModelForImageClassification.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            out = model(pixel_values=io["pixels"])
        torch.testing.assert_close(out.logits, io["logits"])
        assert torch.equal(out.predicted_task, io["tasks"])
        assert not any(name.startswith("hf_vitmerge") for name in sys.modules), "hf_vitmerge was imported"
        print("OK", type(model).__module__)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "OK" in done.stdout


def test_reuse_trained_gate(gated_model, zoo, tmp_path):
    gated_model.gate.save_pretrained(tmp_path / "gate")
    again = merge(_config(zoo, m=1, gate=str(tmp_path / "gate")), quiet=True)
    assert "gate_train_loss" not in again.merge_info
    pixels, _ = _pixels(zoo)
    with torch.no_grad():
        torch.testing.assert_close(again(pixel_values=pixels).logits, gated_model(pixel_values=pixels).logits)
    # a reused router reads no images: the same merge from models without `data:` entries
    bare = {**_config(zoo, m=1, gate=str(tmp_path / "gate")), "models": [m["model"] for m in zoo["models"]]}
    without_data = merge(bare, quiet=True)
    with torch.no_grad():
        torch.testing.assert_close(
            without_data(pixel_values=pixels).logits, again(pixel_values=pixels).logits
        )


def test_self_contained_layout_table_matches_the_adapter():
    """modeling/gated.py is copied into model folders, so it carries its own copy of the 4.x -> 5.x
    module names; it must agree with the architecture adapter's table."""
    from hf_vitmerge.arch import _BLOCK_MODULES
    from hf_vitmerge.modeling.gated import _V5_BLOCK_NAMES

    renamed = {old: new for old, new in _BLOCK_MODULES.values() if old != new}
    assert renamed == _V5_BLOCK_NAMES


def test_gated_folder_works_in_pipeline(zoo, tmp_path):
    """merge(..., out_dir=...) writes a complete folder: pipeline() loads it as it is."""
    from PIL import Image
    from transformers import pipeline

    folder = tmp_path / "gated"
    model = merge(_config(zoo, m=1), out_dir=folder, quiet=True)
    assert (folder / "preprocessor_config.json").is_file() and (folder / "README.md").is_file()
    classifier = pipeline("image-classification", model=str(folder), trust_remote_code=True)
    preds = classifier(Image.new("RGB", (16, 16), (200, 30, 30)), top_k=model.config.num_labels)
    assert {p["label"] for p in preds} == set(model.config.id2label.values())


def test_cnn_router_stays_an_option(zoo):
    model = merge(_config(zoo, m=1, gate_kind="cnn"), quiet=True)
    assert model.gate.config.kind == "cnn" and model.merge_info["gate_kind"] == "cnn"
    assert model.merge_info["gate_validation_accuracy"] == 1.0
    pixels, tasks = _pixels(zoo)
    with torch.no_grad():
        assert (model(pixel_values=pixels).predicted_task == tasks).all()


def test_no_base_falls_back_to_a_base_free_static_method(zoo):
    config = _config(zoo, m=1)
    del config["base_model"]
    model = merge(config, quiet=True)
    assert model.merge_info["static_method"] == "average"
    assert "No base model" in model.merge_info["static_note"]


def _own_features(entry, pixels, layers: int) -> torch.Tensor:
    """CLS and mean patch token of an input model's own LayerNorm-ed states after ``layers`` blocks."""
    from transformers import ViTForImageClassification

    vit = ViTForImageClassification.from_pretrained(entry["model"]).eval().vit
    with torch.no_grad():
        states = vit.layernorm(vit(pixel_values=pixels, output_hidden_states=True).hidden_states[layers])
    return torch.cat([states[:, 0], states[:, 1:].mean(1)], dim=-1)


def test_router_reads_the_input_models_without_a_base(zoo, tmp_path):
    """Without a base model and with every tensor dynamic, the features router reads the first
    input model's own network (the average of differently initialised models computes nothing
    useful); `every` reads each model's, also after a save and reload; with a base it reads the
    equally weighted merge. Here 2 tasks x 1 router block cost a whole pass of the 2-block model,
    over `auto`'s budget of half a pass for `every`."""
    from transformers import AutoModelForImageClassification

    config = _config(zoo, m="all")
    del config["base_model"]
    pixels, _ = _pixels(zoo)
    first = merge(config, quiet=True)
    layers = first.config.router_layers
    assert (len(zoo["models"]), layers, LAYERS) == (2, 1, 2) and first.merge_info["router_reads"] == "first"
    with torch.no_grad():
        torch.testing.assert_close(
            first.router_features(pixels), _own_features(zoo["models"][0], pixels, layers), atol=1e-5, rtol=0
        )

    every_params = {**config["parameters"], "router_reads": "every"}
    every = merge({**config, "parameters": every_params}, quiet=True)
    expected = torch.cat([_own_features(entry, pixels, layers) for entry in zoo["models"]], dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(every.router_features(pixels), expected, atol=1e-5, rtol=0)
        every.save_pretrained(tmp_path / "gated")
        reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "gated").eval()
        torch.testing.assert_close(reloaded.router_features(pixels), expected, atol=1e-5, rtol=0)

    reuse = {**config["parameters"], "gate": str(tmp_path / "gated")}
    with pytest.raises(InputError, match="not a saved router"):  # a whole routed model is not a router
        merge({**config, "parameters": reuse}, quiet=True)
    every.gate.save_pretrained(tmp_path / "router")  # trained on 2 passes: cannot read one
    with pytest.raises(ValueError, match="reads .* features"):
        merge({**config, "parameters": {**reuse, "gate": str(tmp_path / "router")}}, quiet=True)

    with_base = merge(_config(zoo, m="all"), quiet=True)
    assert with_base.merge_info["router_reads"] == "merged" and with_base.config.router_task_weights is None
    with pytest.raises(ValueError, match="router_reads"):
        merge(_config(zoo, m="all", router_reads="middle"), quiet=True)


def test_router_reads_auto_follows_the_cost_budget():
    """`auto` reads every input model when the K passes cost at most half a forward pass;
    otherwise the merged backbone, or the first model when there is no base and nothing static."""
    from types import SimpleNamespace

    from hf_vitmerge.methods.gated import resolve_router_reads

    def reads(k, base, has_static=False, mode="auto"):
        ctx = SimpleNamespace(
            sources=[None] * k, base=base, adapter=SimpleNamespace(spec=SimpleNamespace(num_layers=12))
        )
        return resolve_router_reads(ctx, mode, has_static=has_static, router_layers=3)

    assert reads(2, None) == reads(2, "base") == "every"  # 2 x 3 blocks = half of 12
    assert (
        reads(3, "base") == "merged"
        and reads(3, None) == "first"
        and reads(3, None, has_static=True) == "merged"
    )
    assert reads(2, None, mode="merged") == "merged" and reads(5, "base", mode="every") == "every"


@pytest.mark.slow
def test_trainer_trains_only_the_router(zoo):
    """The gated model is Trainer-compatible: with the backbone and heads frozen, Trainer fits the
    router inside the merged model (task ids as ``task_labels``) and the loss falls."""
    from transformers import Trainer, TrainingArguments

    model = merge(_config(zoo, m=1), quiet=True)
    torch.manual_seed(0)
    model.gate.post_init()  # forget the trained router
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("gate."))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("gate.")}
    pixels, tasks = _pixels(zoo, per_task=16)
    labels = torch.zeros_like(tasks)  # label 0 of each task ("a" / "x")
    labels[tasks == 1] = 3
    with torch.no_grad():
        assert model(pixel_values=pixels, labels=labels).loss.ndim == 0  # a classification loss
    rows = [{"pixel_values": x, "task_labels": t} for x, t in zip(pixels, tasks, strict=True)]

    def loss_on_all() -> float:
        with torch.no_grad():
            return float(model(pixel_values=pixels, task_labels=tasks).loss)

    before = loss_on_all()
    model.train()
    args = TrainingArguments(
        output_dir=str(zoo["root"] / "trainer"),
        num_train_epochs=4,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    Trainer(model=model, args=args, train_dataset=rows).train()
    model.eval()
    after = loss_on_all()
    assert after < 0.5 * before
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_card_records_router_accuracy_storage_and_static_fallback(zoo, tmp_path):
    config = _config(zoo, m=1)
    del config["base_model"]
    merge(config, out_dir=tmp_path / "gated", quiet=True)
    text = (tmp_path / "gated" / "README.md").read_text()
    for fact in ("gate_validation_accuracy", "storage_ratio", "No base model", "average"):
        assert fact in text, fact


def test_joint_rule_keeps_ruled_out_blocks_out():
    """A routed model's logits are -inf outside the predicted task: the joint rule must not turn
    those blocks into NaN (which argmax would pick)."""
    from hf_vitmerge.evaluation import joint_predictions

    inf = float("-inf")
    blocks = [torch.tensor([[inf, inf], [-0.1, -2.5]]), torch.tensor([[-3.0, -0.05, -4.0], [inf, inf, inf]])]
    assert joint_predictions(blocks).tolist() == [3, 0]
