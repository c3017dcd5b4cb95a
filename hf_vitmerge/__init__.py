"""hf_vitmerge: merge Hugging Face Vision Transformers fine-tuned for different tasks and domains.

Public API::

    import hf_vitmerge as hv
    sources = hv.load_models(["org/vit-a", "./vit-b"], revisions=["v1", None])
    model = hv.merge(["org/vit-a", "./vit-b"], method="task_arithmetic", base_model="org/vit-base", scaling=0.3,
                     out_dir="merged")  # out_dir: also write the complete folder (weights, processor, card)
    hv.save_merged(model, "merged-copy", push_to_hub="me/vit-ab")  # the same folder, later (and a push)
    run = hv.run_merge("examples/shapes-tasks-ties.yaml", "out/ties")
    scores = hv.evaluate_model("out/ties", "zoo/shapes-tasks/suite.json")
"""

from . import modeling  # noqa: E402,F401  (registers merged-model classes with the Auto classes)
from ._version import __version__
from .api import bench, merge, run_merge, save_merged, suite_config  # noqa: E402
from .arch import IncompatibleModelError, MergeGroup, ViTAdapter  # noqa: E402
from .config import MergeConfig, load_config  # noqa: E402
from .errors import ConfigError, HFVitMergeError, InputError, OutputError  # noqa: E402
from .evaluation import evaluate_model, reference_results  # noqa: E402
from .loading import ModelLoadError, ModelSource, load_models, resolve_model  # noqa: E402
from .merging import MergeContext, MergeResult  # noqa: E402
from .methods import available_methods, get_method, merge_method  # noqa: E402
from .showcase import demo  # noqa: E402

__all__ = [
    "__version__",
    "ConfigError",
    "HFVitMergeError",
    "InputError",
    "OutputError",
    "IncompatibleModelError",
    "MergeConfig",
    "MergeContext",
    "MergeGroup",
    "MergeResult",
    "ModelLoadError",
    "ModelSource",
    "ViTAdapter",
    "available_methods",
    "bench",
    "demo",
    "evaluate_model",
    "get_method",
    "load_config",
    "load_models",
    "merge",
    "merge_method",
    "reference_results",
    "resolve_model",
    "run_merge",
    "save_merged",
    "suite_config",
]
