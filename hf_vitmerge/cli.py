"""``hf-vitmerge``: a thin command line over the public Python API."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path

EPILOG = "Docs: README.md. Every command accepts --quiet to silence progress bars."


def _add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars or informational logs")


def _add_demo_command(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="compare merge methods on the default suite, write the recommended merged model",
        description="The main job on the embedded default: builds (or reuses from the cache) the "
        "hub-tasks suite, merges it with several methods side by side (averaging, task arithmetic, TIES, "
        "RegMean, gated), evaluates each against the individual models and their ensemble, and writes the "
        "recommended merged model (pipeline-ready, with its model card) and a results table.",
    )
    p.add_argument("--out", default="hf-vitmerge-demo", help="output folder (default: ./hf-vitmerge-demo)")
    p.add_argument("--size", default="tiny", choices=["tiny", "small"], help="zoo size (default tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing merged model in --out")
    _add_quiet(p)


def _add_zoo_command(sub) -> None:
    zoo = sub.add_parser("zoo", help="the embedded benchmark suites").add_subparsers(
        dest="zoo_command", required=True
    )
    _add_quiet(zoo.add_parser("list", help="list the suites"))
    p = zoo.add_parser(
        "build",
        help="train a suite's models on this machine",
        description="Builds a suite: real ViTForImageClassification models trained here, saved as "
        "Hugging Face model folders, their datasets and DIR/suite.json. Deterministic per seed; cached.",
    )
    p.add_argument("suite")
    p.add_argument("--out", default=None, help="output folder (default: the hf_vitmerge cache)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="tiny", choices=["tiny", "small", "base"])
    p.add_argument("--overwrite", action="store_true", help="rebuild over a different existing build")
    _add_quiet(p)


def _add_merge_command(sub) -> None:
    from .methods import available_methods

    p = sub.add_parser(
        "merge",
        help="run one merge described by a YAML config",
        description="Runs one merge described by a YAML config (INTERFACES.md section 3) and writes "
        "the merged model folder with its README.md model card. Methods: "
        + ", ".join(available_methods())
        + ".",
    )
    p.add_argument("config", help="merge config (YAML)")
    p.add_argument("--out", required=True, help="output folder for the merged model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument(
        "--push-to-hub", metavar="REPO_ID", default=None, help="upload the merged folder to this repo"
    )
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="device for forward passes")
    p.add_argument(
        "--evaluate", metavar="SUITE_JSON", default=None, help="evaluate on a suite and put it in the card"
    )
    _add_quiet(p)


def _add_evaluate_command(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="per-task, joint and normalized accuracy of a model on a suite",
        description="Per-task, joint and normalized accuracy of a model folder or Hub id on a suite. "
        "Code shipped inside a model folder or repo runs only with --trust-remote-code; the merged "
        "model classes of hf_vitmerge itself are registered by the package and need no flag.",
    )
    p.add_argument("model", help="model folder or Hub id")
    p.add_argument("--suite", required=True, help="suite.json")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow running Python code shipped with the model (only for models you trust)",
    )
    _add_quiet(p)


def _add_bench_command(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="run several methods on one suite",
        description="Runs several methods on one suite and writes INTERFACES.md section 4 JSON and a "
        "markdown table. Parameters: --methods 'average,zipit[stop_block=0.5],ties[density=0.2]'.",
    )
    p.add_argument("suite", help="suite.json")
    p.add_argument("--methods", required=True, help="comma-separated methods, optional [key=value;...] each")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--heads", default="auto", choices=["auto", "shared", "union", "multi"])
    p.add_argument("--seed", type=int, default=0, help="the seed of a single-seed bench")
    p.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds, e.g. 0,1,2: every method runs once per seed and the report "
        "gives mean ± std and each seed's results (overrides --seed)",
    )
    p.add_argument("--samples-per-task", type=int, default=256)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    _add_quiet(p)


def _add_inspect_command(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="mergeability diagnostics: per-layer similarity and distance metrics",
        description="Per block and layer group: L2 distance, cosine similarity, soft sign "
        "dissimilarity and its truncated form (on task vectors when --base is given), as JSON, a "
        "markdown table and a heatmap PNG.",
    )
    p.add_argument("models", nargs="+", help="two or more model folders or Hub ids")
    p.add_argument("--base", default=None, help="shared pre-trained model (metrics on task vectors)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--topk", type=float, default=0.2, help="fraction of largest entries kept by the truncated metric"
    )
    _add_quiet(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-vitmerge",
        description="Merge Hugging Face Vision Transformers fine-tuned for different tasks or domains.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"hf_vitmerge {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo_command(sub)
    _add_zoo_command(sub)
    _add_merge_command(sub)
    _add_evaluate_command(sub)
    _add_bench_command(sub)
    _add_inspect_command(sub)
    return parser


def _version() -> str:
    from ._version import __version__

    return __version__


def _say(quiet: bool, *lines: str) -> None:
    if not quiet:
        print("\n".join(lines))


def _cmd_demo(args: argparse.Namespace) -> int:
    """`hf-vitmerge demo`."""
    import hf_vitmerge as hv

    out = hv.demo(args.out, size=args.size, seed=args.seed, overwrite=args.overwrite, quiet=args.quiet)
    print(Path(out["results_md"]).read_text())
    print(
        f"suite:         {out['suite']}\nmerged model:  {out['model']}  "
        f"({out['report']['recommended']['method']}; load with "
        f"pipeline('image-classification', model=...))\nmodel card:    {out['model']}/README.md\n"
        f"results:       {out['results_json']}\n               {out['results_md']}"
    )
    return 0


def _cmd_zoo(args: argparse.Namespace) -> int:
    """`hf-vitmerge zoo`."""
    from .zoo import build_suite, list_suites

    if args.zoo_command == "list":
        for s in list_suites():
            print(f"{s['name']:<16} {s['init']:<12} {s['num_tasks']:>2} tasks  {s['description']}")
        return 0
    if args.out:
        from .checks import check_writable

        check_writable(args.out, "--out")
    path = build_suite(
        args.suite, args.out, size=args.size, seed=args.seed, quiet=args.quiet, overwrite=args.overwrite
    )
    print(f"suite written: {path}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    """`hf-vitmerge merge`."""
    import hf_vitmerge as hv

    run = hv.run_merge(
        args.config,
        args.out,
        overwrite=args.overwrite,
        push_to_hub=args.push_to_hub,
        private=args.private,
        device=args.device,
        evaluation_suite=args.evaluate,
        quiet=args.quiet,
    )
    if not run.main_process:
        return 0
    _say(args.quiet, f"merged model written to {run.path} (model card: {run.path}/README.md)")
    if run.results:
        print(
            json.dumps(
                {
                    k: run.results[k]
                    for k in (
                        "per_task_accuracy",
                        "avg_task_accuracy",
                        "normalized_accuracy",
                        "joint_accuracy",
                    )
                },
                indent=2,
            )
        )
    if run.push_url:
        print(f"pushed to {run.push_url}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    """`hf-vitmerge evaluate`."""
    import hf_vitmerge as hv

    from .checks import check_writable

    if args.json:
        check_writable(args.json, "--json")
    res = hv.evaluate_model(
        args.model,
        args.suite,
        batch_size=args.batch_size,
        device=args.device,
        quiet=args.quiet,
        trust_remote_code=args.trust_remote_code,
    )
    res = {"model": args.model, "suite": args.suite, **res}
    text = json.dumps(res, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    print(text)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    """`hf-vitmerge bench`."""
    import hf_vitmerge as hv

    report = hv.bench(
        args.suite,
        args.methods,
        json_path=args.json,
        markdown_path=args.markdown,
        heads=args.heads,
        seed=args.seed,
        seeds=args.seeds,
        samples_per_task=args.samples_per_task,
        device=args.device,
        quiet=args.quiet,
    )
    from .api import results_markdown

    print(results_markdown(report))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    """`hf-vitmerge inspect`."""
    from .checks import check_writable
    from .diagnostics import inspect_models

    check_writable(args.out, "--out")
    inspect_models(args.models, base=args.base, out_dir=args.out, topk=args.topk, quiet=args.quiet)
    for name in ("metrics.json", "metrics.md", "heatmap.png"):
        print(Path(args.out) / name)
    return 0


_COMMANDS = {
    "demo": _cmd_demo,
    "zoo": _cmd_zoo,
    "merge": _cmd_merge,
    "evaluate": _cmd_evaluate,
    "bench": _cmd_bench,
    "inspect": _cmd_inspect,
}


def _run(args: argparse.Namespace) -> int:
    return _COMMANDS[args.command](args)


def _user_errors() -> tuple[type[BaseException], ...]:
    """What the command line reports as a one-paragraph error: hf_vitmerge's own error classes
    (bad input, bad config, failed push; see :mod:`hf_vitmerge.errors`). Anything else is a bug
    and shows its traceback."""
    from .errors import HFVitMergeError

    return (HFVitMergeError,)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "quiet", False):
        import datasets
        import huggingface_hub
        import transformers

        os.environ["TQDM_DISABLE"] = "1"
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        datasets.disable_progress_bars()
        huggingface_hub.utils.disable_progress_bars()
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _user_errors() as err:
        msg = str(err).strip() or type(err).__name__
        print(f"hf-vitmerge {args.command}: error: " + textwrap.indent(msg, "  ").lstrip(), file=sys.stderr)
        if os.environ.get("HF_VITMERGE_DEBUG"):
            raise
        return 2


if __name__ == "__main__":
    sys.exit(main())
