"""GLUE loading: one loader for the Hugging Face hub and for a local mirror.

The hub path is ``datasets.load_dataset("nyu-mll/glue", task, split=split)``. A local mirror is a
directory ``{glue_dir}/{task}/{split}.parquet`` in the same schema (e.g. ``../shared/data/glue``);
it is read with pyarrow (``pyarrow.parquet.read_table``: the hub's Parquet columns as stored,
class labels as their int ids, which is what ``datasets`` gives too), without importing
``datasets`` or writing its Arrow cache: a tokenize job spends its time tokenising (issue 17).

Causal-LM tasks (seed 003) turn rows into prompt/target examples (:func:`causal_frame`): the
GLUE-sourced ones (RTE, SST-2, MNLI as generation) through :func:`load_split`, the others (E2E NLG,
SAMSum, WikiSQL) through ``datasets.load_dataset`` from the hub (:func:`load_causal_split`).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .vocab import TaskSpec

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
                f"(or on the command line: --config 'data={{glue_dir: PATH}}') to a directory holding {{task}}/{{split}}.parquet, "
                f"or set data.glue_dir to null to download {HUB_ID} from the Hugging Face hub.")
        if not path.is_file():
            raise DataError(
                f"GLUE split {task.name}/{split} not found at {path}. Fix: put {split}.parquet "
                f"(nyu-mll/glue schema) under {path.parent}, or set data.glue_dir to null to read "
                f"{HUB_ID} from the hub, or drop task {task.name!r} from grid.tasks.")
        import pyarrow.parquet as pq

        try:
            df = pq.read_table(path).to_pandas()
        except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for a corrupt file
            raise DataError(f"{path}: cannot be read as Parquet ({exc}); re-create the file") from exc
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
    check_split(task, split, df, source)
    return df


def _rows(mask) -> str:
    rows = list(mask[mask].index[:10])
    more = int(mask.sum()) - len(rows)
    return ", ".join(map(str, rows)) + (f" and {more} more" if more > 0 else "")


def check_split(task: TaskSpec, split: str, df: pd.DataFrame, source: str) -> None:
    """Reject data the task cannot train or be scored on.

    Raises:
        DataError: an empty split, a missing/NaN text, or a label out of range for the task
            (classes ``0..num_labels-1``; STS-B scores 0–5; ``-1`` is allowed only in ``test``
            splits, whose labels GLUE hides). The message names the file and the rows.
    """
    if len(df) == 0:
        raise DataError(f"{source}: split {split} of {task.name} is empty")
    for col in task.text_columns:
        bad = df[col].isna()
        if bad.any():
            raise DataError(f"{source}: column {col!r} has missing text (NaN/None) in row(s) {_rows(bad)}; "
                            f"drop or fill those rows")
    label = pd.to_numeric(df["label"], errors="coerce")
    hidden = split.startswith("test") & (label == -1)
    if task.is_regression:
        bad = (label.isna() | (label < 0) | (label > 5)) & ~hidden
        allowed = "scores in [0, 5]"
    else:
        bad = (label.isna() | ~label.isin(range(task.num_labels))) & ~hidden
        allowed = f"class ids 0..{task.num_labels - 1}"
    if bad.any():
        raise DataError(f"{source}: label out of range for {task.name} (allowed: {allowed}) in row(s) "
                        f"{_rows(bad)}; values {sorted(set(df.loc[bad, 'label'].astype(str)))[:5]}")


# ------------------------------------------------------------------------------------------------
# Causal-LM track: prompt / target rows
# ------------------------------------------------------------------------------------------------

#: Columns of a causal task's rows (:func:`causal_frame`).
CAUSAL_COLUMNS = ("prompt", "target", "references", "label", "idx")


def _wikisql_row(row: dict) -> dict:
    """A ``Salesforce/wikisql`` row (``table.header``, ``sql.human_readable``) as flat columns."""
    table, sql = row.get("table") or {}, row.get("sql") or {}
    return {**row, "columns": ", ".join(map(str, table.get("header", []))),
            "sql": sql.get("human_readable", "") if isinstance(sql, dict) else str(sql)}


#: Per-task flattening of a hub row into the columns its prompt template and target name.
HUB_ROWS = {"wikisql": _wikisql_row}


def causal_frame(task: TaskSpec, df: pd.DataFrame, split: str) -> pd.DataFrame:
    """Turn a task's raw rows into prompt/target rows (the causal-LM track's examples).

    ``prompt`` is ``task.prompt`` formatted with the row's columns; ``target`` is the row's
    ``task.target`` column, or the verbaliser word of its ``label``; ``references`` every target
    the generation is scored against. With ``task.group_by`` (E2E NLG: several references per
    meaning representation) the rows of an evaluation split that share that column become one
    example whose references are all their targets (the first is its ``target``); the training
    split keeps one example per reference.

    Args:
        task: a causal task (:attr:`TaskSpec.is_causal`).
        df: raw rows (the GLUE schema for GLUE-sourced tasks, the hub schema otherwise).
        split: the split's name (decides the grouping).

    Returns:
        DataFrame with :data:`CAUSAL_COLUMNS`: ``label`` the class id (-1 for text tasks), ``idx``
        the row's ``idx`` (its position where it has none; the group's first row when grouped).

    Raises:
        DataError: a column the template or target needs is missing, or a label outside the
            verbaliser.
    """
    flatten = HUB_ROWS.get(task.name)
    rows = [flatten(r) if flatten else r for r in df.to_dict("records")]
    need = set(task.text_columns) | ({task.target} if task.target else {"label"})
    missing = sorted(need - set(rows[0])) if rows else []
    if missing:
        raise DataError(f"{task.name}/{split}: missing column(s) {missing} for the prompt/target; columns are "
                        f"{sorted(rows[0])}")
    out = []
    for i, r in enumerate(rows):
        if task.verbaliser is not None:
            label = int(r["label"])
            if not 0 <= label < len(task.verbaliser):
                raise DataError(f"{task.name}/{split} row {i}: label {label} has no verbaliser word "
                                f"(verbaliser {task.verbaliser})")
            target = task.verbaliser[label]
        else:
            label, target = -1, str(r[task.target])
        out.append({"prompt": task.prompt.format(**{c: r[c] for c in task.text_columns}), "target": target,
                    "references": [target], "label": label, "idx": int(r.get("idx", i))})
    frame = pd.DataFrame(out, columns=list(CAUSAL_COLUMNS))
    if task.group_by is not None and split != task.train_split and len(frame):
        key = [str(r[task.group_by]) for r in rows]
        frame = (frame.assign(_key=key).groupby("_key", sort=False)
                 .agg(prompt=("prompt", "first"), target=("target", "first"), references=("target", list),
                      label=("label", "first"), idx=("idx", "first")).reset_index(drop=True))
    return frame


def load_causal_split(task: TaskSpec, split: str, glue_dir: str | Path | None = None) -> pd.DataFrame:
    """One split of a causal task as prompt/target rows (:func:`causal_frame`).

    GLUE-sourced tasks (``loader: glue``: ``rte_gen``, ``sst2_gen``, ``mnli_gen``) read their GLUE
    task with :func:`load_split` (the local mirror ``glue_dir``, or the hub); ``hub`` tasks read
    ``datasets.load_dataset(task.hub_id, task.hub_config, split=split)``.

    Raises:
        DataError: missing data (the message names the source and the fix), or rows the task
            cannot use.
    """
    from .vocab import get_task

    if task.loader == "glue":
        df = load_split(get_task(task.glue_name), split, glue_dir)
    else:
        try:
            from datasets import load_dataset

            df = load_dataset(task.hub_id, task.hub_config, split=split).to_pandas()
        except Exception as exc:  # network errors come in many types
            raise DataError(
                f"could not load {task.hub_id} split {split} for task {task.name} from the hub ({exc}). Fix: run "
                f"where the Hugging Face hub is reachable (or its datasets cache holds {task.hub_id}), or drop "
                f"{task.name!r} from grid.tasks; offline causal tasks: rte_gen, sst2_gen") from exc
    if len(df) == 0:
        raise DataError(f"{task.name}: split {split} is empty")
    return causal_frame(task, df, split)
