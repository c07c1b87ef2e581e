"""The GLUE task table: the one place that says what each task reads, predicts and scores.

Every other module asks this table instead of special-casing task names. Metric names are the
field's standard ones (``matthews_correlation``, ``pearson``, ``spearman``, ``accuracy``, ``f1``)
and are used unchanged as column names (``dev_<metric>``) in every table. Values are fractions
(accuracy 0–1, correlations −1–1); plots and tables multiply by 100.

Source: Wang et al. 2019, "GLUE: A Multi-Task Benchmark and Analysis Platform for Natural
Language Understanding", Table 1, and the Hugging Face ``nyu-mll/glue`` schema.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    """One GLUE task.

    Attributes:
        name: GLUE config name (``cola``, ``sst2`` …), as in ``nyu-mll/glue``.
        text_columns: one column (single sentence) or two (sentence pair), tokenised as a pair.
        num_labels: classes; 1 means regression (STS-B, MSE loss, score 0–5).
        metrics: metric names computed on every evaluation split.
        main_metric: the metric the GLUE average and the significance tests use.
        eval_splits: dev splits; the first is the one the main metric is read from. MNLI has two
            (matched, mismatched) and its metrics carry the suffix ``_matched``/``_mismatched``.
    """

    name: str
    text_columns: tuple[str, ...]
    num_labels: int
    metrics: tuple[str, ...]
    main_metric: str
    eval_splits: tuple[str, ...] = ("validation",)

    @property
    def is_regression(self) -> bool:
        """True for STS-B: one output, MSE loss, Pearson/Spearman metrics."""
        return self.num_labels == 1

    def metric_names(self) -> list[str]:
        """All metric column names for this task (without the ``dev_`` prefix).

        For MNLI each metric is reported per eval split (``accuracy_matched``,
        ``accuracy_mismatched``); every other task has one eval split and plain names.
        """
        if len(self.eval_splits) == 1:
            return list(self.metrics)
        return [f"{m}_{split_suffix(s)}" for s in self.eval_splits for m in self.metrics]


def split_suffix(split: str) -> str:
    """``validation_matched`` -> ``matched``; ``validation`` -> ``validation``."""
    return split.split("_", 1)[1] if "_" in split else split


TASKS: dict[str, TaskSpec] = {
    "cola": TaskSpec("cola", ("sentence",), 2, ("matthews_correlation", "accuracy"), "matthews_correlation"),
    "sst2": TaskSpec("sst2", ("sentence",), 2, ("accuracy",), "accuracy"),
    "mrpc": TaskSpec("mrpc", ("sentence1", "sentence2"), 2, ("accuracy", "f1"), "accuracy"),
    "stsb": TaskSpec("stsb", ("sentence1", "sentence2"), 1, ("pearson", "spearman"), "pearson"),
    "qqp": TaskSpec("qqp", ("question1", "question2"), 2, ("accuracy", "f1"), "accuracy"),
    "mnli": TaskSpec("mnli", ("premise", "hypothesis"), 3, ("accuracy",), "accuracy_matched",
                     ("validation_matched", "validation_mismatched")),
    "qnli": TaskSpec("qnli", ("question", "sentence"), 2, ("accuracy",), "accuracy"),
    "rte": TaskSpec("rte", ("sentence1", "sentence2"), 2, ("accuracy",), "accuracy"),
    "wnli": TaskSpec("wnli", ("sentence1", "sentence2"), 2, ("accuracy",), "accuracy"),
}


def get_task(name: str) -> TaskSpec:
    """Return the spec of GLUE task ``name``.

    Raises:
        KeyError: unknown task, with the list of known ones.
    """
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown GLUE task {name!r}; known tasks: {', '.join(TASKS)}") from None
