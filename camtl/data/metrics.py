"""GLUE metrics in numpy: MCC (CoLA), Pearson and Spearman (STS-B), F1 and accuracy (MRPC, QQP), accuracy (rest).

Conventions (those of scikit-learn and scipy, which we do not depend on):

- classification predictions are class ids [N], or scores/logits [N, C] (argmax taken);
- F1 is for the positive class id 1; with no predicted and no true positives it is 0;
- MCC is the multi-class (Gorodkin) form, equal to the binary formula for 2 classes; 0 when undefined
  (a constant prediction or a constant truth);
- Spearman is the Pearson correlation of the ranks, ties getting the average of their ranks;
- Pearson/Spearman are NaN when undefined (a constant input, or non-finite predictions): reported as measured.
"""

from __future__ import annotations

from typing import Dict, Union

import numpy as np

from camtl.data.tasks import METRIC_NAMES, TaskSpec, glue_task


def _class_ids(predictions, labels):
    p = np.asarray(predictions)
    y = np.asarray(labels)
    if p.ndim == 2:  # scores or logits
        p = p.argmax(axis=-1)
    if p.ndim != 1 or y.ndim != 1 or len(p) != len(y):
        raise ValueError(f"predictions {np.shape(predictions)} and labels {np.shape(labels)} do not match: "
                         "expected [N] or [N, C] predictions and [N] labels")
    if len(y) == 0:
        raise ValueError("no examples to score")
    for name, a in (("predictions", p), ("labels", y)):
        if not (np.issubdtype(a.dtype, np.integer) or (np.issubdtype(a.dtype, np.floating) and
                                                        np.all(np.isfinite(a)) and np.all(a == np.round(a)))):
            raise ValueError(f"{name} must be class ids (integers), got dtype {a.dtype}")
    return p.astype(np.int64), y.astype(np.int64)


def _values(predictions, labels):
    p = np.asarray(predictions, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] == 1:  # a regression head's [N, 1] output
        p = p[:, 0]
    if p.ndim != 1 or y.ndim != 1 or len(p) != len(y):
        raise ValueError(f"predictions {np.shape(predictions)} and labels {np.shape(labels)} do not match: "
                         "expected [N] or [N, 1] predictions and [N] labels")
    if len(y) == 0:
        raise ValueError("no examples to score")
    return p, y


def accuracy(predictions, labels) -> float:
    p, y = _class_ids(predictions, labels)
    return float(np.mean(p == y))


def f1(predictions, labels, positive: int = 1) -> float:
    """Binary F1 of class ``positive``: 2·TP / (2·TP + FP + FN); 0 when there are no positives at all."""
    p, y = _class_ids(predictions, labels)
    tp = np.sum((p == positive) & (y == positive))
    fp = np.sum((p == positive) & (y != positive))
    fn = np.sum((p != positive) & (y == positive))
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else 0.0


def matthews_corrcoef(predictions, labels) -> float:
    """MCC from the confusion matrix C: (c·s − Σ p_k t_k) / sqrt((s² − Σ p_k²)(s² − Σ t_k²)).

    s: examples, c: correct ones, p_k / t_k: how often class k is predicted / true. 0 when undefined.
    """
    p, y = _class_ids(predictions, labels)
    k = int(max(p.max(), y.max())) + 1
    conf = np.zeros((k, k), dtype=np.float64)
    np.add.at(conf, (y, p), 1.0)
    t_k, p_k = conf.sum(axis=1), conf.sum(axis=0)
    c, s = np.trace(conf), conf.sum()
    cov_ytp = c * s - p_k @ t_k
    cov_pp = s * s - p_k @ p_k
    cov_yy = s * s - t_k @ t_k
    denom = np.sqrt(cov_pp * cov_yy)
    return float(cov_ytp / denom) if denom > 0 else 0.0


def rankdata(a) -> np.ndarray:
    """1-based ranks of ``a``; tied values share the average of the ranks they span (scipy's 'average')."""
    a = np.asarray(a, dtype=np.float64)
    order = np.argsort(a, kind="mergesort")
    s = a[order]
    new = np.r_[True, s[1:] != s[:-1]]  # first position of each run of equal values
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(s)]  # one past each run's last position
    run_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(len(a), dtype=np.float64)
    ranks[order] = run_rank[np.cumsum(new) - 1]
    return ranks


def pearson(predictions, labels) -> float:
    p, y = _values(predictions, labels)
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(y))):
        return float("nan")
    dp, dy = p - p.mean(), y - y.mean()
    denom = np.sqrt((dp @ dp) * (dy @ dy))
    if denom == 0:
        return float("nan")
    return float(np.clip((dp @ dy) / denom, -1.0, 1.0))


def spearman(predictions, labels) -> float:
    p, y = _values(predictions, labels)
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(y))):
        return float("nan")
    return pearson(rankdata(p), rankdata(y))


def compute_metric(metric: str, predictions, labels) -> Dict[str, float]:
    """One metric group by name (a key of ``METRIC_NAMES``) -> {metric key: value}."""
    if metric == "accuracy":
        return {"accuracy": accuracy(predictions, labels)}
    if metric == "mcc":
        return {"mcc": matthews_corrcoef(predictions, labels)}
    if metric == "f1_accuracy":
        return {"f1": f1(predictions, labels), "accuracy": accuracy(predictions, labels)}
    if metric == "pearson_spearman":
        return {"pearson": pearson(predictions, labels), "spearman": spearman(predictions, labels)}
    raise KeyError(f"unknown metric {metric!r}; known: {sorted(METRIC_NAMES)}")


def compute_metrics(task: Union[str, TaskSpec], predictions, labels) -> Dict[str, float]:
    """The GLUE metrics of ``task``: a TaskSpec, or a GLUE task name (``"cola"``, ``"mnli-mm"``, ``"STS-B"``...).

    Returns e.g. ``{"mcc": ...}`` (CoLA), ``{"pearson": ..., "spearman": ...}`` (STS-B),
    ``{"f1": ..., "accuracy": ...}`` (MRPC, QQP), ``{"accuracy": ...}`` (the rest).
    """
    spec = task if isinstance(task, TaskSpec) else glue_task(task)
    return compute_metric(spec.metric, predictions, labels)
