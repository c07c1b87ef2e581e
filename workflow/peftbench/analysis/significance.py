"""Seed-paired significance tests and per-method summary statistics over ``runs.parquet``.

Everything here reads the tidy run table written by the ``aggregate`` rule (one row per training
run; see :data:`RUNS_REQUIRED`) and returns tidy tables. Metric values stay fractions (0–1, or
−1–1 for correlations) in every table; plots and Markdown multiply by 100.

Statistics (all from :mod:`scipy.stats`; our code only pairs, groups and guards edge cases):

* **Budgets.** The ``budget`` column holds budget tokens (:class:`peftbench.budget.Budget`:
  ``"0.5"`` a percentage, ``"r8"`` a LoRA-rank equivalent, ``"100"`` the full budget); numbers in
  older tables are read as percentages. Budgets sort with :func:`order_budgets` (percentages by
  value, then rank budgets, then full), never as strings.
* **Families.** A family is one ``(model, task, budget)``. A budget-free method (``full``: its
  line of :data:`~peftbench.methods.METHOD_TABLE` says ``budget_free``; a method the table does
  not know counts as budget-free when all its runs have the full budget) is copied into every
  budget family of its model. The GLUE average forms its own family per ``(model, budget)``
  with ``task == "glue_avg"``.
* **Runs outside their budget family.** A run is compared inside its budget family only when it
  matches the budget (``budget_match``): the adapter parameters it counts against the budget
  (``budget_used_params``: AdaLoRA's final allocation, every adapter parameter otherwise; else
  ``effective_adapter_params``, else ``adapter_params``) are within ±10 %
  (:data:`peftbench.budget.BUDGET_TOLERANCE`) of ``budget_params``, and it is not
  ``capacity_limited``. Any other run goes to a family of its own real size, labelled
  ``"{budget}~{params}"`` (e.g. ``"r8~2300"``: planned at r8, about 2,300 adapter parameters;
  :func:`family_label`; one per model, method and planned budget, the size being the mean over
  those runs, two significant digits), with ``budget_match`` False; full fine-tuning is not copied
  into it. A table without ``budget_params`` matches every run that is not capacity-limited.
* **Run status.** ``status`` is one of :data:`~peftbench.vocab.RUN_STATUSES`: ``ok``, ``failed``
  (NaN/inf loss) or ``missing`` (no ``metrics.parquet`` when the runs were aggregated). Only ok
  runs give values; failed and missing runs are counted, never dropped.
* **Pairing.** Two methods are paired by ``seed``; only seeds where both runs have
  ``status == "ok"`` and a finite value are used (``n``). Per side, seeds whose run failed are
  counted in ``n_failed_*`` and listed in ``failed_seeds_*``; seeds whose run is ``missing`` or
  has no row at all (while another method of the family has one) in ``n_missing_*`` /
  ``missing_seeds_*``.
* **Difference.** ``d_i = x_method,i − x_baseline,i``; ``mean_diff = mean(d)``.
* **CI.** ``scipy.stats.bootstrap((d,), np.mean)`` with a fixed seed (a fresh
  ``numpy.random.default_rng(seed)`` per call, so every number is reproducible on its own),
  ``n_resamples`` resamples and method ``ci_method`` (defaults: the config schema's
  ``analysis`` section, :func:`peftbench.config.schema_defaults`). ``n < 2``: NaN. All
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
* **OOD metrics.** :func:`compare_ood` runs the same tests on each out-of-distribution set's
  accuracy (``tables/ood.parquet``), one family per ``(model, task, budget)`` and OOD set.
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

from ..budget import BUDGET_TOLERANCE, Budget, BudgetError, within_budget
from ..config import schema_defaults
from ..methods import FULL_BUDGET, METHODS
from ..vocab import GLUE_AVG, RUN_STATUSES, TASKS, order_tasks

__all__ = [
    "GLUE_AVG",
    "FULL_BUDGET",
    "DEFAULT_REFERENCE",
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
    "compare_ood",
    "ood_value_column",
    "order_methods",
    "order_tasks",
    "budget_free_methods",
    "budget_match",
    "family_label",
    "parse_family",
    "family_token",
    "order_budgets",
    "budget_label",
    "FULL_TOKEN",
]

#: The ``budget`` token of budget-free runs (full fine-tuning): ``"100"``.
FULL_TOKEN: str = Budget.full().token
#: Separates the planned budget from the real size in an off-family label (``"r8~2300"``).
OFF_FAMILY_SEP = "~"
#: Columns holding a run's adapter count against the budget, first present and finite wins.
USED_PARAMS_COLUMNS = ("budget_used_params", "effective_adapter_params", "adapter_params")

#: Columns :func:`validate_runs` requires in ``runs.parquet``.
RUNS_REQUIRED = ("model", "task", "method", "budget", "seed", "status", "metric", "dev_main")
#: Columns only a run with a ``metrics.parquet`` has: a table whose runs are all ``missing`` may
#: lack them (they are then added as NaN).
_RESULT_COLUMNS = ("metric", "dev_main")

#: The config schema's defaults of the ``analysis:`` section (the only place stating them).
_DEFAULTS = schema_defaults("analysis")
#: Reference method when none is given (``analysis.reference_method``).
DEFAULT_REFERENCE: str = _DEFAULTS["reference_method"]

_AGGREGATE_HINT = "it is written by the `aggregate` rule: run `snakemake results/tables/runs.parquet`"


@dataclass(frozen=True)
class StatsOptions:
    """Bootstrap and test settings shared by :func:`method_stats` and :func:`compare_methods`.

    Every default but ``min_n_wilcoxon`` (not a config key) is the config schema's default of the
    ``analysis`` key named in brackets.

    Attributes:
        resamples: bootstrap resamples (``n_resamples`` of :func:`scipy.stats.bootstrap`)
            [``bootstrap_resamples``].
        confidence: two-sided confidence level of the bootstrap interval (0 < c < 1) [``confidence``].
        seed: seed of the ``numpy.random.default_rng`` created afresh for every interval
            [``bootstrap_seed``].
        ci_method: ``"BCa"``, ``"percentile"`` or ``"basic"`` (scipy's names) [``ci_method``].
        min_n_wilcoxon: smallest number of paired seeds for which the Wilcoxon test is run.
        value: the run-table column compared (``dev_main``: final epoch; ``best_dev_main``: best)
            [``value``].
        glue_exclude: tasks left out of the GLUE average (e.g. ``("wnli",)``) [``glue_avg_exclude``].
    """

    resamples: int = _DEFAULTS["bootstrap_resamples"]
    confidence: float = _DEFAULTS["confidence"]
    seed: int = _DEFAULTS["bootstrap_seed"]
    ci_method: str = _DEFAULTS["ci_method"]
    min_n_wilcoxon: int = 6
    value: str = _DEFAULTS["value"]
    glue_exclude: tuple[str, ...] = tuple(_DEFAULTS["glue_avg_exclude"])

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
# Budget tokens and families
# --------------------------------------------------------------------------------------------

def family_label(budget: str, params: float) -> str:
    """The family of runs planned at ``budget`` that train ``params`` adapter parameters instead:
    ``"{budget}~{params to two significant digits}"`` (``family_label("r8", 2304)`` → ``"r8~2300"``;
    ``"r8~nan"`` when the size was not recorded)."""
    size = float(params)
    return f"{Budget.parse(budget).token}{OFF_FAMILY_SEP}{int(float(f'{size:.2g}')) if math.isfinite(size) else 'nan'}"


def parse_family(value) -> tuple[Budget, float | None]:
    """``(planned budget, real size)`` of a family token: ``("r8~2300")`` → ``(r8, 2300.0)``; a plain
    budget → ``(budget, None)``.

    Raises:
        peftbench.budget.BudgetError: not a budget or family token.
    """
    if isinstance(value, str) and OFF_FAMILY_SEP in value:
        nominal, _, size = value.partition(OFF_FAMILY_SEP)
        try:
            return Budget.parse(nominal), float(size)
        except ValueError:
            raise BudgetError(f"family {value!r} is not <budget>~<parameters>") from None
    return Budget.parse(value), None


def family_token(value) -> str:
    """The canonical token of a budget (any spelling, numbers of older tables included: ``0.2`` →
    ``"0.2"``, ``100.0`` → ``"100"``) or of an off-family label (unchanged).

    Raises:
        peftbench.budget.BudgetError: not a budget or family token.
    """
    nominal, size = parse_family(value)
    return nominal.token if size is None else str(value)


def _budget_sort_key(value) -> tuple:
    nominal, size = parse_family(value)
    return (*nominal.sort_key(), 0 if size is None else 1, size or 0.0)


def order_budgets(values: Iterable) -> list[str]:
    """Distinct budget/family tokens in display order: percentages by value, then rank budgets
    (``r1`` < ``r2`` < ``r8``), then full; an off-family right after its planned budget."""
    return sorted({family_token(v) for v in values}, key=_budget_sort_key)


def budget_label(value) -> str:
    """Display label of a budget or family: ``"0.5%"``, ``"r8 (LoRA rank 8)"``, ``"full (100%)"``,
    ``"outside r8: 2.3k adapter params"``."""
    nominal, size = parse_family(value)
    if size is None:
        return nominal.label
    if not math.isfinite(size):
        return f"outside {nominal.token}: size not recorded"
    return f"outside {nominal.token}: {_human(size)} adapter params"


def _human(n: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.0f}"


def _used_params(df: pd.DataFrame) -> pd.Series:
    """Per row: the adapter parameters counted against the budget (:data:`USED_PARAMS_COLUMNS`)."""
    out = pd.Series(np.nan, index=df.index, dtype=float)
    for c in USED_PARAMS_COLUMNS:
        if c in df.columns:
            v = pd.to_numeric(df[c], errors="coerce").astype(float)
            out = out.where(np.isfinite(out), v)
    return out


def budget_match(runs: pd.DataFrame, budget_free: set[str] | None = None,
                 tolerance: float = BUDGET_TOLERANCE) -> pd.Series:
    """Per run: does it match its budget (see the module docstring, "Runs outside their budget
    family")?

    True for budget-free methods; False for ``capacity_limited`` runs and for runs whose count
    (:data:`USED_PARAMS_COLUMNS`) is outside ``budget_params · (1 ± tolerance)``; a run without
    sizes (``missing``, or a table without ``budget_params``) follows the other runs of its
    ``(model, method, budget)`` (False when all of them are False), else True.
    """
    free = budget_free_methods(runs) if budget_free is None else budget_free
    used = _used_params(runs)
    target = (pd.to_numeric(runs["budget_params"], errors="coerce").astype(float)
              if "budget_params" in runs.columns else pd.Series(np.nan, index=runs.index))
    sized = np.isfinite(used) & np.isfinite(target) & (target > 0)
    ok = pd.Series(True, index=runs.index)
    if sized.any():
        ok[sized] = [within_budget(u, t, tolerance) for u, t in zip(used[sized], target[sized])]
    if "capacity_limited" in runs.columns:
        cap = runs["capacity_limited"].map(lambda v: bool(v) if v is not None and v == v else False)
        ok &= ~cap.astype(bool)
        sized |= cap.astype(bool)
    free_rows = runs["method"].isin(free)
    ok[free_rows] = True
    # runs without sizes follow their siblings
    unsized = ~sized & ~free_rows
    if unsized.any():
        keys = ["model", "method", "budget"]
        off = ok[sized].groupby([runs.loc[sized, k] for k in keys]).all()
        for i in runs.index[unsized]:
            k = tuple(runs.loc[i, keys])
            if k in off.index and not off.loc[k]:
                ok[i] = False
    return ok.astype(bool)


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

    Required columns: :data:`RUNS_REQUIRED` plus ``value`` (a table whose runs are all
    ``missing`` may lack ``metric`` and the value columns: they are added as NaN). ``budget``
    becomes its token string (:class:`peftbench.budget.Budget`: ``0.5`` → ``"0.5"``, ``100.0`` →
    ``"100"``, ``"r8"``), ``seed`` int, ``status`` str. ``status`` must be one of
    :data:`~peftbench.vocab.RUN_STATUSES` (``missing``: the ``aggregate`` rule found no
    ``metrics.parquet``; such a row has its keys only). A run with ``status == "ok"`` but a
    non-finite ``value`` is treated as failed (its ``error`` says so).

    Raises:
        ValueError: missing columns, no rows, a ``budget`` that is not a budget, a ``status``
            outside ``RUN_STATUSES`` (the message lists the allowed ones), or two rows for the
            same ``(model, task, method, budget, seed)``; the message names ``source``.
    """
    need = list(dict.fromkeys([*RUNS_REQUIRED, value]))
    missing = [c for c in need if c not in runs.columns]
    all_missing = ("status" in runs.columns and len(runs) > 0
                   and bool((runs["status"].astype(str) == "missing").all()))
    if all_missing:  # no run finished: the result columns may not exist at all
        missing = [c for c in missing if c not in (*_RESULT_COLUMNS, value, "best_dev_main")]
    if missing:
        raise ValueError(f"{source}: missing column(s) {', '.join(missing)}; {_AGGREGATE_HINT}")
    if runs.empty:
        raise ValueError(f"{source}: no runs (zero rows); {_AGGREGATE_HINT} after training")
    df = runs.copy()
    for c in need:
        if c not in df.columns:
            df[c] = math.nan
    try:
        df["budget"] = df["budget"].map(lambda b: Budget.parse(b).token).astype(object)
    except BudgetError as exc:
        raise ValueError(f"{source}: column budget: {exc}") from None
    df["seed"] = df["seed"].astype(int)
    df["status"] = df["status"].astype(str)
    bad = sorted(set(df["status"]) - set(RUN_STATUSES))
    if bad:
        raise ValueError(f"{source}: column status has value(s) {bad}; allowed: "
                         f"{', '.join(repr(s) for s in RUN_STATUSES)}")
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
    """Methods in display order: the budget-free baselines of the method table (``full``), then
    the reference, then the others in :data:`~peftbench.methods.METHODS` order, then unknown
    ones A–Z."""
    ms = list(dict.fromkeys(methods))
    rank = {m: i for i, m in enumerate(METHODS)}

    def key(m):
        info = METHODS.get(m)
        if info is not None and info.budget_free:
            return (0, rank[m], m)
        if m == reference:
            return (1, 0, m)
        return (2, rank.get(m, len(rank)), m)

    return sorted(ms, key=key)


def budget_free_methods(runs: pd.DataFrame) -> set[str]:
    """Methods of ``runs`` that ignore the budget (one run per task and seed, under
    :data:`~peftbench.methods.FULL_BUDGET`).

    A method of the method table is budget-free when its line says so (``budget_free``); a method
    the table does not know is budget-free when all its runs have the full budget (``100``, token
    :data:`FULL_TOKEN`).
    """
    out = set()
    for m, b in runs.groupby("method")["budget"]:
        info = METHODS.get(m)
        if info is not None:
            if info.budget_free:
                out.add(m)
        elif all(_is_full(v) for v in b):
            out.add(m)
    return out


def _is_full(value) -> bool:
    try:
        return parse_family(value) == (Budget.full(), None)
    except BudgetError:
        return False


# --------------------------------------------------------------------------------------------
# Statistics primitives
# --------------------------------------------------------------------------------------------

def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm–Bonferroni step-down adjusted p-values (Holm 1979), computed by
    ``statsmodels.stats.multitest.multipletests(method="holm")``.

    With the m non-NaN p-values sorted ascending, ``p_(1) <= … <= p_(m)``:
    ``adj_(i) = min(1, max_{j <= i} (m − j + 1) · p_(j))``. The adjusted values are returned in
    the input order; NaN inputs stay NaN and do not count towards m (statsmodels would propagate
    them, so they are left out before the call).

    Example: ``holm([0.01, 0.04, 0.03, 0.005])`` → ``[0.03, 0.06, 0.06, 0.02]``.
    """
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        out[ok] = multipletests(p[ok], method="holm")[1]
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

def budget_families(runs: pd.DataFrame) -> pd.DataFrame:
    """Assign every run to its budget family.

    ``budget`` becomes the family token and three columns are added: ``run_budget`` (the run's
    own budget: :data:`FULL_TOKEN` for full fine-tuning), ``nominal_budget`` (the grid budget the
    family belongs to) and ``budget_match`` (:func:`budget_match`).

    * A run that matches its budget keeps it as its family.
    * A run that does not (count outside ±10 % of ``budget_params``, or ``capacity_limited``) goes
      to the family of its real size, :func:`family_label` of its planned budget and the mean
      count (:data:`USED_PARAMS_COLUMNS`) of the unmatched runs of its ``(model, method, budget)``.
    * Runs of a budget-free method (:func:`budget_free_methods`: full fine-tuning) are copied into
      every budget family that another method of the same model has (not into off-family
      families). A model with only budget-free methods keeps the single family of the full budget.

    Works on tables without parameter columns (curves, ranks): every run then matches.

    Returns:
        A copy of ``runs`` with ``budget`` as family tokens and the added columns.
    """
    df = runs.copy()
    df["budget"] = df["budget"].map(family_token).astype(object)
    df["run_budget"] = df["budget"]
    df["nominal_budget"] = df["budget"]
    full = budget_free_methods(df)
    df["budget_match"] = budget_match(df, full) if len(df) else pd.Series(dtype=bool)
    off = ~df["budget_match"].astype(bool)
    if off.any():
        used = _used_params(df)
        for (model, method, b), g in df[off].groupby(["model", "method", "budget"], sort=False):
            size = used[g.index]
            size = float(size[np.isfinite(size)].mean()) if np.isfinite(size).any() else math.nan
            df.loc[g.index, "budget"] = family_label(b, size)
    parts = []
    for model, g in df.groupby("model", sort=False):
        is_full = g["method"].isin(full)
        budgets = order_budgets(g.loc[~is_full & g["budget_match"], "budget"].unique())
        parts.append(g.loc[~is_full])
        fg = g.loc[is_full]
        if not budgets:
            parts.append(fg)
            continue
        for b in budgets:
            parts.append(fg.assign(budget=b, nominal_budget=b))
    out = pd.concat(parts, ignore_index=True) if parts else df
    out["budget_match"] = out["budget_match"].astype(bool)
    return out


def glue_average_runs(runs: pd.DataFrame, value: str = "dev_main", exclude: Iterable[str] = ()) -> pd.DataFrame:
    """Per-seed GLUE average as pseudo-runs with ``task == "glue_avg"``.

    For every ``(model, method, budget, seed)`` the value is the mean of ``value`` (the task's main
    metric) over the model's task set: every task of that model in ``runs`` except ``exclude``
    and except ``glue_avg`` itself. The seed counts as ``status == "ok"`` only when all of those
    tasks have an ok run for it; otherwise it is ``failed`` when some task's run failed, else
    ``missing`` (some task's run is ``missing`` or has no row), and ``error`` lists the failed and
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
            status = dict(zip(g["task"], g["status"]))
            failed = [t for t in tasks if status.get(t) == "failed"]
            missing = [t for t in tasks if status.get(t, "missing") == "missing"]
            row = dict(model=model, task=GLUE_AVG, method=method, budget=budget, seed=int(seed),
                       metric=f"mean of main metrics over {len(tasks)} tasks", n_tasks=len(tasks),
                       tasks=",".join(tasks))
            if failed or missing:
                why = []
                if failed:
                    why.append("failed: " + ",".join(failed))
                if missing:
                    why.append("missing: " + ",".join(missing))
                row.update(status="failed" if failed else "missing",
                           error="glue_avg incomplete (" + "; ".join(why) + ")",
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
    """Validated runs assigned to budget families (:func:`budget_families`), plus the GLUE-average
    pseudo-runs of every family (:func:`glue_average_runs` over the family rows, so a run outside
    its budget family is averaged in its own family). This is the row set every statistic is
    computed on; columns ``run_budget``, ``nominal_budget`` and ``budget_match`` included.

    Raises:
        ValueError: see :func:`validate_runs`.
    """
    runs = validate_runs(runs, value=opts.value)
    fam = budget_families(runs)
    glue = glue_average_runs(fam, opts.value, opts.glue_exclude)
    if glue.empty:
        return fam
    keys = ["model", "method", "budget"]
    attrs = fam.drop_duplicates(keys)[[*keys, "run_budget", "nominal_budget", "budget_match"]]
    glue = glue.merge(attrs, on=keys, how="left")
    out = pd.concat([fam, glue], ignore_index=True)
    out["budget_match"] = out["budget_match"].astype(bool)
    return out


def _seed_str(seeds: Iterable[int]) -> str:
    return ",".join(str(int(s)) for s in sorted(seeds))


def _family_metric(g: pd.DataFrame, task: str) -> str:
    """The family's metric name: from its runs (missing runs have none), else the task's main
    metric (:data:`~peftbench.vocab.TASKS`), else ``""``."""
    names = g["metric"].dropna()
    if len(names):
        return str(names.iloc[0])
    return TASKS[task].main_metric if task in TASKS else ""


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------

STATS_COLUMNS = ["model", "task", "budget", "nominal_budget", "budget_match", "method", "metric", "value_column", "n_ok", "n_failed",
                 "n_missing", "seeds_ok", "failed_seeds", "missing_seeds", "mean", "std", "median",
                 "ci_low", "ci_high", "best_mean", "confidence", "resamples", "ci_method",
                 "bootstrap_seed", "n_tasks", "tasks"]


def method_stats(runs: pd.DataFrame, opts: StatsOptions = StatsOptions()) -> pd.DataFrame:
    """Per-method descriptive statistics of the main metric over seeds.

    One row per ``(model, task, budget, method)`` family member (``full`` copied into every
    budget; a run outside its budget family in its own family, ``budget_match`` False), including
    ``task == "glue_avg"`` rows (the GLUE average per method per
    ``(model, budget)``: per seed the mean main metric over tasks, then statistics over seeds).

    Columns (:data:`STATS_COLUMNS`): ``metric`` the family's main metric; ``n_ok`` seeds with an
    ok run; ``n_failed`` seeds whose run failed (for glue_avg: some task's run failed);
    ``n_missing`` seeds whose run is ``missing`` (no ``metrics.parquet``; for glue_avg: some
    task's run is missing) or has no row while another method of the family has one, so
    ``n_ok + n_failed + n_missing`` is the family's seed count; ``seeds_ok``/``failed_seeds``/``missing_seeds``
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
        metric = _family_metric(g, task)
        for method, gm in g.groupby("method", sort=False):
            ok = gm[gm["status"] == "ok"]
            x = ok[opts.value].to_numpy(dtype=float)
            lo, hi = bootstrap_ci(x, opts)
            best = (float(ok["best_dev_main"].astype(float).mean())
                    if "best_dev_main" in ok.columns and len(ok) else math.nan)
            failed = set(gm.loc[gm["status"] == "failed", "seed"])
            missing = all_seeds - set(ok["seed"]) - failed
            rows.append(dict(
                model=model, task=task, budget=budget, nominal_budget=str(gm["nominal_budget"].iloc[0]),
                budget_match=bool(gm["budget_match"].all()), method=method, metric=metric,
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
    "model", "task", "budget", "nominal_budget", "budget_match", "metric", "value_column", "method", "baseline", "reference",
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


def compare_methods(runs: pd.DataFrame, reference: str = DEFAULT_REFERENCE, all_pairs: bool = False,
                    opts: StatsOptions = StatsOptions()) -> pd.DataFrame:
    """Seed-paired comparisons of methods within every ``(model, task, budget)`` family.

    Each method of a family is compared with ``reference`` (``baseline == reference``); with
    ``all_pairs`` every unordered pair of methods of the family is compared once (the reference,
    when involved, is the baseline; otherwise the method earlier in :func:`order_methods` is).
    ``task == "glue_avg"`` rows compare the per-seed GLUE averages (:func:`glue_average_runs`).
    A family without the reference still gets one row per method, with ``n == 0`` and a note.

    Runs outside their budget family (``budget_match`` False) are compared only within their
    own family (:func:`budget_families`), never with the methods that match the budget.

    Columns (:data:`SIGNIFICANCE_COLUMNS`): the family keys, ``nominal_budget`` and
    ``budget_match`` (the family is a grid budget, not an off-family size), ``metric`` (main metric name),
    ``value_column``, ``method``, ``baseline``, ``reference``, ``comparison``
    (``"vs_reference"`` or ``"pair"``), ``n`` paired seeds and ``seeds`` (their list), the
    statistics of :func:`paired_comparison` (means/SDs over the paired seeds, so
    ``mean_diff == mean_method − mean_baseline``; fractions, not %), ``p_ttest_holm`` and
    ``p_wilcoxon_holm`` (:func:`holm` over the family's comparisons), ``n_tests_family`` (number
    of non-NaN t-test p-values in the family), and per side ``n_ok``, ``n_failed``,
    ``n_missing`` and the failed/missing seed lists (as in :func:`method_stats`: a ``missing``
    run counts as a missing seed), plus the bootstrap settings and ``note``.

    Raises:
        ValueError: see :func:`validate_runs`.
    """
    fam = family_runs(runs, opts)
    rows = []
    for (model, task, budget), g in fam.groupby(["model", "task", "budget"], sort=False):
        all_seeds = set(g["seed"])
        methods = list(g["method"].unique())
        per = {m: gm.set_index("seed") for m, gm in g.groupby("method", sort=False)}
        metric = _family_metric(g, task)
        nominal, match = str(g["nominal_budget"].iloc[0]), parse_family(budget)[1] is None
        fam_rows = []
        for method, baseline in _pairs(methods, reference, all_pairs):
            side = {}
            for name, m in (("method", method), ("baseline", baseline)):
                gm = per.get(m)
                if gm is None:
                    side[name] = dict(ok=pd.Series(dtype=float), failed=set(), missing=all_seeds)
                    continue
                okm = gm["status"] == "ok"
                failed = set(gm.index[gm["status"] == "failed"])
                side[name] = dict(ok=gm.loc[okm, opts.value].astype(float), failed=failed,
                                  missing=all_seeds - set(gm.index[okm]) - failed)
            common = sorted(set(side["method"]["ok"].index) & set(side["baseline"]["ok"].index))
            res = paired_comparison(side["method"]["ok"].loc[common].to_numpy(),
                                    side["baseline"]["ok"].loc[common].to_numpy(), opts)
            if baseline not in per:
                res["note"] = "; ".join(filter(None, [f"{baseline} has no runs in this family", res["note"]]))
            if not match:
                res["note"] = "; ".join(filter(None, [f"own family: outside the {nominal} budget family "
                                                      f"({budget_label(budget)})", res["note"]]))
            row = dict(model=model, task=task, budget=budget, nominal_budget=nominal, budget_match=match,
                       metric=metric,
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
    b_rank = {b: i for i, b in enumerate(order_budgets(df["budget"].unique()))}
    key = df.assign(_t=df["task"].map(t_rank), _m=df["method"].map(m_rank), _bud=df["budget"].map(b_rank))
    by = ["model", "_bud", "_t", "_m"]
    if "baseline" in df:
        key["_b"] = df["baseline"].map(m_rank)
        by.append("_b")
    return key.sort_values(by, kind="stable").drop(columns=[c for c in key.columns if c.startswith("_")]).reset_index(drop=True)


#: Columns of the OOD significance table: :data:`SIGNIFICANCE_COLUMNS` with ``ood_set`` after ``task``.
OOD_SIGNIFICANCE_COLUMNS = [*SIGNIFICANCE_COLUMNS[:2], "ood_set", *SIGNIFICANCE_COLUMNS[2:]]


def ood_value_column(ood_set: str) -> str:
    """The run-table column of an OOD set's accuracy (``ood_<set>_accuracy``, as the explorer's)."""
    return f"ood_{ood_set}_accuracy"


def compare_ood(runs: pd.DataFrame, ood: pd.DataFrame, reference: str = DEFAULT_REFERENCE, all_pairs: bool = False,
                opts: StatsOptions = StatsOptions()) -> pd.DataFrame:
    """The seed-paired tests of :func:`compare_methods`, on each OOD set's accuracy instead of the
    dev metric: the same families, pairing, bootstrap CI, t-test, Wilcoxon, Cohen's d and Holm
    (within each ``(model, task, budget)`` family of one OOD set).

    ``ood`` is ``tables/ood.parquet`` (its headline rows, :func:`peftbench.ood.headline`: accuracy
    over the whole set, a fraction in the scored classes). For OOD set ``s`` the compared value is
    ``ood_<s>_accuracy`` (:func:`ood_value_column`) of the runs of the tasks that were scored on
    ``s``; an ok run without a row for ``s`` counts as ``missing``. GLUE-average rows are not
    formed (each set is scored after one training task).

    Returns:
        :data:`OOD_SIGNIFICANCE_COLUMNS`: per OOD set, :func:`compare_methods`' rows with
        ``ood_set``, ``metric == "accuracy"`` and ``value_column == ood_<set>_accuracy``; empty
        when ``ood`` has no rows.

    Raises:
        ValueError: see :func:`validate_runs`; an OOD table without the run key, ``ood_set`` or
            ``accuracy``.
    """
    from dataclasses import replace

    from ..ood import headline
    from ..vocab import OOD_SETS
    from .explorer import with_ood_columns

    if ood is None or ood.empty:
        return pd.DataFrame(columns=OOD_SIGNIFICANCE_COLUMNS)
    runs = validate_runs(runs, value=opts.value)
    wide = with_ood_columns(runs, ood)
    head = headline(ood)
    rank = {s: i for i, s in enumerate(OOD_SETS)}
    frames = []
    for name in sorted(head["ood_set"].unique(), key=lambda s: (rank.get(s, len(rank)), s)):
        col = ood_value_column(name)
        tasks = set(head.loc[head["ood_set"] == name, "task"])
        sub = wide[wide["task"].isin(tasks)].copy()
        no_row = (sub["status"] == "ok") & sub[col].isna()
        sub.loc[no_row, "status"] = "missing"
        res = compare_methods(sub, reference, all_pairs, replace(opts, value=col))
        res = res[res["task"] != GLUE_AVG].copy()
        res["metric"] = "accuracy"
        res.insert(2, "ood_set", name)
        frames.append(res)
    return pd.concat(frames, ignore_index=True)[OOD_SIGNIFICANCE_COLUMNS]
