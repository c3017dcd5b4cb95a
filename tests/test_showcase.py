"""The demo's choice of the recommended merge."""

from __future__ import annotations

from hf_vitmerge.showcase import DEMO_METHODS, recommend


def _r(method: str, normalized: float, model_class: str = "ViTForImageClassification") -> dict:
    return {"method": method, "normalized_accuracy": normalized, "info": {"model_class": model_class}}


def test_best_plain_method_wins():
    results = [_r("average", 0.7), _r("regmean", 0.85), _r("ties", 0.8)]
    assert recommend(results)["method"] == "regmean"


def test_plain_model_preferred_when_close_to_a_custom_best():
    results = [_r("regmean", 0.85), _r("gated", 0.86, "ViTGatedForImageClassification")]
    assert recommend(results, plain_margin=0.02)["method"] == "regmean"


def test_custom_model_recommended_when_clearly_better():
    results = [_r("regmean", 0.80), _r("gated", 0.95, "ViTGatedForImageClassification")]
    assert recommend(results, plain_margin=0.02)["method"] == "gated"


def test_demo_compares_at_least_four_methods_including_the_required_ones():
    names = [m for m, _ in DEMO_METHODS]
    assert len(names) >= 4 and {"average", "ties", "regmean", "gated"} <= set(names)
