"""Seed-paired significance tests and per-method summary statistics over ``runs.parquet``.

Everything here reads the tidy run table written by the ``aggregate`` rule (one row per training
run; see :data:`RUNS_REQUIRED`) and returns tidy tables. Metric values stay fractions (0–1, or
−1–1 for correlations) in every table; plots and Markdown multiply by 100.

Statistics (all from :mod:`scipy.stats`; our code only pairs, groups and guards edge cases):

* **Families.** A family is one ``(model, task, budget)``. A method whose runs all have
  ``budget == 100.0`` (``full``) ignores budgets and is copied into every budget family of its
  model. The GLUE average forms its own family per ``(model, budget)`` with ``task == "glue_avg"``.
* **Pairing.** Two methods are paired by ``seed``; only seeds where both runs exist, have
  ``status == "ok"`` and a finite value are used (``n``). Failed and missing seeds are counted per
  side in ``n_failed_*``/``n_missing_*`` and listed in ``failed_seeds_*``/``missing_seeds_*``.
* **Difference.** ``d_i = x_method,i − x_baseline,i``; ``mean_diff = mean(d)``.
* **CI.** ``scipy.stats.bootstrap((d,), np.mean)`` with a fixed seed (a fresh
  ``numpy.random.default_rng(seed)`` per call, so every number is reproducible on its own),
  ``n_resamples`` resamples (default 10,000) and method ``BCa`` by default. ``n < 2``: NaN. All
  ``d_i`` equal: every resample has the same mean, so the interval is ``[d, d]`` (scipy's BCa
  would return NaN with a ``DegenerateDataWarning``).
* **Paired t-test.** ``scipy.stats.ttest_rel(method, baseline)``. ``n < 2``: NaN. When the
  differences have zero variance (all equal, including all zero) the t statistic is undefined
  (x/0): we return NaN for ``t_stat``/``p_ttest`` instead of scipy's ``inf``/``0.0`` or ``nan``
  and say so in ``note``.
* **Wilcoxon signed-rank.** ``scipy.stats.wilcoxon(d)`` (defaults: ``zero_method="wilcox"``
  drops zero differences, ``method="auto"``: exact without ties/zeros for small n, normal
  approximation otherwise) when ``n >= min_n_wilcoxon`` (default 6), else NaN. All differences
  zero: statistic 0 and p = 1.0 (no signed difference at all; scipy returns the same but warns).
* **Cohen's d (paired, d_z).** ``mean(d) / std(d, ddof=1)``. ``n < 2``: NaN; zero standard
  deviation: ``+inf``/``−inf`` with the sign of the mean difference, or NaN when the mean
  difference is also zero (0/0).
* **Holm–Bonferroni.** :func:`holm` within each family (all comparisons of one
  ``(model, task, budget)``), separately for the t-test and the Wilcoxon p-values; NaN p-values
  are not counted as tests.
"""
from __future__ import annotations

import inspect
import itertools
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import stats

__all__ = [
    "GLUE_AVG",
    "FULL_BUDGET",
    "RUNS_REQUIRED",
    "StatsOptions",
    "read_table",
    "validate_runs",
    "holm",
    "bootstrap_ci",
    "paired_comparison",
    "budget_families",
    "family_runs",
    "glue_average_runs",
    "method_stats",
    "compare_methods",
    "order_methods",
    "order_tasks",
]

#: ``task`` value of the GLUE-average rows (in ``significance.parquet`` and ``method_stats``).
GLUE_AVG = "glue_avg"
#: Budget recorded by methods that ignore budgets (full fine-tuning).
FULL_BUDGET = 100.0
#: Columns :func:`validate_runs` requires in ``runs.parquet``.
RUNS_REQUIRED = ("model", "task", "method", "budget", "seed", "status", "metric", "dev_main")
#: Column order for tasks (GLUE paper order); unknown tasks follow alphabetically.
TASK_ORDER = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
#: Preferred method order (baselines first); unknown methods follow alphabetically.
METHOD_ORDER = ("full", "lora", "adalora", "glora", "fwlora", "spectral_a", "spectral_r", "gsa",
                "dynacsg", "phased")

