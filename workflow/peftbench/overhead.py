"""Grid overhead: how much of a grid's wall-clock is training (``peftbench grid-overhead``).

Reads what a finished grid leaves under ``results/``:

- ``tables/runs.parquet`` (or, before aggregation, every ``runs/**/metrics.parquet``): per run the
  phase timings of :data:`peftbench.vocab.RUN_PHASES` (``import_s`` … ``write_s``);
- ``benchmarks/**/*.tsv``: Snakemake's ``benchmark:`` file of every job (column ``s``: the job's
  wall-clock seconds; the file is written when the job ends, so its modification time is the
  job's end and ``mtime − s`` its start).

The grid's wall-clock is ``--wall-s`` when given (e.g. measured with ``time snakemake ...``), else
the span from the first job's start to the last job's end over all benchmark files (Snakemake's
DAG planning before the first job is then not counted). The report::

    ratio = grid wall-clock / Σ train_s        (issue 17 target: ≤ 1.25 for the quickstart grid)

and where the rest goes: the other phases summed over the train jobs, each train job's wall-clock
beyond its phases (``other_s``: optimizer set-up, interpreter exit, Snakemake's job start), and the
wall-clock of the jobs of every other rule (tokenize, svd, aggregate, plots …). With more than
one job at a time (``--cores`` > threads per job) the ratio can fall below the sum of the parts.

Torch-free.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from .runkey import RunKey
from .vocab import RUN_FILES, RUN_PHASES, TABLES

KEY = ["model", "task", "method", "budget", "seed"]


def benchmark_jobs(results: str | Path) -> pd.DataFrame:
    """One row per Snakemake benchmark file under ``results/benchmarks``.

    Returns:
        Columns ``rule`` (first folder under ``benchmarks/``, or the file's stem for a file directly
        in it), ``path`` (relative to ``benchmarks/``, without ``.tsv``), ``job_s`` (seconds),
        ``end`` (modification time, POSIX seconds), ``start`` (``end − job_s``).
    """
    root = Path(results) / "benchmarks"
    rows = []
    for f in sorted(root.rglob("*.tsv")) if root.is_dir() else []:
        df = pd.read_csv(f, sep="\t")
        if "s" not in df.columns or df.empty:
            continue
        rel = f.relative_to(root).with_suffix("")
        s = float(df["s"].iloc[-1])
        end = f.stat().st_mtime
        rows.append({"rule": rel.parts[0] if len(rel.parts) > 1 else rel.name, "path": rel.as_posix(),
                     "job_s": s, "end": end, "start": end - s})
    return pd.DataFrame(rows, columns=["rule", "path", "job_s", "end", "start"])


def run_phases(results: str | Path) -> pd.DataFrame:
    """The run rows with their phase columns: ``tables/runs.parquet``, or every run's
    ``metrics.parquet`` when the grid is not aggregated yet.

    Raises:
        FileNotFoundError: neither exists.
        ValueError: the rows have no phase columns (runs trained before the phases were recorded).
    """
    results = Path(results)
    table = results / "tables" / TABLES["runs"]
    if table.is_file():
        df = pd.read_parquet(table)
    else:
        files = sorted((results / "runs").rglob(RUN_FILES["metrics"]))
        if not files:
            raise FileNotFoundError(f"no {table} and no {results}/runs/**/{RUN_FILES['metrics']}; run the grid first")
        df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    if "status" in df.columns:
        df = df[df["status"] != "missing"]
    missing = [c for c in RUN_PHASES if c not in df.columns]
    if missing:
        raise ValueError(f"the run rows have no {missing} columns: they were trained before phase timings were "
                         f"recorded; rerun them (snakemake --forcerun train)")
    return df.reset_index(drop=True)


def grid_overhead(results: str | Path = "results", wall_s: float | None = None) -> dict[str, Any]:
    """The grid-overhead report (see the module docstring).

    Args:
        results: the grid's results directory.
        wall_s: the grid's measured wall-clock seconds; ``None``: the benchmark files' span.

    Returns:
        ``{"wall_s", "wall_source", "train_s", "ratio", "runs", "phases": {phase: Σ seconds},
        "train_jobs_s", "other_s", "rules": {rule: (jobs, Σ seconds)}, "per_job": DataFrame}``;
        ``per_job`` has the key columns, the phases, ``job_s`` (NaN without a benchmark file) and
        ``other_s`` (``job_s`` − Σ phases).

    Raises:
        FileNotFoundError, ValueError: see :func:`run_phases`; no benchmark files and no ``wall_s``.
    """
    runs = run_phases(results)
    jobs = benchmark_jobs(results)
    if wall_s is None:
        if jobs.empty:
            raise ValueError(f"no Snakemake benchmark files under {results}/benchmarks to time the grid; "
                             f"pass --wall-s (e.g. from `time snakemake ...`)")
        wall_s, source = float(jobs["end"].max() - jobs["start"].min()), "benchmark files (first start to last end)"
    else:
        source = "--wall-s"
    per_job = runs[KEY + list(RUN_PHASES)].copy()
    per_job["budget"] = per_job["budget"].astype(str)
    train_jobs = jobs[jobs["rule"] == "train"]
    job_s = {}
    for r in train_jobs.itertuples():
        try:
            k = RunKey.parse(r.path)
        except ValueError:
            continue
        job_s[(k.model, k.task, k.method, k.budget_token, k.seed)] = r.job_s
    per_job["job_s"] = [job_s.get((r.model, r.task, r.method, r.budget, int(r.seed)), math.nan)
                        for r in per_job.itertuples()]
    per_job["other_s"] = per_job["job_s"] - per_job[list(RUN_PHASES)].fillna(0.0).sum(axis=1)
    train_s = float(per_job["train_s"].sum())
    rules = {rule: (int(len(g)), float(g["job_s"].sum())) for rule, g in jobs.groupby("rule", sort=True)}
    return {"wall_s": wall_s, "wall_source": source, "train_s": train_s,
            "ratio": wall_s / train_s if train_s > 0 else math.inf, "runs": int(len(per_job)),
            "phases": {p: float(per_job[p].sum(skipna=True)) for p in RUN_PHASES},
            "train_jobs_s": float(per_job["job_s"].sum(skipna=True)),
            "other_s": float(per_job["other_s"].sum(skipna=True)), "rules": rules, "per_job": per_job}


def format_report(rep: dict[str, Any], target: float = 1.25) -> str:
    """The report as Markdown: the ratio against ``target``, the phase sums, the rules."""
    lines = [f"grid wall-clock {rep['wall_s']:.1f} s ({rep['wall_source']}); Σ train_s over {rep['runs']} runs "
             f"{rep['train_s']:.1f} s; ratio {rep['ratio']:.2f} (target ≤ {target:.2f}: "
             f"{'met' if rep['ratio'] <= target else 'NOT met'})", "",
             "| phase (Σ over train jobs) | seconds | share of wall-clock |", "|---|---|---|"]
    wall = max(rep["wall_s"], 1e-9)
    for p, v in rep["phases"].items():
        lines.append(f"| {p} | {v:.1f} | {100 * v / wall:.1f}% |")
    lines.append(f"| other_s (job wall-clock beyond its phases) | {rep['other_s']:.1f} | "
                 f"{100 * rep['other_s'] / wall:.1f}% |")
    lines += ["", "| rule | jobs | Σ job seconds |", "|---|---|---|"]
    for rule, (n, s) in rep["rules"].items():
        lines.append(f"| {rule} | {n} | {s:.1f} |")
    return "\n".join(lines)
