"""TIES and DARE: hand-computed tensors, engine integration and per-seed determinism."""

from __future__ import annotations

import pytest
import torch
from conftest import make_vit

from hf_vitmerge import ViTAdapter, merge
from hf_vitmerge.methods import get_method
from hf_vitmerge.methods.dare import drop_and_rescale
from hf_vitmerge.methods.ties import disjoint_mean, elect_sign, trim_top_k

BASE = torch.ones(5)
TV = torch.tensor(
    [
        [4.0, -1.0, 0.5, -3.0, 2.0],
        [2.0, 3.0, -0.1, -1.0, -5.0],
        [-1.0, 2.0, 0.2, 4.0, 1.0],
    ]
)
MODELS = [BASE + tv for tv in TV]


def test_registry_entries():
    ties, dare = get_method("ties"), get_method("dare")
    assert ties.needs_base and dare.needs_base and ties.kind == dare.kind == "tensorwise"
    assert set(ties.defaults) == {"density", "scaling"}
    assert set(dare.defaults) == {"drop_rate", "combine", "scaling", "density"}
    assert "2306.01708" in ties.reference and "2311.03099" in dare.reference
    assert get_method("ties_merging") is ties


def test_ties_steps_hand_computed():
    trimmed = trim_top_k(TV, 0.4)  # k = 2 of 5 per task vector
    expected = torch.tensor([[4.0, 0, 0, -3, 0], [0, 3, 0, 0, -5], [0, 2, 0, 4, 0]])
    torch.testing.assert_close(trimmed, expected)
    sign = elect_sign(trimmed)  # sums [4, 5, 0, 1, -5]
    torch.testing.assert_close(sign, torch.tensor([1.0, 1, 0, 1, -1]))
    # entry 1: 3 and 2 agree -> 2.5; entry 3: +4 wins over -3 -> 4; entry 2: nothing -> 0
    torch.testing.assert_close(disjoint_mean(trimmed, sign), torch.tensor([4.0, 2.5, 0, 4, -5]))


def test_ties_method_hand_computed():
    ties = get_method("ties").fn
    out = ties(MODELS, BASE, density=0.4, scaling=0.5)
    torch.testing.assert_close(out, BASE + 0.5 * torch.tensor([4.0, 2.5, 0, 4, -5]))
    # density 1 keeps everything: sums [5, 4, 0.6, 0, -2]; entry 3 has no elected sign
    out = ties(MODELS, BASE, density=1.0, scaling=1.0)
    torch.testing.assert_close(out, BASE + torch.tensor([3.0, 2.5, 0.35, 0, -5]))
    # one model, no trimming, lambda 1 returns that model
    torch.testing.assert_close(ties([MODELS[0]], BASE, density=1.0), MODELS[0])
    with pytest.raises(ValueError, match="density"):
        ties(MODELS, BASE, density=0.0)


def test_dare_without_drop_is_task_arithmetic_or_ties():
    dare, ta, ties = (get_method(n).fn for n in ("dare", "task_arithmetic", "ties"))
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(dare(MODELS, BASE, drop_rate=0.0, generator=g), ta(MODELS, BASE, scaling=0.3))
    torch.testing.assert_close(
        dare(MODELS, BASE, drop_rate=0.0, combine="ties", density=0.4, generator=g),
        ties(MODELS, BASE, density=0.4, scaling=1.0),
    )
    with pytest.raises(ValueError, match="combine"):
        dare(MODELS, BASE, combine="mean")
    with pytest.raises(ValueError, match="density only applies"):
        dare(MODELS, BASE, density=0.5)
    with pytest.raises(ValueError, match="drop_rate"):
        dare(MODELS, BASE, drop_rate=1.0)


def test_dare_drops_and_rescales():
    tv = torch.arange(1.0, 2001.0)
    out = drop_and_rescale(tv.unsqueeze(0), 0.75, torch.Generator().manual_seed(3))[0]
    kept = out != 0
    torch.testing.assert_close(out[kept], 4 * tv[kept])  # survivors rescaled by 1/(1-p)
    assert 0.2 < kept.float().mean().item() < 0.3
    # same generator seed, same mask; another seed, another mask
    again = drop_and_rescale(tv.unsqueeze(0), 0.75, torch.Generator().manual_seed(3))[0]
    other = drop_and_rescale(tv.unsqueeze(0), 0.75, torch.Generator().manual_seed(4))[0]
    assert torch.equal(out, again) and not torch.equal(out, other)
    # the rescaling keeps the expected task vector: mean over many masks ~ tv
    mean = torch.stack(
        [drop_and_rescale(tv.unsqueeze(0), 0.5, torch.Generator().manual_seed(s))[0] for s in range(400)]
    ).mean(0)
    assert (mean / tv - 1).abs().mean() < 0.05


def test_dare_ties_hand_checkable():
    """K=1: DARE-TIES with density 1 is base + lambda * (dropped and rescaled task vector)."""
    dare = get_method("dare").fn
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    out = dare([MODELS[0]], BASE, drop_rate=0.5, combine="ties", scaling=1.0, generator=g1)
    dropped = drop_and_rescale(TV[:1], 0.5, g2)[0]
    torch.testing.assert_close(out, BASE + dropped)


@pytest.fixture(scope="module")
def finetunes(tmp_path_factory):
    root = tmp_path_factory.mktemp("ties")
    base = make_vit(root / "base", seed=0)
    models = [make_vit(root / f"m{i}", seed=1 + i, base=base) for i in range(3)]
    return root, base, models


def test_ties_through_the_engine(finetunes):
    root, base, models = finetunes
    merged = merge(
        [root / f"m{i}" for i in range(3)],
        "ties",
        base_model=str(root / "base"),
        density=0.3,
        scaling=0.8,
        quiet=True,
    )
    ad = ViTAdapter.from_model(merged)
    sd = [ViTAdapter.from_model(m).state_dict(m) for m in models]
    s0 = ad.state_dict(base)
    ties = get_method("ties").fn
    for key in (ad.key("fc1", "weight", 0), ad.key("cls", ""), ad.key("classifier", "weight")):
        want = ties([s[key] for s in sd], s0[key], density=0.3, scaling=0.8)
        torch.testing.assert_close(ad.state_dict(merged)[key], want)


def _saved_bytes(model, folder):
    model.save_pretrained(folder)
    return (folder / "model.safetensors").read_bytes()


def test_dare_is_deterministic_per_seed(finetunes, tmp_path):
    root, _, _ = finetunes
    inputs = [root / f"m{i}" for i in range(3)]

    def run(seed):
        return merge(inputs, "dare", base_model=str(root / "base"), drop_rate=0.7, seed=seed, quiet=True)

    a = _saved_bytes(run(11), tmp_path / "a")
    b = _saved_bytes(run(11), tmp_path / "b")
    c = _saved_bytes(run(12), tmp_path / "c")
    assert a == b
    assert a != c