_AGGREGATE_HINT = "it is written by the `aggregate` rule: run `snakemake results/tables/runs.parquet`"


@dataclass(frozen=True)
class StatsOptions:
    """Bootstrap and test settings shared by :func:`method_stats` and :func:`compare_methods`.

    Attributes:
        resamples: bootstrap resamples (``n_resamples`` of :func:`scipy.stats.bootstrap`).
        confidence: two-sided confidence level of the bootstrap interval (0 < c < 1).
        seed: seed of the ``numpy.random.default_rng`` created afresh for every interval.
        ci_method: ``"BCa"``, ``"percentile"`` or ``"basic"`` (scipy's names).
        min_n_wilcoxon: smallest number of paired seeds for which the Wilcoxon test is run.
        value: the run-table column compared (``dev_main``: final epoch; ``best_dev_main``: best).
        glue_exclude: tasks left out of the GLUE average (e.g. ``("wnli",)``).
    """

    resamples: int = 10_000
    confidence: float = 0.95
    seed: int = 0
    ci_method: str = "BCa"
    min_n_wilcoxon: int = 6
    value: str = "dev_main"
    glue_exclude: tuple[str, ...] = ()

    def __post_init__(self):
        if self.resamples < 1:
            raise ValueError(f"resamples must be >= 1, got {self.resamples}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.ci_method not in ("BCa", "percentile", "basic"):
            raise ValueError(f"ci_method must be BCa, percentile or basic, got {self.ci_method!r}")
        if self.min_n_wilcoxon < 1:
            raise ValueError(f"min_n_wilcoxon must be >= 1, got {self.min_n_wilcoxon}")


# --------------------------------------------------------------------------------------------
# Input
# --------------------------------------------------------------------------------------------

def read_table(path: str | Path, required: Iterable[str] = (), *, allow_empty: bool = True,
               hint: str = "") -> pd.DataFrame:
    """Read one Parquet table and check its columns.

    Args:
        path: Parquet file.
        required: column names that must be present.
        allow_empty: when False, a table with zero rows is an error.
        hint: how to (re)create the file, appended to every error message.

    Returns:
        The table as a DataFrame.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a required column is missing, or the table is empty and ``allow_empty`` is
            False. The message names the file, the columns and ``hint``.
    """
    path = Path(path)
    suffix = f"; {hint}" if hint else ""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file{suffix}")
    df = pd.read_parquet(path)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)} "
                         f"(has: {', '.join(map(str, df.columns))}){suffix}")
    if not allow_empty and df.empty:
        raise ValueError(f"{path}: the table has no rows{suffix}")
    return df


def validate_runs(runs: pd.DataFrame, source: str = "runs table", value: str = "dev_main") -> pd.DataFrame:
    """Check a run table and return a cleaned copy.

    Required columns: :data:`RUNS_REQUIRED` plus ``value``. ``budget`` becomes float, ``seed``
    int, ``status`` str. A run with ``status == "ok"`` but a non-finite ``value`` is treated as
    failed (its ``error`` says so).

    Raises:
        ValueError: missing columns, no rows, a ``status`` other than ok/failed, or two rows for
            the same ``(model, task, method, budget, seed)``; the message names ``source``.
    """
    need = list(dict.fromkeys([*RUNS_REQUIRED, value]))
    missing = [c for c in need if c not in runs.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {', '.join(missing)}; {_AGGREGATE_HINT}")
    if runs.empty:
        raise ValueError(f"{source}: no runs (zero rows); {_AGGREGATE_HINT} after training")
    df = runs.copy()
    df["budget"] = df["budget"].astype(float)
    df["seed"] = df["seed"].astype(int)
    df["status"] = df["status"].astype(str)
    bad = sorted(set(df["status"]) - {"ok", "failed"})
    if bad:
        raise ValueError(f"{source}: column status has value(s) {bad}; allowed: 'ok', 'failed'")
    key = ["model", "task", "method", "budget", "seed"]
    dup = df.duplicated(key, keep=False)
    if dup.any():
        first = df.loc[dup, key].iloc[0].to_dict()
        raise ValueError(f"{source}: {int(dup.sum())} rows share a (model, task, method, budget, "
                         f"seed) key, e.g. {first}; each run must appear once")
    df["error"] = df["error"].astype(object) if "error" in df.columns else None
    nan_ok = (df["status"] == "ok") & ~np.isfinite(pd.to_numeric(df[value], errors="coerce").astype(float))
    if nan_ok.any():
        df.loc[nan_ok, "status"] = "failed"
        df.loc[nan_ok, "error"] = f"status ok but {value} is not finite"
    return df


def order_methods(methods: Iterable[str], reference: str | None = None) -> list[str]:
    """Methods in display order: ``full``, then the reference, then :data:`METHOD_ORDER`, then A–Z."""
    ms = list(dict.fromkeys(methods))
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}

    def key(m):
        if m == "full":
            return (0, 0, m)
        if m == reference:
            return (1, 0, m)
        return (2, rank.get(m, len(rank)), m)

    return sorted(ms, key=key)


