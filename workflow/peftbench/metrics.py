"""GLUE dev-set metrics, computed with scikit-learn and scipy (no download at run time).

CoLA: Matthews correlation (Matthews 1975) and accuracy; STS-B: Pearson and Spearman correlation
of the regression output with the gold score; MRPC/QQP: accuracy and F1 of the positive class;
every other task: accuracy. Values are fractions, not percentages.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from .vocab import TaskSpec, split_suffix


def compute_metrics(task: TaskSpec, logits: np.ndarray, labels: np.ndarray, split: str) -> dict[str, float]:
    """Score one evaluation split.

    Args:
        task: the task's spec (decides metric set and whether it is a regression).
        logits: ``(n, num_labels)`` model outputs; STS-B ``(n, 1)`` or ``(n,)`` scores.
        labels: ``(n,)`` gold class ids (int) or scores (float, STS-B).
        split: the eval split's name; for MNLI its suffix is appended to every metric name.

    Returns:
        ``{metric_name: value}`` with the names of :meth:`TaskSpec.metric_names`.

    Raises:
        ValueError: lengths differ or the split is empty.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(f"{task.name}/{split}: {len(logits)} predictions for {len(labels)} labels")
    out: dict[str, float] = {}
    if task.is_regression:
        pred = logits.reshape(len(logits), -1)[:, 0]
        gold = labels.astype(np.float64)
        # A constant prediction (e.g. a collapsed model) has no correlation: report 0, not NaN.
        const = np.ptp(pred) == 0 or np.ptp(gold) == 0
        out["pearson"] = 0.0 if const else float(pearsonr(pred, gold).statistic)
        out["spearman"] = 0.0 if const else float(spearmanr(pred, gold).statistic)
    else:
        pred = logits.argmax(axis=-1)
        gold = labels.astype(np.int64)
        for name in task.metrics:
            if name == "accuracy":
                out[name] = float(accuracy_score(gold, pred))
            elif name == "f1":
                out[name] = float(f1_score(gold, pred, zero_division=0.0))
            elif name == "matthews_correlation":
                out[name] = float(matthews_corrcoef(gold, pred))
            else:  # pragma: no cover - the task table only names the metrics above
                raise ValueError(f"no implementation for metric {name!r}")
    if len(task.eval_splits) > 1:
        out = {f"{k}_{split_suffix(split)}": v for k, v in out.items()}
    return out
