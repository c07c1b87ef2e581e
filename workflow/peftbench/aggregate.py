"""Aggregation: one tidy table per kind of run output.

``runs.parquet`` gets one row per run of the grid. A run whose ``metrics.parquet`` is missing
(failed, or killed) is still listed, with ``status = "missing"`` and its keys, so no gap is
silent. ``curves.parquet``, ``ranks.parquet`` and ``gradnorms.parquet`` concatenate the runs'
tables of the same name.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from .io import write_table

log = logging.getLogger(__name__)

KEYS = ["model", "task", "method", "budget", "seed"]


def parse_run_dir(run_dir: str | Path) -> dict:
    """Keys of a run directory ``.../{model}/{task}/{method}/b{budget}/s{seed}``."""
    p = Path(run_dir)
    return {"model": p.parts[-5], "task": p.parts[-4], "method": p.parts[-3],
            "budget": float(p.parts[-2][1:]), "seed": int(p.parts[-1][1:])}


def aggregate(run_dirs: list[str | Path], out_dir: str | Path) -> dict[str, int]:
    """Concatenate the run tables of ``run_dirs`` into ``out_dir``/{runs,curves,ranks,gradnorms}.parquet.

    Returns:
        Row counts per table, plus ``missing`` (runs without ``metrics.parquet``).
    """
    out_dir = Path(out_dir)
    runs, tables = [], {"curves": [], "ranks": [], "gradnorms": []}
    missing = 0
    for d in map(Path, run_dirs):
        m = d / "metrics.parquet"
        if not m.is_file():
            missing += 1
            runs.append(pd.DataFrame([{**parse_run_dir(d), "status": "missing",
                                       "error": f"no {m}; rerun it with `snakemake {m}`"}]))
            log.warning("run %s has no metrics.parquet; recorded as missing", d)
            continue
        runs.append(pd.read_parquet(m))
        for name, fname in (("curves", "curve.parquet"), ("ranks", "ranks.parquet"), ("gradnorms", "gradnorms.parquet")):
            f = d / fname
            if f.is_file():
                df = pd.read_parquet(f)
                if len(df):
                    tables[name].append(df)
    counts = {"missing": missing}
    frames = {"runs": runs, **tables}
    for name, parts in frames.items():
        df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=KEYS)
        if len(df):
            df = df.sort_values([k for k in KEYS if k in df.columns], kind="stable").reset_index(drop=True)
        write_table(df, out_dir / f"{name}.parquet")
        counts[name] = len(df)
    log.info("aggregated %d runs (%d missing) into %s", counts["runs"], missing, out_dir)
    return counts
