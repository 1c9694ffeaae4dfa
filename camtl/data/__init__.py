"""Data: task specs (GLUE and user TSV/JSONL), readers, the multi-task dataset and collator, GLUE metrics,
and the generated toy tasks (``camtl.data.toy``).

- :mod:`camtl.data.tasks`: :class:`TaskSpec`, :data:`GLUE_TASKS`, :func:`glue_task`, :func:`check_safe_name`;
- :mod:`camtl.data.dataset`: :func:`read_examples`, :func:`encode_examples`, :class:`MultiTaskDataset`,
  :class:`DynamicPaddingCollator`, :class:`PackingCollator` (padding-free), :func:`split_by_token_budget`,
  :func:`token_budget_bounds`;
- :mod:`camtl.data.metrics`: :func:`compute_metrics`;
- :mod:`camtl.data.toy`: :func:`~camtl.data.toy.write`.
"""

from camtl.data import toy
from camtl.data.dataset import (DataFormatError, DynamicPaddingCollator, Encodings, Example, MultiTaskDataset,
                                PackingCollator, TaskSplit, encode_examples, eval_datasets, read_examples,
                                split_by_token_budget, token_budget_bounds)
from camtl.data.metrics import compute_metric, compute_metrics
from camtl.data.tasks import (GLUE_SUBMISSION_FILES, GLUE_TASKS, METRIC_NAMES, TaskSpec, TestLayout,
                              check_safe_name, glue_task, load_task_specs, save_task_specs)

__all__ = [
    "TaskSpec", "TestLayout", "GLUE_TASKS", "GLUE_SUBMISSION_FILES", "METRIC_NAMES", "glue_task",
    "load_task_specs", "save_task_specs", "check_safe_name",
    "Example", "DataFormatError", "read_examples", "encode_examples", "Encodings", "TaskSplit",
    "MultiTaskDataset", "eval_datasets", "DynamicPaddingCollator", "PackingCollator",
    "split_by_token_budget", "token_budget_bounds",
    "compute_metrics", "compute_metric", "toy",
]