def order_tasks(tasks: Iterable[str]) -> list[str]:
    """Tasks in GLUE order (:data:`TASK_ORDER`), unknown ones A–Z, ``glue_avg`` last."""
    ts = list(dict.fromkeys(tasks))
    rank = {t: i for i, t in enumerate(TASK_ORDER)}
    return sorted(ts, key=lambda t: (t == GLUE_AVG, rank.get(t, len(rank)), t))


# --------------------------------------------------------------------------------------------
# Statistics primitives
# --------------------------------------------------------------------------------------------

def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm–Bonferroni step-down adjusted p-values (Holm 1979).

    With the m non-NaN p-values sorted ascending, ``p_(1) <= … <= p_(m)``:
    ``adj_(i) = min(1, max_{j <= i} (m − j + 1) · p_(j))``. The adjusted values are returned in
    the input order; NaN inputs stay NaN and do not count towards m.

    Example: ``holm([0.01, 0.04, 0.03, 0.005])`` → ``[0.03, 0.06, 0.06, 0.02]``.
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    m = int(ok.sum())
    if m == 0:
        return out
    pv = p[ok]
    order = np.argsort(pv, kind="stable")
    adj = (m - np.arange(m)) * pv[order]
    adj = np.minimum(np.maximum.accumulate(adj), 1.0)
    res = np.empty(m)
    res[order] = adj
    out[ok] = res
    return out


_BOOT_RNG_KW = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"


def bootstrap_ci(values: Sequence[float], opts: StatsOptions = StatsOptions()) -> tuple[float, float]:
    """Bootstrap confidence interval of the mean of ``values``.

    Calls ``scipy.stats.bootstrap((values,), np.mean, n_resamples=opts.resamples,
    confidence_level=opts.confidence, method=opts.ci_method, rng=np.random.default_rng(opts.seed))``.

    Returns:
        ``(low, high)``; ``(nan, nan)`` for fewer than 2 values; ``(v, v)`` when all values equal
        ``v`` (a degenerate bootstrap distribution).
    """
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return (math.nan, math.nan)
    if np.all(x == x[0]):
        return (float(x[0]), float(x[0]))
    res = stats.bootstrap((x,), np.mean, n_resamples=opts.resamples, confidence_level=opts.confidence,
                          method=opts.ci_method, **{_BOOT_RNG_KW: np.random.default_rng(opts.seed)})
    ci = res.confidence_interval
    return (float(ci.low), float(ci.high))


def _std(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1)) if x.size >= 2 else math.nan


