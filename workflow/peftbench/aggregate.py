"""Aggregation: one tidy table per kind of run output.

``runs.parquet`` gets one row per run of the grid. A run whose ``metrics.parquet`` is missing
(crashed or killed) is still listed, with ``status = "missing"`` and its key columns, so no gap is
silent. ``curves.parquet``, ``ranks.parquet``, ``gradnorms.parquet`` and ``predictions.parquet``
(every dev example's label, prediction and logits, per run) concatenate the runs'
tables of the same kind (:data:`peftbench.vocab.TABLE_SOURCES`).
"""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from .io import write_table
from .runkey import KEY_COLUMNS, RunKey
from .vocab import RUN_FILES, TABLE_SOURCES, TABLES

log = logging.getLogger(__name__)


def aggregate(run_dirs: list[str | Path], out_dir: str | Path) -> dict[str, int]:
    """Concatenate the run files of ``run_dirs`` into the tables of ``out_dir`` (runs, curves,
    ranks, gradnorms, predictions).

    Returns:
        Row counts per table, plus ``missing`` (runs without ``metrics.parquet``).

    Raises:
        ValueError: a path that is not a run directory (``…/{model}/{task}/{method}/b{budget}/s{seed}``).
    """
    out_dir = Path(out_dir)
    parts: dict[str, list[pd.DataFrame]] = {name: [] for name in TABLE_SOURCES}
    missing = 0
    for d in map(Path, run_dirs):
        key = RunKey.parse(d)
        metrics = d / RUN_FILES["metrics"]
        if not metrics.is_file():
            missing += 1
            parts["runs"].append(pd.DataFrame([{**key.columns(), "status": "missing",
                                                "error": f"no {metrics}; rerun it with `snakemake {metrics}`"}]))
            log.warning("run %s has no %s; recorded as missing", d, RUN_FILES["metrics"])
            continue
        for name, source in TABLE_SOURCES.items():
            f = d / RUN_FILES[source]
            if f.is_file():
                df = pd.read_parquet(f)
                if len(df):
                    # the key of the run directory is the truth (older runs wrote the budget as a float)
                    parts[name].append(df.assign(**key.columns()))
    counts = {"missing": missing}
    for name, frames in parts.items():
        df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(KEY_COLUMNS))
        if len(df):
            df = df.sort_values([k for k in KEY_COLUMNS if k in df.columns], kind="stable").reset_index(drop=True)
        write_table(df, out_dir / TABLES[name])
        counts[name] = len(df)
    log.info("aggregated %d runs (%d missing) into %s", counts["runs"], missing, out_dir)
    return counts


def aggregate_ood(files: list[str | Path], out: str | Path) -> int:
    """Concatenate the runs' ``ood.parquet`` (:func:`peftbench.ood.evaluate_ood`) into ``out``,
    sorted by the run key and the OOD set (each set's rows in the order the run wrote them: the
    headline row, then its breakdown). Returns the row count.

    Raises:
        FileNotFoundError: a listed file is missing.
    """
    frames = [pd.read_parquet(f) for f in files]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(KEY_COLUMNS))
    if len(df):
        df = df.sort_values([*[k for k in KEY_COLUMNS if k in df.columns], "ood_set"], kind="stable")
    write_table(df.reset_index(drop=True), out)
    return len(df)
