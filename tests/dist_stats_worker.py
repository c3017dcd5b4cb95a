"""Worker for the multi-process statistics test (launched by tests/test_stats.py via torchrun).

Usage: torchrun --nproc_per_node 2 --standalone tests/dist_stats_worker.py OUT_DIR DATA MODEL [MODEL ...]
       [--accelerate]
Each rank saves its (all-reduced) statistics to OUT_DIR/rank{r}.safetensors.
"""

from __future__ import annotations

import sys

import torch


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    use_accelerate = "--accelerate" in argv
    out, data_path, *model_dirs = [a for a in argv if a != "--accelerate"]
    from transformers import AutoImageProcessor, ViTForImageClassification

    from hf_vitmerge.arch import ViTAdapter
    from hf_vitmerge.data import load_task_data
    from hf_vitmerge.stats import collect_joint_stats, save_stats, statistics_points

    accelerator = None
    if use_accelerate:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        rank = accelerator.process_index
    else:
        torch.distributed.init_process_group("gloo")
        rank = torch.distributed.get_rank()
    models = [ViTForImageClassification.from_pretrained(d).eval() for d in model_dirs]
    processors = [AutoImageProcessor.from_pretrained(d) for d in model_dirs]
    data = load_task_data(data_path)
    points = statistics_points(ViTAdapter.from_model(models[0]), ("residual", "qk", "vo", "mlp"))
    stats = collect_joint_stats(
        models, [data], processors, points, batch_size=4, accelerator=accelerator, quiet=True
    )
    save_stats(stats, f"{out}/rank{rank}.safetensors")
    # Both launch paths end the process group before exit: a gloo group left alive at interpreter
    # shutdown can abort the worker ("terminate called without an active exception").
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
