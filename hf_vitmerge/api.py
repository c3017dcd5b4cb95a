"""The public workflows: ``run_merge`` (merge -> evaluate -> card -> atomic save -> push),
``merge`` and ``save_merged`` (the same in two calls), ``bench`` (several methods on one suite);
the demo is in :mod:`hf_vitmerge.showcase`."""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml
from transformers import PreTrainedModel

from ._version import __version__
from .checks import check_device, check_writable
from .config import MergeConfig, load_config
from .errors import InputError, OutputExistsError
from .merging import MergeContext, execute, prepare
from .suite import Suite, load_suite


@dataclass
class MergeRun:
    """What ``run_merge`` produced."""

    path: Path
    model: object
    info: dict
    results: dict | None = None
    push_url: str | None = None
    context: MergeContext | None = field(default=None, repr=False)
    main_process: bool = True  # False on the helper processes of a multi-process launch (nothing saved)


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing non-empty output folder unless ``overwrite``, and an output that cannot
    be written (checked before any work; nothing is created)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OutputExistsError(
            f"output {out} already exists and is not empty. Choose another --out, or pass --overwrite "
            "(overwrite=True) to replace it."
        )
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} is a file, not a folder. Choose another --out.")
    # the merged folder is written next to ``out`` and moved into place: its parent must be writable
    check_writable(out, "output folder", beside=True)
    return out


