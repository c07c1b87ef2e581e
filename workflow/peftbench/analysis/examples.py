"""Example-level significance: tests that account for the dev set as well as the seeds.

The seed-paired tests of :mod:`peftbench.analysis.significance` treat the dev-set score of a seed
as exact; with a few hundred dev examples (RTE, MRPC, CoLA) the test-set sampling error is of the
same size as the seed variance. This module reads the runs' predictions
(``results/tables/predictions.parquet``, :func:`peftbench.outputs.prediction_frame`) and writes
``results/tables/example_significance.parquet`` (:data:`EXAMPLE_COLUMNS`), one row per test:

* ``hier_bootstrap`` — a paired hierarchical bootstrap over seeds and dev examples together
  (Bouthillier et al. 2021, "Accounting for Variance in Machine Learning Benchmarks",
  arXiv:2103.03098, Sec. 3; the two-level resampling of hierarchical data, Davison & Hinkley
  1997, Sec. 3.8). One resample draws ``n_s`` seeds with replacement from the ``n_s`` seeds
  both methods ran ok, then, for every drawn seed independently, ``n_e`` dev examples with
  replacement from the ``n_e`` examples both methods were scored on; the statistic is the mean
  over the drawn seeds of ``metric(method) − metric(reference)``, the metric *recomputed* on the
  resampled examples (so MCC, F1 and Pearson, which do not decompose over examples, are handled
  exactly). Method and reference share the drawn seeds and examples (paired). Draw order (per
  resample ``b``, from one ``numpy.random.default_rng(seed)``): ``rng.integers(0, n_s, n_s)``
  then ``rng.integers(0, n_e, (n_s, n_e))``. ``ci_low``/``ci_high``: percentile interval at
  ``confidence``; ``p_value``: two-sided bootstrap p-value
  ``min(1, 2·min(1 + #{T* <= 0}, 1 + #{T* >= 0}) / (B + 1))`` (the +1 counts the observed
  sample, so p is never 0).
* ``mcnemar`` — McNemar's test per seed for tasks whose main metric is an accuracy
  (McNemar 1947; Dietterich 1998): the 2×2 table of (method correct?, reference correct?) on
  the shared dev examples, by ``statsmodels.stats.contingency_tables.mcnemar``, exact
  (binomial) when the discordant count ``b + c`` is below :data:`MCNEMAR_EXACT_BELOW`, else the
  chi-square statistic with continuity correction.
* ``aso`` — Almost Stochastic Order (Dror, Shlomov & Reichart 2019, "Deep Dominance — How to
  Properly Compare Deep Neural Models", ACL 2019; del Barrio et al. 2018) of the method over the
  reference on the seed-level scores (``opts.value`` of the ok runs), by ``deepsig.aso``
  (Ulmer et al. 2022, arXiv:2204.06815). ``eps_min`` < 0.5: the method is almost stochastically
  larger (better) at ``confidence``; it is not a p-value (``p_value`` stays NaN). ``deepsig``
  is an optional dependency (GPL-3.0, extra ``aso``); without it the row says so in ``note``.

Families and Holm: as in the seed-level table, a family is one ``(model, task, budget)``
(:func:`peftbench.analysis.significance.family_runs`; ``full`` copied into every budget, runs
outside their budget in their own family). ``p_holm`` adjusts the family's p-values of one test
kind (:func:`peftbench.analysis.significance.holm`): the bootstrap p-values over its methods,
the McNemar p-values over its (method, seed) tests. GLUE-average rows are not formed here (an
example belongs to one task).

Which predictions: the task's main-metric split (MNLI: ``validation_matched``), at the epoch
whose score ``opts.value`` reports: the final epoch for ``dev_main`` (the largest ``epoch`` of the
run's predictions), the run's ``best_epoch`` for ``best_dev_main``.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from ..vocab import TASKS, split_suffix
from .significance import (DEFAULT_REFERENCE, StatsOptions, _family_metric, _sort, family_runs, holm,
                           order_methods, read_table)

#: McNemar's test is exact (binomial) when the discordant count b + c is below this.
MCNEMAR_EXACT_BELOW = 25
#: Bootstrap iterations of ``deepsig.aso`` (its default; ε_min's own estimate of its spread, not
#: the CI resamples: 10 000 would cost ~30 s per comparison).
ASO_ITERATIONS = 1000

#: Columns of ``example_significance.parquet``.
EXAMPLE_COLUMNS = [
    "model", "task", "budget", "metric", "value_column", "method", "reference", "test", "seed",
    "n_seeds", "seeds", "n_examples", "mean_diff", "ci_low", "ci_high", "statistic", "p_value",
    "p_holm", "n_tests_family", "n_discordant", "exact", "eps_min", "confidence", "resamples",
    "bootstrap_seed", "note",
]

#: Metrics :func:`metric_rows` computes per example (the others are left out of the table).
EXAMPLE_METRICS = ("accuracy", "f1", "matthews_correlation", "pearson", "spearman")

#: Columns the predictions table needs.
PREDICTIONS_REQUIRED = ("model", "task", "method", "budget", "seed", "epoch", "split", "idx", "label")


def metric_rows(metric: str, gold: np.ndarray, out: np.ndarray, regression: bool) -> np.ndarray:
    """One metric per row of ``(k, n)`` arrays, as :func:`peftbench.metrics.compute_metrics`
    computes it for one row (same values to floating-point rounding).

    Args:
        metric: ``accuracy``, ``f1`` (positive class 1, binary), ``matthews_correlation``
            (binary), ``pearson`` or ``spearman`` (base names, no split suffix).
        gold: ``(k, n)`` class ids or gold scores.
        out: ``(k, n)`` predicted class ids or predicted scores.
        regression: scores (STS-B) rather than classes.

    Returns:
        ``(k,)`` float64. As ``compute_metrics``: a constant row has correlation 0 (not NaN), F1
        with no predicted or gold positive is 0, and so is MCC with an empty margin.

    Raises:
        ValueError: an unknown metric, or MCC/F1 on more than two classes.
    """
    gold = np.asarray(gold, dtype=np.float64)
    out = np.asarray(out, dtype=np.float64)
    if metric in ("pearson", "spearman"):
        if metric == "spearman":
            gold, out = stats.rankdata(gold, axis=1), stats.rankdata(out, axis=1)
        gc, oc = gold - gold.mean(axis=1, keepdims=True), out - out.mean(axis=1, keepdims=True)
        den = np.sqrt((gc ** 2).sum(axis=1) * (oc ** 2).sum(axis=1))
        const = (np.ptp(gold, axis=1) == 0) | (np.ptp(out, axis=1) == 0)
        r = np.where(const, 0.0, (gc * oc).sum(axis=1) / np.where(den == 0, 1.0, den))
        return np.clip(r, -1.0, 1.0)
    if metric == "accuracy":
        return (gold == out).mean(axis=1)
    if metric not in ("f1", "matthews_correlation"):
        raise ValueError(f"no example-level implementation for metric {metric!r}")
    if max(gold.max(initial=0), out.max(initial=0)) > 1:
        raise ValueError(f"{metric} at the example level is implemented for two classes only")
    tp = ((gold == 1) & (out == 1)).sum(axis=1).astype(float)
    tn = ((gold == 0) & (out == 0)).sum(axis=1).astype(float)
    fp = ((gold == 0) & (out == 1)).sum(axis=1).astype(float)
    fn = ((gold == 1) & (out == 0)).sum(axis=1).astype(float)
    if metric == "f1":
        den = 2 * tp + fp + fn
        return np.where(den == 0, 0.0, 2 * tp / np.where(den == 0, 1.0, den))
    den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return np.where(den == 0, 0.0, (tp * tn - fp * fn) / np.where(den == 0, 1.0, den))


def hierarchical_bootstrap(gold: np.ndarray, method: np.ndarray, reference: np.ndarray, metric: str,
                           regression: bool, opts: StatsOptions = StatsOptions()) -> dict:
    """Paired hierarchical bootstrap over seeds and examples (see the module docstring).

    Args:
        gold: ``(n_e,)`` labels of the shared dev examples.
        method, reference: ``(n_s, n_e)`` predictions (class ids or scores) per paired seed, rows
            in the same seed order, columns in ``gold``'s example order.
        metric: base metric name (:func:`metric_rows`).
        regression: scores rather than classes.
        opts: ``resamples`` (B), ``confidence``, ``seed``.

    Returns:
        ``{"mean_diff", "ci_low", "ci_high", "p_value"}``: the observed mean over seeds of
        ``metric(method) − metric(reference)`` on all examples, the percentile CI and the
        two-sided p-value of the B resampled statistics.

    Raises:
        ValueError: shapes that do not fit, or no seed / example.
    """
    method, reference = np.asarray(method), np.asarray(reference)
    n_s, n_e = method.shape
    if reference.shape != method.shape or len(gold) != n_e or n_s == 0 or n_e == 0:
        raise ValueError(f"hierarchical_bootstrap: method {method.shape}, reference {reference.shape}, "
                         f"gold ({len(gold)},); need equal (n_seeds >= 1, n_examples >= 1) shapes")
    g = np.broadcast_to(np.asarray(gold), (n_s, n_e))
    observed = float(np.mean(metric_rows(metric, g, method, regression)
                             - metric_rows(metric, g, reference, regression)))
    rng = np.random.default_rng(opts.seed)
    gold = np.asarray(gold)
    boot = np.empty(opts.resamples)
    for b in range(opts.resamples):
        s = rng.integers(0, n_s, n_s)
        e = rng.integers(0, n_e, (n_s, n_e))
        gb = gold[e]
        boot[b] = np.mean(metric_rows(metric, gb, method[s[:, None], e], regression)
                          - metric_rows(metric, gb, reference[s[:, None], e], regression))
    alpha = (1.0 - opts.confidence) / 2
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
    p = min(1.0, 2.0 * min(1 + np.sum(boot <= 0), 1 + np.sum(boot >= 0)) / (opts.resamples + 1))
    return {"mean_diff": observed, "ci_low": float(lo), "ci_high": float(hi), "p_value": float(p)}


def mcnemar_test(gold: np.ndarray, method: np.ndarray, reference: np.ndarray) -> dict:
    """McNemar's test of two classifiers' accuracies on the same examples.

    Args:
        gold, method, reference: ``(n,)`` class ids.

    Returns:
        ``{"statistic", "p_value", "n_discordant", "exact", "mean_diff"}``: the table
        ``[[both right, only method right], [only reference right, both wrong]]`` tested by
        ``statsmodels.stats.contingency_tables.mcnemar`` (exact binomial when the discordant count
        is below :data:`MCNEMAR_EXACT_BELOW`, else chi-square with continuity correction; exact:
        the statistic is min(b, c)); ``mean_diff`` the accuracy difference method − reference.
    """
    from statsmodels.stats.contingency_tables import mcnemar

    a = np.asarray(method) == np.asarray(gold)
    r = np.asarray(reference) == np.asarray(gold)
    table = np.array([[np.sum(a & r), np.sum(a & ~r)], [np.sum(~a & r), np.sum(~a & ~r)]])
    disc = int(table[0, 1] + table[1, 0])
    exact = disc < MCNEMAR_EXACT_BELOW
    res = mcnemar(table, exact=exact, correction=True)
    return {"statistic": float(res.statistic), "p_value": float(res.pvalue), "n_discordant": disc,
            "exact": exact, "mean_diff": float(a.mean() - r.mean())}


def aso_eps(method: np.ndarray, reference: np.ndarray, opts: StatsOptions = StatsOptions()) -> tuple[float, str]:
    """ε_min of Almost Stochastic Order of ``method`` over ``reference`` (seed-level scores) by
    ``deepsig.aso`` (confidence ``opts.confidence``, :data:`ASO_ITERATIONS` bootstrap iterations,
    seed ``opts.seed``). Returns ``(eps_min, note)``; NaN and a note when deepsig is not installed or
    a side has no score."""
    if len(method) == 0 or len(reference) == 0:
        return math.nan, "ASO needs at least one ok seed per side"
    try:
        from deepsig import aso
    except ImportError:
        return math.nan, "ASO left out: deepsig is not installed (pip install 'peftbench[aso]')"
    eps = aso(np.asarray(method, dtype=float), np.asarray(reference, dtype=float),
              confidence_level=opts.confidence, num_bootstrap_iterations=ASO_ITERATIONS,
              show_progress=False, seed=opts.seed)
    return float(eps), ""


def _base_metric(task: str, metric: str) -> tuple[str, str]:
    """(base metric, split) of a family's main metric: ``accuracy_matched`` → (accuracy,
    validation_matched)."""
    spec = TASKS[task]
    if len(spec.eval_splits) == 1:
        return metric, spec.eval_splits[0]
    base, _, suffix = metric.rpartition("_")
    return base, next(s for s in spec.eval_splits if split_suffix(s) == suffix)


def _run_predictions(pred: dict, run: pd.Series, seed: int, split: str, value: str) -> pd.DataFrame | None:
    """The predictions of one run (its family row ``run``) on ``split`` at the epoch ``value``
    reports, indexed by idx; None when the run has none."""
    sub = pred.get((run["model"], run["task"], run["method"], str(run["run_budget"]), int(seed)))
    if sub is None:
        return None
    sub = sub[sub["split"] == split]
    if sub.empty:
        return None
    if value == "best_dev_main" and "best_epoch" in run and pd.notna(run["best_epoch"]):
        sub = sub[sub["epoch"] == int(run["best_epoch"])]
    else:
        sub = sub[sub["epoch"] == sub["epoch"].max()]
    return sub.set_index("idx")


def example_significance(runs: pd.DataFrame, predictions: pd.DataFrame, reference: str = DEFAULT_REFERENCE,
                         opts: StatsOptions = StatsOptions(), aso: bool = True) -> pd.DataFrame:
    """Every method vs ``reference`` within each ``(model, task, budget)`` family, at the example
    level (see the module docstring for the tests and :data:`EXAMPLE_COLUMNS` for the table).

    Args:
        runs: ``runs.parquet``. predictions: ``predictions.parquet`` (:data:`PREDICTIONS_REQUIRED`).
        reference: the baseline method. opts: bootstrap settings and the value column.
        aso: run the ASO test (seconds per comparison).

    Returns:
        The table, sorted like the seed-level one. A family without the reference, or a pair
        with no shared ok seed / example, gets one ``hier_bootstrap`` row with NaN and a note.

    Raises:
        ValueError: see :func:`peftbench.analysis.significance.validate_runs`; a predictions
            table without a required column.
    """
    missing = [c for c in PREDICTIONS_REQUIRED if c not in predictions.columns]
    if missing:
        raise ValueError(f"predictions table: missing column(s) {', '.join(missing)}; it is written by the "
                         f"`aggregate` rule (results/tables/predictions.parquet)")
    pred = predictions.assign(budget=predictions["budget"].astype(str), seed=predictions["seed"].astype(int))
    pred = {k: g for k, g in pred.groupby(["model", "task", "method", "budget", "seed"], sort=False)}
    fam = family_runs(runs, opts)
    # tasks whose main metric has an example-level form (not the corpus-level BLEU/ROUGE/METEOR of
    # the causal-LM text tasks, whose predictions hold generated text, not classes)
    fam = fam[fam["task"].map(lambda t: t in TASKS and _base_metric(t, TASKS[t].main_metric)[0] in EXAMPLE_METRICS)]
    rows = []
    common_cols = dict(value_column=opts.value, reference=reference, confidence=opts.confidence,
                       resamples=opts.resamples, bootstrap_seed=opts.seed)
    for (model, task, budget), g in fam.groupby(["model", "task", "budget"], sort=False):
        metric = _family_metric(g, task)
        base, split = _base_metric(task, metric)
        spec = TASKS[task]
        keys = dict(model=model, task=task, budget=budget, metric=metric, **common_cols)
        ok = g[g["status"] == "ok"]
        per = {m: gm.set_index("seed") for m, gm in ok.groupby("method", sort=False)}
        fam_rows = []
        for method in order_methods(g["method"].unique(), reference):
            if method == reference:
                continue
            row = dict(keys, method=method, test="hier_bootstrap", seed=-1, note="")
            if reference not in per or method not in per:
                row["note"] = f"{reference if reference not in per else method} has no ok runs in this family"
                fam_rows.append(row)
                continue
            seeds = sorted(set(per[method].index) & set(per[reference].index))
            runs_m = {s: _run_predictions(pred, per[method].loc[s], s, split, opts.value) for s in seeds}
            runs_r = {s: _run_predictions(pred, per[reference].loc[s], s, split, opts.value) for s in seeds}
            seeds = [s for s in seeds if runs_m[s] is not None and runs_r[s] is not None]
            idx = None
            for s in seeds:
                both = runs_m[s].index.intersection(runs_r[s].index)
                idx = both if idx is None else idx.intersection(both)
            if not seeds or idx is None or len(idx) == 0:
                row["note"] = "no seed with predictions of both methods on shared dev examples"
                fam_rows.append(row)
                continue
            idx = idx.sort_values()
            gold = runs_r[seeds[0]].loc[idx, "label"].to_numpy()
            pm = np.stack([runs_m[s].loc[idx, "prediction"].to_numpy() for s in seeds])
            pr = np.stack([runs_r[s].loc[idx, "prediction"].to_numpy() for s in seeds])
            shared = dict(n_seeds=len(seeds), seeds=",".join(map(str, seeds)), n_examples=len(idx))
            row.update(shared, **hierarchical_bootstrap(gold, pm, pr, base, spec.is_regression, opts))
            fam_rows.append(row)
            if base == "accuracy":
                for k, s in enumerate(seeds):
                    fam_rows.append(dict(keys, method=method, test="mcnemar", seed=int(s), n_seeds=1, seeds=str(s),
                                         n_examples=len(idx), note="", **mcnemar_test(gold, pm[k], pr[k])))
            if aso:
                eps, note = aso_eps(per[method][opts.value].to_numpy(float), per[reference][opts.value].to_numpy(float),
                                    opts)
                fam_rows.append(dict(keys, method=method, test="aso", seed=-1, n_seeds=len(per[method]),
                                     seeds=",".join(map(str, sorted(per[method].index))), eps_min=eps, note=note))
        for test in ("hier_bootstrap", "mcnemar"):
            sel = [r for r in fam_rows if r["test"] == test]
            p = [r.get("p_value", math.nan) for r in sel]
            adj = holm(p)
            n_tests = int(np.sum(~np.isnan(np.asarray(p, dtype=float)))) if sel else 0
            for r, a in zip(sel, adj):
                r.update(p_holm=float(a), n_tests_family=n_tests)
        rows.extend(fam_rows)
    out = pd.DataFrame(rows, columns=EXAMPLE_COLUMNS)
    for c in ("seed", "n_seeds", "n_examples", "n_tests_family", "n_discordant"):
        out[c] = pd.to_numeric(out[c], errors="coerce").astype("Int64")
    return _sort(out, reference) if len(out) else out


def read_predictions(path) -> pd.DataFrame:
    """Read ``predictions.parquet`` (errors name the file and the rule that writes it)."""
    return read_table(path, PREDICTIONS_REQUIRED,
                      hint="it is written by the `aggregate` rule: run `snakemake results/tables/predictions.parquet`")