def paired_comparison(method_values: Sequence[float], baseline_values: Sequence[float],
                      opts: StatsOptions = StatsOptions()) -> dict:
    """Compare two seed-aligned samples (``method_values[i]`` and ``baseline_values[i]`` share a seed).

    Returns a dict with ``n``, ``mean_method``, ``sd_method``, ``mean_baseline``, ``sd_baseline``,
    ``mean_diff``, ``sd_diff``, ``ci_low``, ``ci_high`` (bootstrap CI of the mean difference),
    ``t_stat``, ``p_ttest`` (``scipy.stats.ttest_rel``), ``w_stat``, ``p_wilcoxon``
    (``scipy.stats.wilcoxon`` on the differences, only when ``n >= opts.min_n_wilcoxon``),
    ``cohens_d`` and ``note`` (semicolon-separated remarks on degenerate cases). Standard
    deviations use ``ddof=1``. Edge cases are listed in the module docstring.

    Raises:
        ValueError: the two inputs differ in length.
    """
    a = np.asarray(method_values, dtype=float)
    b = np.asarray(baseline_values, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.size} vs {b.size}")
    n = int(a.size)
    d = a - b
    notes: list[str] = []
    out = dict(n=n, mean_method=math.nan, sd_method=math.nan, mean_baseline=math.nan,
               sd_baseline=math.nan, mean_diff=math.nan, sd_diff=math.nan, ci_low=math.nan,
               ci_high=math.nan, t_stat=math.nan, p_ttest=math.nan, w_stat=math.nan,
               p_wilcoxon=math.nan, cohens_d=math.nan)
    if n == 0:
        out["note"] = "no paired seeds"
        return out
    out.update(mean_method=float(a.mean()), sd_method=_std(a), mean_baseline=float(b.mean()),
               sd_baseline=_std(b), mean_diff=float(d.mean()), sd_diff=_std(d))
    if n < 2:
        notes.append("n < 2: no CI, no tests")
    else:
        out["ci_low"], out["ci_high"] = bootstrap_ci(d, opts)
        sd = out["sd_diff"]
        if sd == 0.0:
            if out["mean_diff"] == 0.0:
                notes.append("all differences zero: t-test undefined, Cohen's d NaN")
            else:
                out["cohens_d"] = math.copysign(math.inf, out["mean_diff"])
                notes.append("differences constant (zero variance): t-test undefined, Cohen's d infinite")
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                t = stats.ttest_rel(a, b)
            out["t_stat"], out["p_ttest"] = float(t.statistic), float(t.pvalue)
            out["cohens_d"] = out["mean_diff"] / sd
        if n >= opts.min_n_wilcoxon:
            if np.all(d == 0.0):
                out["w_stat"], out["p_wilcoxon"] = 0.0, 1.0
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    w = stats.wilcoxon(d)
                out["w_stat"], out["p_wilcoxon"] = float(w.statistic), float(w.pvalue)
        else:
            notes.append(f"n < {opts.min_n_wilcoxon}: no Wilcoxon test")
    out["note"] = "; ".join(notes)
    return out


# --------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------

def _full_like(runs: pd.DataFrame) -> set[str]:
    by = runs.groupby("method")["budget"].agg(lambda s: bool(np.all(s.to_numpy() == FULL_BUDGET)))
    return {m for m, v in by.items() if v}


def budget_families(runs: pd.DataFrame) -> pd.DataFrame:
    """Assign every run to its budget families.

    Runs of a method whose runs all have ``budget == 100.0`` (full fine-tuning) are copied into
    every budget that another method of the same model uses; the copy's ``budget`` is the family
    budget and ``run_budget`` keeps the original (100.0). Other runs keep their budget. A model
    with only full-like methods keeps the single family 100.0.

    Returns:
        A copy of ``runs`` with the added column ``run_budget``.
    """
    df = runs.copy()
    df["run_budget"] = df["budget"]
    full = _full_like(df)
    parts = []
    for model, g in df.groupby("model", sort=False):
        is_full = g["method"].isin(full)
        budgets = sorted(g.loc[~is_full, "budget"].unique())
        parts.append(g.loc[~is_full])
        fg = g.loc[is_full]
        if not budgets:
            parts.append(fg)
            continue
        for b in budgets:
            parts.append(fg.assign(budget=float(b)))
    out = pd.concat(parts, ignore_index=True)
    return out


