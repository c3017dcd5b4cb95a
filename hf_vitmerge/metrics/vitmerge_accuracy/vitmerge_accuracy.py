"""hf_vitmerge accuracy: per-task, average and normalized accuracy of a merged model.

A local `evaluate` module (load it by path with
``evaluate.load(hf_vitmerge.evaluation.METRIC_PATH)``), so nothing is fetched from the Hub.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy of a merged model on several tasks. Each example carries its task index; the metric
returns the accuracy on every task, their mean, and, when the individual models' accuracies
are given, the normalized accuracy: the mean over tasks of merged / individual accuracy
(as in the model-merging literature, e.g. TIES-Merging and ZipIt!).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted label index, within the example's task.
    references (list of int): true label index, within the example's task.
    tasks (list of int): task index of each example.
    task_names (list of str, optional): names of the tasks, by index.
    individual (dict of str to float, optional): each task's individual-model accuracy; tasks whose
        individual accuracy is 0 cannot be normalised and are left out of normalized_accuracy.
Returns:
    per_task_accuracy (dict), avg_task_accuracy (float), normalized_accuracy (float or None),
    accuracy (float): accuracy over all examples pooled.
Examples:
    >>> m = evaluate.load("path/to/vitmerge_accuracy")
    >>> m.compute(predictions=[0, 1, 1], references=[0, 1, 0], tasks=[0, 0, 1], task_names=["a", "b"])
    {'per_task_accuracy': {'a': 1.0, 'b': 0.0}, 'avg_task_accuracy': 0.5, 'normalized_accuracy': None, 'accuracy': 0.6666666666666666}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VitmergeAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                    "tasks": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, tasks, task_names=None, individual=None):
        predictions, references, tasks = (np.asarray(x) for x in (predictions, references, tasks))
        correct = predictions == references
        ids = sorted(set(tasks.tolist()))
        names = task_names or [str(i) for i in ids]
        per_task = {names[t]: float(correct[tasks == t].mean()) for t in ids}
        avg = float(np.mean(list(per_task.values())))
        normalized = None
        if individual:
            ratios = [per_task[n] / individual[n] for n in per_task if individual.get(n)]
            normalized = float(np.mean(ratios)) if ratios else None
        return {
            "per_task_accuracy": per_task,
            "avg_task_accuracy": avg,
            "normalized_accuracy": normalized,
            "accuracy": float(correct.mean()),
        }