def save_atomically(out_dir: Path, write, overwrite: bool) -> Path:
    """Call ``write(tmp_dir)``, then move the finished folder into place.

    A crash leaves the previous ``out_dir`` (if any) untouched; nothing half-written ever
    appears at ``out_dir``.
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def save_merged_model(ctx: MergeContext, model, info: dict, results: dict | None, folder: Path) -> None:
    """Write the model, its image processor, config, results and model card into ``folder``."""
    from .card import write_model_card

    model.save_pretrained(folder)
    ctx.sources[0].image_processor().save_pretrained(folder)
    (folder / "merge_config.yaml").write_text(ctx.config.to_yaml())
    if results is not None:
        (folder / "eval_results.json").write_text(json.dumps(results, indent=2))
    write_model_card(folder, ctx, info, results)


def run_merge(
    config: str | os.PathLike | dict | MergeConfig,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
    device: str | None = None,
    evaluation_suite: str | None = None,
    quiet: bool = False,
) -> MergeRun:
    """Run one merge described by a config and write the merged model folder.

    The folder holds the model (``from_pretrained``-loadable), its image processor, the
    config (``merge_config.yaml``), evaluation results when a suite is given, and a model
    card. With ``push_to_hub`` the folder is uploaded afterwards; a failed push raises
    ``hf_vitmerge.hub.PushError`` and keeps the local folder.
    """
    config = load_config(config)
    updates = {}
    if device:
        updates["device"] = device
    if evaluation_suite:
        updates["evaluation_suite"] = str(evaluation_suite)
    if updates:
        config = config.model_copy(update=updates)
    check_device(config.device)
    if push_to_hub:
        _check_repo_id(push_to_hub)
    if config.evaluation_suite:
        load_suite(config.evaluation_suite)  # a bad suite path fails before the merge, not after it
    out = check_output_dir(out_dir, overwrite)
    state = _distributed_state(config.device)
    ctx = prepare(config, quiet=quiet or (state is not None and not state.is_main_process))
    model, info = execute(ctx)
    if state is not None:
        # Launched with `accelerate launch` / `torchrun`: every process took its shard of the
        # activation statistics; only the main process evaluates, saves and pushes.
        state.wait_for_everyone()
        info["statistics_processes"] = state.num_processes
        if not state.is_main_process:
            return MergeRun(path=out, model=model, info=info, context=ctx, main_process=False)
    results = None
    if config.evaluation_suite:
        from .evaluation import evaluate_model

        results = evaluate_model(
            model,
            config.evaluation_suite,
            processor=ctx.sources[0].image_processor(),
            device=config.device,
            quiet=quiet,
        )
        results = {"method": config.method, "params": _effective_params(ctx.config), **results}
    save_atomically(out, lambda tmp: save_merged_model(ctx, model, info, results, tmp), overwrite)
    run = MergeRun(path=out, model=model, info=info, results=results, context=ctx)
    if push_to_hub:
        from .hub import push_folder

        run.push_url = push_folder(out, push_to_hub, private=private)
    return run


# what ``merge()`` returned -> its context, so that ``save_merged`` can write the card (a weak
# mapping: the model carries no reference that would follow it into pickles or copies)
_MERGE_CONTEXTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def save_merged(
    model: PreTrainedModel,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
) -> MergeRun:
    """Write the complete folder of a model returned by :func:`merge`: weights, config, image
    processor, ``merge_config.yaml`` and the model card, atomically, as ``merge(..., out_dir=...)``
    and ``run_merge`` do (``pipeline("image-classification", model=out_dir)`` loads it); then
    upload it with ``push_to_hub`` (a failed push raises ``hf_vitmerge.hub.PushError`` and keeps
    the folder). An existing non-empty folder is refused unless ``overwrite``.

    ``model.save_pretrained`` writes the weights and config only. Only a model that ``merge()``
    returned in this process can be saved this way (the card needs the merge's inputs)."""
    ctx = _MERGE_CONTEXTS.get(model)
    if ctx is None:
        raise InputError(
            "save_merged: this model was not returned by hf_vitmerge.merge() in this process, so its "
            "inputs are unknown and no model card can be written. Save it with model.save_pretrained(), "
            "or merge with merge(..., out_dir=...)."
        )
    if push_to_hub:
        _check_repo_id(push_to_hub)
    out = check_output_dir(out_dir, overwrite)
    info = getattr(model, "merge_info", {})
    save_atomically(out, lambda tmp: save_merged_model(ctx, model, info, None, tmp), overwrite)
    run = MergeRun(path=out, model=model, info=info, context=ctx)
    if push_to_hub:
        from .hub import push_folder

        run.push_url = push_folder(out, push_to_hub, private=private)
    return run


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise InputError(
            f"--push-to-hub {repo_id!r} is not a Hub repo id ({err}). Write it as `name` or `user/name`."
        ) from None


def _distributed_state(device: str):
    """An ``accelerate`` process state when launched on several processes, else None.

    On CPU, accelerate needs ``cpu=True`` to set up its gloo process group (otherwise every
    process would run alone and each would write the output)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    state = PartialState(cpu=not device.startswith("cuda"))
    if state.num_processes <= 1:
        raise RuntimeError(
            "launched on several processes (WORLD_SIZE > 1) but accelerate found no process group; "
            "launch with `accelerate launch` or `torchrun`"
        )
    return state


# ----------------------------------------------------------------------------- merge()
def merge(
    models: Sequence[str | os.PathLike] | MergeConfig | dict | str | os.PathLike,
    method: str = "average",
    *,
    base_model: str | None = None,
    revisions: Sequence[str | None] | None = None,
    tasks: Sequence[str] | None = None,
    data: Sequence[dict | str | None] | None = None,
    heads: str = "auto",
    seed: int = 0,
    device: str = "cpu",
    calibration: dict | None = None,
    out_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    **parameters,
) -> PreTrainedModel:
    """Merge ViTs and return the merged model, a ``transformers.PreTrainedModel``.

    ``models`` is a list of at least two Hub ids / folders, or a whole config (dict, YAML
    path, ``MergeConfig``), in which case the other merge arguments are ignored. Method
    parameters are keyword arguments, e.g. ``merge(ids, "task_arithmetic", base_model=b,
    scaling=0.4)``. ``revisions``, ``tasks`` and ``data`` are lists parallel to ``models``.

    With ``out_dir`` the complete model folder is written too, atomically (weights, config,
    image processor, ``merge_config.yaml`` and the model card), ready for
    ``pipeline("image-classification", model=out_dir)``; an existing non-empty folder is
    refused unless ``overwrite``. Without it, :func:`save_merged` writes the same folder later
    (and can push it). The input models are released when the merge is done; the result carries
    only ``merge_info`` (timings and method facts).
    """
    config = _merge_config(
        models, method, base_model, revisions, tasks, data, heads, seed, device, calibration, parameters
    )
    if out_dir is None:
        ctx = prepare(config, quiet=quiet)
        model, info = execute(ctx)
    else:
        run = run_merge(config, out_dir, overwrite=overwrite, quiet=quiet)
        model, info, ctx = run.model, run.info, run.context
    model.merge_info = info
    _MERGE_CONTEXTS[model] = ctx
    return model


def _merge_config(
    models, method, base_model, revisions, tasks, data, heads, seed, device, calibration, parameters
):
    """The validated config of a ``merge()`` call (argument errors name the argument)."""
    if isinstance(models, (MergeConfig, dict)) or (
        isinstance(models, (str, os.PathLike)) and str(models).endswith((".yaml", ".yml"))
    ):
        return load_config(models)
    if isinstance(models, (str, os.PathLike)):
        raise InputError(
            f"merge(models=...) got the single string {str(models)!r}: pass a list of at least two model ids "
            f"or folders, e.g. merge([{str(models)!r}, 'other/model'], ...), or a config (YAML path, dict)"
        )
    if not isinstance(models, Sequence):
        raise InputError(
            f"merge(models=...) must be a list of model ids or folders, got {type(models).__name__}"
        )
    models = list(models)
    if len(models) < 2:
        raise InputError(f"merge() needs at least two models to merge, got {len(models)}: {models}")
    for name, values in (("revisions", revisions), ("tasks", tasks), ("data", data)):
        if values is None:
            continue
        if isinstance(values, (str, os.PathLike, dict)) or not isinstance(values, Sequence):
            raise InputError(f"merge({name}=...) must be a list with one entry per model, got {values!r}")
        if len(values) != len(models):
            raise InputError(
                f"merge() got {len(values)} {name} for {len(models)} models: give one per model "
                f"(None where there is none)"
            )
    entries = []
    for i, ref in enumerate(models):
        entry: dict = {"model": str(ref)}
        if revisions is not None:
            entry["revision"] = revisions[i]
        if tasks is not None:
            entry["task"] = tasks[i]
        if data is not None and data[i] is not None:
            entry["data"] = {"path": str(data[i])} if isinstance(data[i], (str, os.PathLike)) else data[i]
        entries.append(entry)
    return load_config(
        {
            "method": method,
            "base_model": base_model,
            "models": entries,
            "parameters": parameters,
            "heads": heads,
            "seed": seed,
            "device": device,
            "calibration": calibration or {},
        }
    )


# ----------------------------------------------------------------------------- suites -> configs
def suite_config(
    suite: Suite | str,
    method: str,
    parameters: dict | None = None,
    *,
    heads: str = "auto",
    seed: int = 0,
    samples_per_task: int = 256,
    device: str = "cpu",
    tasks: list[str] | None = None,
) -> MergeConfig:
    """A merge config covering every task of a suite (train splits as calibration data).

    A ``heal`` entry in ``parameters`` (as in ``zipit[heal={steps: 300}]``; ``true`` for the
    defaults) becomes the config's ``heal:`` section."""
    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    chosen = [suite.task(t) for t in tasks] if tasks else suite.tasks
    parameters = dict(parameters or {})
    heal = parameters.pop("heal", None)
    heal = {} if heal is True else (None if heal is False else heal)
    return load_config(
        {
            "method": method,
            "base_model": str(suite.base_model) if suite.base_model else None,
            "models": [
                {
                    "model": str(t.model),
                    "task": t.name,
                    "data": {
                        "path": str(t.train),
                        "image_column": t.image_column,
                        "label_column": t.label_column,
                    },
                }
                for t in chosen
            ],
            "parameters": parameters,
            "heads": heads,
            "heal": heal,
            "seed": seed,
            "device": device,
            "calibration": {"samples_per_task": samples_per_task},
        }
    )


_METHOD_ITEM = re.compile(r"^\s*([\w-]+)\s*(?:\[(.*)\])?\s*$")


def parse_methods(text: str) -> list[tuple[str, dict]]:
    """Parse ``"average,zipit[stop_block=0.5],ties[density=0.2;scaling=1]"``."""
    items, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    out = []
    for item in filter(str.strip, items):
        m = _METHOD_ITEM.match(item)
        if not m:
            raise InputError(f"cannot parse method {item!r}; write name or name[key=value;key=value]")
        params = {}
        for kv in filter(str.strip, (m.group(2) or "").split(";")):
            if "=" not in kv:
                raise InputError(f"method {item!r}: parameter {kv!r} must be key=value")
            k, v = kv.split("=", 1)
            if re.search(r",\s*[A-Za-z_]\w*\s*=", v):
                raise InputError(
                    f"method {item!r}: separate parameters with ';', not ',' (e.g. {m.group(1)}[a=1;b=2])"
                )
            params[k.strip()] = yaml.safe_load(v)
        out.append((m.group(1), params))
    return out


class _PeakRSS:
    """Samples this process's resident memory in a thread; ``peak_mb`` after exit."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return round(self.peak / 2**20, 1)


_ACCURACY_FIELDS = ("per_task_accuracy", "avg_task_accuracy", "normalized_accuracy", "joint_accuracy")


def parse_seeds(text: str | int | list[int] | tuple[int, ...]) -> list[int]:
    """``"0,1,2"`` (or an int, or a list) -> ``[0, 1, 2]``; duplicates and non-integers are errors."""
    if isinstance(text, int):
        return [text]
    items = [s.strip() for s in text.split(",") if s.strip()] if isinstance(text, str) else list(text)
    try:
        seeds = [int(s) for s in items]
    except (TypeError, ValueError):
        raise InputError(f"--seeds must be comma-separated integers such as 0,1,2, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise InputError(f"--seeds must list distinct integers such as 0,1,2, got {text!r}")
    return seeds


def _run_one(config: MergeConfig, suite: Suite, *, device: str, quiet: bool) -> dict:
    """One merge of a bench: merge, time, evaluate; the per-seed result fields."""
    from .evaluation import evaluate_model

    ctx = prepare(config, quiet=quiet)
    start = time.perf_counter()
    with _PeakRSS() as mem:
        model, info = execute(ctx)
    total = time.perf_counter() - start
    scores = evaluate_model(
        model, suite, processor=ctx.sources[0].image_processor(), device=device, quiet=quiet
    )
    stats_s = info.get("stats_seconds", 0.0)
    run = {
        "seed": config.seed,
        "params": _effective_params(ctx.config),
        **{k: scores[k] for k in _ACCURACY_FIELDS},
        "merge_seconds": round(total - stats_s, 3),
        "stats_seconds": round(stats_s, 3),
        "peak_rss_mb": mem.peak_mb,
        "num_parameters": scores["num_parameters"],
        "throughput_img_s": scores.get("throughput_img_s"),
        "info": {
            **{k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))},
            "model_class": type(model).__name__,
        },
    }
    if "auto" in info:  # the `auto` search of this seed: candidates and their validation scores
        run["auto"] = info["auto"]
    return run


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (0.0 for one value); ``None`` where any value is ``None``."""
    if any(v is None for v in values):
        return None, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate_seeds(method: str, runs: list[dict], *, with_seeds: bool = True) -> dict:
    """One bench result from per-seed runs: accuracies are means, with ``*_std`` and ``per_seed``.

    Without ``with_seeds`` (a plain single-seed bench) the one run is returned as it is.
    """
    if not with_seeds:
        run = dict(runs[0])
        run.pop("seed")
        return {"method": method, **run}
    tasks = list(runs[0]["per_task_accuracy"])
    result = {"method": method, "params": runs[0]["params"], "seeds": [r["seed"] for r in runs]}
    per_task = {t: _mean_std([r["per_task_accuracy"][t] for r in runs]) for t in tasks}
    result["per_task_accuracy"] = {t: mean for t, (mean, _) in per_task.items()}
    result["per_task_accuracy_std"] = {t: std for t, (_, std) in per_task.items()}
    for key in ("avg_task_accuracy", "normalized_accuracy", "joint_accuracy"):
        result[key], result[f"{key}_std"] = _mean_std([r[key] for r in runs])
    for key in ("merge_seconds", "stats_seconds", "peak_rss_mb"):
        result[key] = round(statistics.fmean(r[key] for r in runs), 3)
    result["num_parameters"] = runs[0]["num_parameters"]
    rates = [r.get("throughput_img_s") for r in runs]
    result["throughput_img_s"] = round(statistics.fmean(rates), 1) if None not in rates else None
    result["info"] = runs[0]["info"]
    result["per_seed"] = [
        {
            k: r[k]
            for k in ("seed", "params", *_ACCURACY_FIELDS, "merge_seconds", "stats_seconds", "auto")
            if k in r
        }
        for r in runs
    ]
    return result


def bench(
    suite_path: str | os.PathLike,
    methods: str | list[tuple[str, dict]],
    *,
    json_path: str | os.PathLike | None = None,
    markdown_path: str | os.PathLike | None = None,
    heads: str = "auto",
    seed: int = 0,
    seeds: str | list[int] | None = None,
    samples_per_task: int = 256,
    device: str = "cpu",
    quiet: bool = False,
) -> dict:
    """Run several methods on one suite; return (and write) the INTERFACES.md §4 results.

    With ``seeds`` every method runs once per seed (calibration sample, random drops, gate
    training: everything random follows the seed) and its result holds the means, the
    standard deviations and each seed's figures. Every method spec is turned into a validated
    config before the first merge runs, so a typo in the last method fails at once.
    """
    from .evaluation import reference_results

    check_device(device)
    for path, what in ((json_path, "--json"), (markdown_path, "--markdown")):
        if path:
            check_writable(path, what)
    suite = load_suite(suite_path)
    seed_list = parse_seeds(seeds) if seeds is not None else [seed]
    items = parse_methods(methods) if isinstance(methods, str) else list(methods)
    plans = [
        (
            name,
            [
                suite_config(
                    suite, name, params, heads=heads, seed=s, samples_per_task=samples_per_task, device=device
                )
                for s in seed_list
            ],
        )
        for name, params in items
    ]
    report = {
        "suite": suite.name,
        "hf_vitmerge_version": __version__,
        "seeds": seed_list,
        "reference": reference_results(suite, device=device, quiet=quiet),
        "results": [],
    }
    for name, configs in plans:
        runs = [_run_one(config, suite, device=device, quiet=quiet) for config in configs]
        report["results"].append(aggregate_seeds(name, runs, with_seeds=seeds is not None))
    if json_path:
        _write_text(Path(json_path), json.dumps(report, indent=2))
    if markdown_path:
        _write_text(Path(markdown_path), results_markdown(report))
    return report


def _effective_params(config: MergeConfig) -> dict:
    """The method's parameters with its defaults filled in (what the merge really used)."""
    from .methods import get_method

    if config.groups or config.method == "per_group":
        params = dict(config.parameters)
    else:
        params = get_method(config.method).validate_params(config.parameters)
    if config.heal is not None:
        params["heal"] = config.heal.model_dump()
    return params


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt(x, digits: int = 3, std: float | None = None) -> str:
    if x is None:
        return "–"
    text = f"{x:.{digits}f}" if isinstance(x, float) else str(x)
    return f"{text} ± {std:.{digits}f}" if std is not None else text


def _params_text(result: dict) -> str:
    """``k=v, ...``; a value that differs between seeds (an ``auto`` choice) shows each seed's."""
    runs = result.get("per_seed") or [result]
    parts = []
    for key, value in result["params"].items():
        values = [run["params"].get(key, value) for run in runs]
        shown = "/".join(str(v) for v in values) if len(set(map(str, values))) > 1 else str(value)
        parts.append(f"{key}={shown}")
    return ", ".join(parts)


def results_markdown(report: dict) -> str:
    """A markdown table of a bench report (one row per reference and method)."""
    tasks = list(report["reference"]["individual"]["per_task_accuracy"])
    head = ["method", "params", "avg acc", "normalized", "joint", *tasks, "merge s", "stats s", "peak RSS MB"]
    rows = []
    for ref in ("individual", "ensemble"):
        r = report["reference"][ref]
        rows.append(
            [
                f"*{ref}*",
                "",
                _fmt(r["avg_task_accuracy"]),
                "1.000" if ref == "individual" else "–",
                _fmt(r.get("joint_accuracy")),
                *[_fmt(r["per_task_accuracy"][t]) for t in tasks],
                "",
                "",
                "",
            ]
        )
    for r in report["results"]:
        params = _params_text(r)
        rows.append(
            [
                r["method"],
                params,
                _fmt(r["avg_task_accuracy"], std=r.get("avg_task_accuracy_std")),
                _fmt(r["normalized_accuracy"], std=r.get("normalized_accuracy_std")),
                _fmt(r["joint_accuracy"], std=r.get("joint_accuracy_std")),
                *[
                    _fmt(r["per_task_accuracy"].get(t), std=r.get("per_task_accuracy_std", {}).get(t))
                    for t in tasks
                ],
                _fmt(r["merge_seconds"]),
                _fmt(r["stats_seconds"]),
                _fmt(r["peak_rss_mb"], 0),
            ]
        )
    lines = [
        f"Suite `{report['suite']}` (hf_vitmerge {report['hf_vitmerge_version']})"
        + (f"; mean ± std over seeds {report['seeds']}" if len(report.get("seeds", [])) > 1 else ""),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