def glue_average_runs(runs: pd.DataFrame, value: str = "dev_main", exclude: Iterable[str] = ()) -> pd.DataFrame:
    """Per-seed GLUE average as pseudo-runs with ``task == "glue_avg"``.

    For every ``(model, method, budget, seed)`` the value is the mean of ``value`` (the task's main
    metric) over the model's task set: every task of that model in ``runs`` except ``exclude``
    and except ``glue_avg`` itself. The seed counts as ``status == "ok"`` only when all of those
    tasks have an ok run for it; otherwise it is ``failed`` and ``error`` lists the failed and
    missing tasks. ``best_dev_main`` (when present) is averaged the same way.

    Returns:
        Columns ``model, task, method, budget, seed, status, error, metric, <value>``,
        ``best_dev_main`` (if in ``runs``), ``n_tasks``, ``tasks`` (comma-separated task names).
    """
    exclude = set(exclude)
    df = runs[~runs["task"].isin(exclude | {GLUE_AVG})]
    cols = ["model", "task", "method", "budget", "seed", "status", "error", "metric", value,
            "n_tasks", "tasks"]
    has_best = "best_dev_main" in runs.columns and value != "best_dev_main"
    if has_best:
        cols.insert(cols.index(value) + 1, "best_dev_main")
    rows = []
    for model, gm in df.groupby("model", sort=False):
        tasks = order_tasks(gm["task"].unique())
        for (method, budget, seed), g in gm.groupby(["method", "budget", "seed"], sort=True):
            ok = g[g["status"] == "ok"].set_index("task")
            failed = [t for t in tasks if t in set(g["task"]) and t not in ok.index]
            missing = [t for t in tasks if t not in set(g["task"])]
            row = dict(model=model, task=GLUE_AVG, method=method, budget=float(budget), seed=int(seed),
                       metric=f"mean of main metrics over {len(tasks)} tasks", n_tasks=len(tasks),
                       tasks=",".join(tasks))
            if failed or missing:
                why = []
                if failed:
                    why.append("failed: " + ",".join(failed))
                if missing:
                    why.append("missing: " + ",".join(missing))
                row.update(status="failed", error="glue_avg incomplete (" + "; ".join(why) + ")",
                           **{value: math.nan})
                if has_best:
                    row["best_dev_main"] = math.nan
            else:
                row.update(status="ok", error=None, **{value: float(ok.loc[tasks, value].mean())})
                if has_best:
                    row["best_dev_main"] = float(ok.loc[tasks, "best_dev_main"].astype(float).mean())
            rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def family_runs(runs: pd.DataFrame, opts: StatsOptions = StatsOptions()) -> pd.DataFrame:
    """Validated runs plus GLUE-average pseudo-runs (:func:`glue_average_runs`), assigned to
    budget families (:func:`budget_families`). This is the row set every statistic is computed on.

    Raises:
        ValueError: see :func:`validate_runs`.
    """
    runs = validate_runs(runs, value=opts.value)
    glue = glue_average_runs(runs, opts.value, opts.glue_exclude)
    both = pd.concat([runs, glue], ignore_index=True) if not glue.empty else runs
    return budget_families(both)


def _seed_str(seeds: Iterable[int]) -> str:
    return ",".join(str(int(s)) for s in sorted(seeds))


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------

STATS_COLUMNS = ["model", "task", "budget", "method", "metric", "value_column", "n_ok", "n_failed",
                 "n_missing", "seeds_ok", "failed_seeds", "missing_seeds", "mean", "std", "median",
                 "ci_low", "ci_high", "best_mean", "confidence", "resamples", "ci_method",
                 "bootstrap_seed", "n_tasks", "tasks"]


