"""Model cards for merged models, built with ``huggingface_hub.ModelCard``.

The metadata goes through ``ModelCardData`` (so the YAML front matter is valid whatever the
inputs: no base model, local folders only, results or not), the text through one Jinja
template shipped in the package (``hf_vitmerge/templates/model_card.md``). The card records
what is needed to reproduce and audit the merge: every input with its resolved commit SHA,
method, parameters and paper, seed, library version, calibration data and sample counts,
the label mapping with each label's task, the full merge config, and evaluation results as
``model-index`` with a table and a per-task accuracy plot.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ._version import __version__
from .data import is_hub_dataset_id
from .evaluation import individual_accuracies
from .loading import ModelSource, weights_sha256
from .merging import MergeContext, union_labels
from .methods import get_method

TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
PLOT_NAME = "accuracy.png"


def _provenance(src: ModelSource) -> dict:
    """Where an input came from: a Hub repo at a commit, or a local folder identified by the
    sha256 of its weight files (a folder path means nothing to a reader of the card)."""
    if src.is_hub:
        return {"model": src.ref, "revision": src.revision, "commit": src.commit}
    return {"model": src.ref, "local": True, "weights_sha256": weights_sha256(src)}


def _describe(prov: dict) -> str:
    if not prov.get("local"):
        return f"{prov.get('revision') or 'main'} (`{prov['commit']}`)"
    shas = prov["weights_sha256"]
    return "local folder; weights sha256 " + ", ".join(f"{name} `{sha}`" for name, sha in shas.items())


def _inputs(ctx: MergeContext) -> list[dict]:
    rows = []
    for name, src in zip(ctx.task_names, ctx.sources, strict=True):
        prov = _provenance(src)
        rows.append({"task": name, **prov, "source": _describe(prov)})
    return rows


def _method_specs(ctx: MergeContext) -> list:
    names = [ctx.config.method] + [g.method for g in (ctx.config.groups or {}).values()]
    specs = []
    for name in names:
        try:
            spec = get_method(name)
        except ValueError:  # "per_group" is a config marker, not a registered method
            continue
        if spec not in specs:
            specs.append(spec)
    return specs


def _parameters(ctx: MergeContext) -> dict:
    """The parameters the merge ran with: defaults filled in, per group when groups are used."""
    config = ctx.config
    out: dict = {}
    if config.method != "per_group":
        out.update(get_method(config.method).validate_params(config.parameters))
    for group, recipe in (config.groups or {}).items():
        params = get_method(recipe.method).validate_params(recipe.parameters)
        out[f"groups.{group}"] = {"method": recipe.method, **params}
    return out


def _calibration(ctx: MergeContext) -> list[dict]:
    """Calibration data per task, with the number of samples actually used (data methods only)."""
    if not any(spec.needs_data for spec in _method_specs(ctx)):
        return []
    rows = []
    for i, (name, entry) in enumerate(zip(ctx.task_names, ctx.config.models, strict=True)):
        if entry.data is None:
            continue
        data = ctx.calibration_data(i)  # cached on the context: no second load
        rows.append(
            {
                "task": name,
                "path": entry.data.path,
                "split": data.split or entry.data.split or "train",
                "samples": len(data),
            }
        )
    return rows


def _labels(ctx: MergeContext) -> list[dict]:
    """``id2label`` of the merged model with the task (and task-local label) each id comes from."""
    if ctx.heads_mode == "shared":
        return [
            {"id": i, "label": lab, "task": "all tasks", "original": lab}
            for i, lab in enumerate(ctx.label_lists[0])
        ]
    merged = union_labels(ctx.task_names, ctx.label_lists)
    origin = [(t, lab) for t, labels in zip(ctx.task_names, ctx.label_lists, strict=True) for lab in labels]
    return [
        {"id": i, "label": lab, "task": task, "original": orig}
        for i, (lab, (task, orig)) in enumerate(zip(merged, origin, strict=True))
    ]


def _eval_datasets(ctx: MergeContext) -> dict[str, str]:
    """Task name -> the Hub dataset id its test split came from, for tasks evaluated on one.

    The model-index ``dataset.type`` must be a Hub dataset id; tasks evaluated on local data
    (every zoo suite) are reported in the card's table and ``eval_results.json`` only.
    """
    if not ctx.config.evaluation_suite:
        return {}
    from .suite import load_suite

    suite = load_suite(ctx.config.evaluation_suite)
    return {t.name: str(t.test) for t in suite.tasks if is_hub_dataset_id(str(t.test))}


def _eval_results(ctx: MergeContext, results: dict) -> list[EvalResult]:
    datasets = _eval_datasets(ctx)
    out = []
    for task, acc in (results.get("per_task_accuracy") or {}).items():
        if acc is None or task not in datasets:
            continue
        out.append(
            EvalResult(
                task_type="image-classification",
                task_name="Image Classification",
                dataset_type=datasets[task],
                dataset_name=task,
                dataset_split="test",
                metric_type="accuracy",
                metric_name="accuracy (task known)",
                metric_value=float(acc),
            )
        )
    return out


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)


def results_table(results: dict) -> str:
    """Markdown table of an evaluation result (INTERFACES.md section 4 keys)."""
    lines = ["| task | accuracy |", "|---|---|"]
    lines += [f"| {t} | {_fmt(a)} |" for t, a in (results.get("per_task_accuracy") or {}).items()]
    lines.append(f"| **average over tasks** | {_fmt(results.get('avg_task_accuracy'))} |")
    lines.append(
        f"| **normalized** (vs. each task's own model) | {_fmt(results.get('normalized_accuracy'))} |"
    )
    if results.get("joint_accuracy") is not None:
        lines.append(f"| **joint** (union of labels, task unknown) | {_fmt(results['joint_accuracy'])} |")
    return "\n".join(lines)


def plot_accuracy(
    results: dict,
    path: str | os.PathLike,
    title: str = "Per-task accuracy",
    individual: dict[str, float] | None = None,
) -> Path:
    """Bar chart of per-task accuracy (matplotlib, Agg backend) saved to ``path``.

    With ``individual`` (task -> accuracy of the task's own model) each task shows the individual and
    the merged accuracy side by side.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_task = results.get("per_task_accuracy") or {}
    names = list(per_task)
    values = [per_task[n] if per_task[n] is not None else 0.0 for n in names]
    fig, ax = plt.subplots(figsize=(max(4.0, (0.8 if individual else 0.55) * len(names) + 2), 3.4))
    try:
        xs = list(range(len(names)))
        if individual:
            width = 0.4
            ax.bar(
                [x - width / 2 for x in xs],
                [individual.get(n) or 0.0 for n in names],
                width,
                color="#A0A0A0",
                label="individual model",
            )
            ax.bar([x + width / 2 for x in xs], values, width, color="#4C72B0", label="merged")
        else:
            ax.bar(xs, values, color="#4C72B0")
        avg = results.get("avg_task_accuracy")
        if avg is not None:
            ax.axhline(avg, color="#DD8452", linestyle="--", label=f"merged average {avg:.3f}")
        if individual or avg is not None:
            ax.legend(loc="lower right", fontsize="small")
        ax.set_xticks(xs, names, rotation=45, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return Path(path)


def _load_snippet(info: dict, repo: str) -> str:
    custom = bool(info.get("auto_map")) or info.get("architecture") not in (None, "ViTForImageClassification")
    lines = ["from transformers import pipeline", ""]
    if custom:
        lines = [
            "import hf_vitmerge  # registers the merged model class (or pass trust_remote_code=True)"
        ] + lines
    lines.append(f'classifier = pipeline("image-classification", model="{repo}")')
    return "\n".join(lines)


def build_model_card(
    ctx: MergeContext, info: dict, results: dict | None = None, plot_path: str | None = None
) -> ModelCard:
    """The model card of a merge: metadata via ``ModelCardData``, text from the package template.

    ``info`` is the method's info dict (merge_seconds, stats_seconds, ...); ``results`` an
    evaluation result (per_task_accuracy, avg_task_accuracy, normalized_accuracy,
    joint_accuracy) or None; ``plot_path`` a path, relative to the card, of an accuracy plot.
    """
    config = ctx.config
    spec = get_method(config.method) if config.method != "per_group" else None
    # the Hub accepts only repo ids in `base_model`: local folders go to the body and the
    # hf_vitmerge block, identified by the sha256 of their weights
    hub_sources = [s for s in [*ctx.sources, *([ctx.base] if ctx.base is not None else [])] if s.is_hub]
    base_models = list(dict.fromkeys(s.ref for s in hub_sources))
    inputs = _inputs(ctx)
    base_prov = _provenance(ctx.base) if ctx.base is not None else None
    calibration = _calibration(ctx)
    hub_datasets = sorted({row["path"] for row in calibration if is_hub_dataset_id(row["path"])})
    parameters = json.loads(json.dumps(_parameters(ctx), default=str))  # plain YAML types only
    tags = ["hf_vitmerge", "merge", "vit", "image-classification", config.method]
    tags += [g.method for g in (config.groups or {}).values()]
    model_name = info.get("model_name") or f"{config.method} merge of {', '.join(ctx.task_names)}"
    eval_results = _eval_results(ctx, results) if results else None
    card_data = ModelCardData(
        base_model=base_models or None,
        base_model_relation="merge" if base_models else None,
        pipeline_tag="image-classification",
        library_name="transformers",
        tags=tags,
        datasets=hub_datasets or None,
        metrics=["accuracy"] if eval_results else None,
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
        hf_vitmerge={
            "version": __version__,
            "method": config.method,
            "parameters": parameters,
            "seed": config.seed,
            "heads": ctx.heads_mode,
            "inputs": [{k: v for k, v in row.items() if k != "source"} for row in inputs],
            "base_model": base_prov,
            "calibration": [
                {"task": r["task"], "data": r["path"], "split": r["split"], "samples": r["samples"]}
                for r in calibration
            ]
            or None,
        },
    )
    title_tasks = ", ".join(ctx.task_names[:6]) + (
        f" and {len(ctx.task_names) - 6} more" if len(ctx.task_names) > 6 else ""
    )
    reference = spec.reference if spec else ", ".join(s.reference for s in _method_specs(ctx))
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        title=f"{config.method} merge of {len(ctx.sources)} ViTs ({title_tasks})",
        num_models=len(ctx.sources),
        version=__version__,
        method=config.method,
        method_summary=spec.summary if spec else "a different method per layer group (see parameters)",
        reference=reference,
        base_model=ctx.base.ref if ctx.base is not None else None,
        base_commit=_describe(base_prov) if base_prov is not None else None,
        inputs=inputs,
        parameters={k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in parameters.items()},
        seed=config.seed,
        heads=ctx.heads_mode,
        merge_seconds=info.get("merge_seconds"),
        stats_seconds=info.get("stats_seconds"),
        calibration=calibration,
        labels=_labels(ctx),
        results_table=results_table(results) if results else None,
        plot=plot_path,
        config_yaml=config.to_yaml(),
        load_snippet=_load_snippet(info, info.get("repo_id") or "PATH_OR_REPO_ID"),
        training_note=info.get("training_note")
        or "No training was involved: the weights were combined directly.",
        details=_details(info),
    )


_NOT_DETAILS = {
    "merge_seconds",
    "stats_seconds",
    "auto_map",
    "architecture",
    "model_name",
    "repo_id",
    "training_note",
}


def _details(info: dict) -> dict[str, str]:
    """Method facts worth showing (dynamic blocks, gate accuracy, storage, per-group methods, ...)."""
    out = {}
    for key, value in info.items():
        if key in _NOT_DETAILS or value is None:
            continue
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, (dict, list, tuple)):
            value = json.dumps(value, default=str)
            if len(value) > 300:
                value = value[:297] + "..."
        out[key] = str(value).replace("|", "\\|")
    return out


def write_model_card(
    out_dir: str | os.PathLike, ctx: MergeContext, info: dict, results: dict | None = None
) -> Path:
    """Write ``README.md`` (and ``accuracy.png`` when ``results`` are given) into ``out_dir``.

    The saved ``config.json`` (if already written) tells the card whether the merged model is a
    custom class, so the loading snippet is right.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = dict(info)
    config_file = out / "config.json"
    if config_file.is_file():
        saved = json.loads(config_file.read_text())
        info.setdefault("architecture", (saved.get("architectures") or [None])[0])
        info.setdefault("auto_map", saved.get("auto_map"))
    plot = None
    if results and results.get("per_task_accuracy"):
        individual = None
        if getattr(ctx.config, "evaluation_suite", None):
            individual = individual_accuracies(ctx.config.evaluation_suite)
        title = f"{ctx.config.method}: per-task accuracy"
        plot_accuracy(results, out / PLOT_NAME, title=title, individual=individual)
        plot = PLOT_NAME
    card = build_model_card(ctx, info, results, plot_path=plot)
    path = out / "README.md"
    card.save(path)
    return path
