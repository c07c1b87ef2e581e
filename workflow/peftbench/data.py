"""GLUE loading: one loader for the Hugging Face hub and for a local mirror.

The hub path is ``datasets.load_dataset("nyu-mll/glue", task, split=split)``. A local mirror is a
directory ``{glue_dir}/{task}/{split}.parquet`` in the same schema (e.g. ``../shared/data/glue``);
it is read by the same ``datasets`` library (``load_dataset("parquet", ...)``), so both sources
give identical columns. Where ``datasets`` is not installed (e.g. a bare GPU node) a local mirror
is read with pyarrow instead.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .tasks import TaskSpec

HUB_ID = "nyu-mll/glue"


class DataError(RuntimeError):
    """Raised when a data source is missing or does not hold what the task needs."""


def split_path(glue_dir: str | Path, task: str, split: str) -> Path:
    """Path of one split in a local mirror: ``{glue_dir}/{task}/{split}.parquet``."""
    return Path(glue_dir) / task / f"{split}.parquet"


def load_split(task: TaskSpec, split: str, glue_dir: str | Path | None = None) -> pd.DataFrame:
    """Load one GLUE split as a DataFrame with the ``nyu-mll/glue`` columns.

    Args:
        task: the task spec.
        split: ``train``, ``validation``, ``validation_matched`` …
        glue_dir: a local mirror directory; ``None`` reads the hub (needs a network).

    Returns:
        DataFrame with the task's text columns, ``label`` and ``idx``.

    Raises:
        DataError: the mirror directory or split file is missing (the message names the path and
            both ways to fix it), the hub cannot be reached, or a column is missing.
    """
    if glue_dir is not None:
        path = split_path(glue_dir, task.name, split)
        if not Path(glue_dir).is_dir():
            raise DataError(
                f"local GLUE mirror {glue_dir} does not exist. Fix: set data.glue_dir in config.yaml "
                f"(or --config data.glue_dir=PATH) to a directory holding {{task}}/{{split}}.parquet, "
                f"or set data.glue_dir to null to download {HUB_ID} from the Hugging Face hub.")
        if not path.is_file():
            raise DataError(
                f"GLUE split {task.name}/{split} not found at {path}. Fix: put {split}.parquet "
                f"(nyu-mll/glue schema) under {path.parent}, or set data.glue_dir to null to read "
                f"{HUB_ID} from the hub, or drop task {task.name!r} from grid.tasks.")
        try:
            from datasets import load_dataset
        except ImportError:
            df = pd.read_parquet(path)
        else:
            df = load_dataset("parquet", data_files={split: str(path)}, split=split).to_pandas()
        source = str(path)
    else:
        try:
            from datasets import load_dataset
            df = load_dataset(HUB_ID, task.name, split=split).to_pandas()
        except Exception as exc:  # network errors come in many types
            raise DataError(
                f"could not load {HUB_ID}/{task.name} split {split} from the hub ({exc}). Fix: "
                f"check the network, or point data.glue_dir at a local mirror "
                f"({{glue_dir}}/{task.name}/{split}.parquet).") from exc
        source = f"{HUB_ID}/{task.name}/{split}"
    missing = [c for c in (*task.text_columns, "label") if c not in df.columns]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; expected {[*task.text_columns, 'label', 'idx']}")
    if "idx" not in df.columns:
        df["idx"] = range(len(df))
    return df