def method_stats(runs: pd.DataFrame, opts: StatsOptions = StatsOptions()) -> pd.DataFrame:
    """Per-method descriptive statistics of the main metric over seeds.

    One row per ``(model, task, budget, method)`` family member (``full`` copied into every
    budget), including ``task == "glue_avg"`` rows (the GLUE average per method per
    ``(model, budget)``: per seed the mean main metric over tasks, then statistics over seeds).

    Columns (:data:`STATS_COLUMNS`): ``n_ok`` seeds with an ok run; ``n_failed`` seeds whose run
    failed (or, for glue_avg, lacks an ok run on some task); ``n_missing`` seeds present elsewhere
    in the family but absent for this method; ``seeds_ok``/``failed_seeds``/``missing_seeds``
    comma-separated seed lists; ``mean``, ``std`` (ddof=1), ``median`` of ``opts.value`` over ok
    seeds (fractions); ``ci_low``/``ci_high`` the bootstrap CI of the mean (:func:`bootstrap_ci`);
    ``best_mean`` the mean of ``best_dev_main`` when present; ``n_tasks``/``tasks`` on glue_avg rows.

    Raises:
        ValueError: see :func:`validate_runs`.
    """
    fam = family_runs(runs, opts)
    rows = []
    for (model, task, budget), g in fam.groupby(["model", "task", "budget"], sort=False):
        all_seeds = set(g["seed"])
        for method, gm in g.groupby("method", sort=False):
            ok = gm[gm["status"] == "ok"]
            x = ok[opts.value].to_numpy(dtype=float)
            lo, hi = bootstrap_ci(x, opts)
            best = (float(ok["best_dev_main"].astype(float).mean())
                    if "best_dev_main" in ok.columns and len(ok) else math.nan)
            failed = set(gm.loc[gm["status"] != "ok", "seed"])
            missing = all_seeds - set(gm["seed"])
            metric = gm["metric"].dropna().iloc[0] if gm["metric"].notna().any() else ""
            rows.append(dict(
                model=model, task=task, budget=float(budget), method=method, metric=metric,
                value_column=opts.value, n_ok=int(len(ok)), n_failed=len(failed), n_missing=len(missing),
                seeds_ok=_seed_str(ok["seed"]), failed_seeds=_seed_str(failed),
                missing_seeds=_seed_str(missing),
                mean=float(x.mean()) if x.size else math.nan, std=_std(x),
                median=float(np.median(x)) if x.size else math.nan, ci_low=lo, ci_high=hi,
                best_mean=best, confidence=opts.confidence, resamples=opts.resamples,
                ci_method=opts.ci_method, bootstrap_seed=opts.seed,
                n_tasks=int(gm["n_tasks"].iloc[0]) if task == GLUE_AVG else 1,
                tasks=str(gm["tasks"].iloc[0]) if task == GLUE_AVG else task))
    out = pd.DataFrame(rows, columns=STATS_COLUMNS)
    return _sort(out)


SIGNIFICANCE_COLUMNS = [
    "model", "task", "budget", "metric", "value_column", "method", "baseline", "reference",
    "comparison", "n", "seeds", "mean_method", "sd_method", "mean_baseline", "sd_baseline",
    "mean_diff", "sd_diff", "ci_low", "ci_high", "t_stat", "p_ttest", "p_ttest_holm", "w_stat",
    "p_wilcoxon", "p_wilcoxon_holm", "cohens_d", "n_tests_family",
    "n_ok_method", "n_failed_method", "n_missing_method", "failed_seeds_method", "missing_seeds_method",
    "n_ok_baseline", "n_failed_baseline", "n_missing_baseline", "failed_seeds_baseline",
    "missing_seeds_baseline", "confidence", "resamples", "ci_method", "bootstrap_seed", "note",
]


def _pairs(methods: list[str], reference: str, all_pairs: bool) -> list[tuple[str, str]]:
    """(method, baseline) pairs; the reference is always the baseline when it takes part."""
    ordered = order_methods(methods, reference)
    if not all_pairs:
        return [(m, reference) for m in ordered if m != reference]
    if reference in ordered:
        ordered = [reference] + [m for m in ordered if m != reference]
    return [(b, a) for a, b in itertools.combinations(ordered, 2)]


def compare_methods(runs: pd.DataFrame, reference: str = "lora", all_pairs: bool = False,
                    opts: StatsOptions = StatsOptions()) -> pd.DataFrame:
    """Seed-paired comparisons of methods within every ``(model, task, budget)`` family.

    Each method of a family is compared with ``reference`` (``baseline == reference``); with
    ``all_pairs`` every unordered pair of methods of the family is compared once (the reference,
    when involved, is the baseline; otherwise the method earlier in :func:`order_methods` is).
    ``task == "glue_avg"`` rows compare the per-seed GLUE averages (:func:`glue_average_runs`).
    A family without the reference still gets one row per method, with ``n == 0`` and a note.

    Columns (:data:`SIGNIFICANCE_COLUMNS`): the family keys, ``metric`` (main metric name),
    ``value_column``, ``method``, ``baseline``, ``reference``, ``comparison``
    (``"vs_reference"`` or ``"pair"``), ``n`` paired seeds and ``seeds`` (their list), the
    statistics of :func:`paired_comparison` (means/SDs over the paired seeds, so
    ``mean_diff == mean_method − mean_baseline``; fractions, not %), ``p_ttest_holm`` and
    ``p_wilcoxon_holm`` (:func:`holm` over the family's comparisons), ``n_tests_family`` (number
    of non-NaN t-test p-values in the family), and per side ``n_ok``, ``n_failed``,
    ``n_missing`` and the failed/missing seed lists, plus the bootstrap settings and ``note``.

    Raises:
        ValueError: see :func:`validate_runs`.
    """
    fam = family_runs(runs, opts)
    rows = []
    for (model, task, budget), g in fam.groupby(["model", "task", "budget"], sort=False):
        all_seeds = set(g["seed"])
        methods = list(g["method"].unique())
        per = {m: gm.set_index("seed") for m, gm in g.groupby("method", sort=False)}
        metric = g["metric"].dropna().iloc[0] if g["metric"].notna().any() else ""
        fam_rows = []
        for method, baseline in _pairs(methods, reference, all_pairs):
            side = {}
            for name, m in (("method", method), ("baseline", baseline)):
                gm = per.get(m)
                if gm is None:
                    side[name] = dict(ok=pd.Series(dtype=float), failed=set(), missing=all_seeds)
                    continue
                okm = gm["status"] == "ok"
                side[name] = dict(ok=gm.loc[okm, opts.value].astype(float),
                                  failed=set(gm.index[~okm]), missing=all_seeds - set(gm.index))
            common = sorted(set(side["method"]["ok"].index) & set(side["baseline"]["ok"].index))
            res = paired_comparison(side["method"]["ok"].loc[common].to_numpy(),
                                    side["baseline"]["ok"].loc[common].to_numpy(), opts)
            if baseline not in per:
                res["note"] = "; ".join(filter(None, [f"{baseline} has no runs in this family", res["note"]]))
            row = dict(model=model, task=task, budget=float(budget), metric=metric,
                       value_column=opts.value, method=method, baseline=baseline, reference=reference,
                       comparison="vs_reference" if baseline == reference else "pair",
                       seeds=_seed_str(common), confidence=opts.confidence, resamples=opts.resamples,
                       ci_method=opts.ci_method, bootstrap_seed=opts.seed, **res)
            for name in ("method", "baseline"):
                s = side[name]
                row[f"n_ok_{name}"] = int(len(s["ok"]))
                row[f"n_failed_{name}"] = len(s["failed"])
                row[f"n_missing_{name}"] = len(s["missing"])
                row[f"failed_seeds_{name}"] = _seed_str(s["failed"])
                row[f"missing_seeds_{name}"] = _seed_str(s["missing"])
            fam_rows.append(row)
        if fam_rows:
            pt = holm([r["p_ttest"] for r in fam_rows])
            pw = holm([r["p_wilcoxon"] for r in fam_rows])
            n_tests = int(np.sum(~np.isnan([r["p_ttest"] for r in fam_rows])))
            for r, a, b in zip(fam_rows, pt, pw):
                r.update(p_ttest_holm=float(a), p_wilcoxon_holm=float(b), n_tests_family=n_tests)
            rows.extend(fam_rows)
    out = pd.DataFrame(rows, columns=SIGNIFICANCE_COLUMNS)
    return _sort(out, reference)


def _sort(df: pd.DataFrame, reference: str | None = None) -> pd.DataFrame:
    if df.empty:
        return df.reset_index(drop=True)
    t_rank = {t: i for i, t in enumerate(order_tasks(df["task"].unique()))}
    m_rank = {m: i for i, m in enumerate(order_methods(
        list(df["method"].unique()) + (list(df["baseline"].unique()) if "baseline" in df else []), reference))}
    key = df.assign(_t=df["task"].map(t_rank), _m=df["method"].map(m_rank))
    by = ["model", "budget", "_t", "_m"]
    if "baseline" in df:
        key["_b"] = df["baseline"].map(m_rank)
        by.append("_b")
    return key.sort_values(by, kind="stable").drop(columns=[c for c in key.columns if c.startswith("_")]).reset_index(drop=True)
