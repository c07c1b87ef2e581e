"""Tests of peftbench.analysis.significance: every number is checked against scipy on hand-made runs."""
from __future__ import annotations

import argparse
import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from peftbench.analysis import cli
from peftbench.analysis.significance import (
    GLUE_AVG,
    SIGNIFICANCE_COLUMNS,
    STATS_COLUMNS,
    StatsOptions,
    bootstrap_ci,
    budget_label,
    budget_match,
    compare_methods,
    family_label,
    family_runs,
    glue_average_runs,
    holm,
    method_stats,
    order_budgets,
    paired_comparison,
    parse_family,
    read_table,
    validate_runs,
)

OPTS = StatsOptions(resamples=2000, confidence=0.95, seed=7)
METRIC = {"cola": "matthews_correlation", "rte": "accuracy", "stsb": "pearson"}


def rows(method, values, task="rte", budget=0.2, model="m"):
    """Runs of one method: ``values`` maps seed -> value, or None for a failed run."""
    out = []
    for seed, v in values.items():
        out.append(dict(model=model, task=task, method=method, budget=100.0 if method == "full" else budget,
                        seed=seed, status="failed" if v is None else "ok", error="boom" if v is None else None,
                        metric=METRIC.get(task, "accuracy"), dev_main=np.nan if v is None else v,
                        best_dev_main=np.nan if v is None else v + 0.01))
    return out


def table(*parts):
    return pd.DataFrame([r for p in parts for r in p])


def scipy_ci(x, opts=OPTS):
    res = stats.bootstrap((np.asarray(x, float),), np.mean, n_resamples=opts.resamples,
                          confidence_level=opts.confidence, method=opts.ci_method,
                          rng=np.random.default_rng(opts.seed))
    return res.confidence_interval.low, res.confidence_interval.high


def one(df, **kw):
    sel = df
    for k, v in kw.items():
        sel = sel[sel[k] == v]
    assert len(sel) == 1, f"expected one row for {kw}, got {len(sel)}"
    return sel.iloc[0]


# ------------------------------------------------------------------------------------------
# Holm
# ------------------------------------------------------------------------------------------

def test_holm_matches_hand_computation():
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> running max 0.06
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    # capped at 1, running max keeps monotonicity
    np.testing.assert_allclose(holm([0.5, 0.6]), [1.0, 1.0])
    np.testing.assert_allclose(holm([0.2, 0.01]), [0.2, 0.02])


def test_holm_ignores_nan_and_handles_empty():
    out = holm([0.01, np.nan, 0.04])
    assert np.isnan(out[1])
    np.testing.assert_allclose(out[[0, 2]], [0.02, 0.04])  # m = 2, not 3
    assert holm([]).shape == (0,)
    assert np.isnan(holm([np.nan, np.nan])).all()


# ------------------------------------------------------------------------------------------
# Paired comparison primitives
# ------------------------------------------------------------------------------------------

def test_paired_comparison_n7_matches_scipy():
    a = np.array([0.71, 0.74, 0.69, 0.75, 0.72, 0.78, 0.70])
    b = np.array([0.70, 0.71, 0.70, 0.72, 0.68, 0.73, 0.69])
    res = paired_comparison(a, b, OPTS)
    d = a - b
    t = stats.ttest_rel(a, b)
    w = stats.wilcoxon(d)
    assert res["n"] == 7
    assert res["mean_method"] == pytest.approx(a.mean())
    assert res["sd_method"] == pytest.approx(a.std(ddof=1))
    assert res["mean_baseline"] == pytest.approx(b.mean())
    assert res["sd_baseline"] == pytest.approx(b.std(ddof=1))
    assert res["mean_diff"] == pytest.approx(d.mean())
    assert res["t_stat"] == pytest.approx(t.statistic)
    assert res["p_ttest"] == pytest.approx(t.pvalue)
    assert res["w_stat"] == pytest.approx(w.statistic)
    assert res["p_wilcoxon"] == pytest.approx(w.pvalue)
    assert res["cohens_d"] == pytest.approx(d.mean() / d.std(ddof=1))
    lo, hi = scipy_ci(d)
    assert (res["ci_low"], res["ci_high"]) == pytest.approx((lo, hi))
    assert lo < d.mean() < hi


def test_bootstrap_ci_default_uses_10000_resamples_and_is_reproducible():
    x = [0.1, 0.4, 0.2, 0.5]
    opts = StatsOptions()
    assert opts.resamples >= 10_000
    assert bootstrap_ci(x, opts) == pytest.approx(scipy_ci(x, opts))
    assert bootstrap_ci(x, opts) == bootstrap_ci(x, opts)


def test_bootstrap_ci_degenerate_cases():
    assert all(math.isnan(v) for v in bootstrap_ci([0.3], OPTS))
    assert bootstrap_ci([0.3, 0.3, 0.3], OPTS) == (0.3, 0.3)


def test_ties_and_zero_difference_wilcoxon_matches_scipy():
    # differences 0.02, 0.02, -0.02, 0.0, 0.05, 0.03: tied absolute values and one zero
    b = np.array([0.60, 0.61, 0.62, 0.63, 0.64, 0.65])
    d = np.array([0.02, 0.02, -0.02, 0.0, 0.05, 0.03])
    a = b + d
    res = paired_comparison(a, b, OPTS)
    w = stats.wilcoxon(a - b)
    assert res["w_stat"] == pytest.approx(w.statistic)
    assert res["p_wilcoxon"] == pytest.approx(w.pvalue)
    t = stats.ttest_rel(a, b)
    assert res["p_ttest"] == pytest.approx(t.pvalue)


def test_n2_has_ttest_but_no_wilcoxon():
    a, b = np.array([0.80, 0.84]), np.array([0.78, 0.79])
    res = paired_comparison(a, b, OPTS)
    t = stats.ttest_rel(a, b)
    assert res["n"] == 2
    assert res["p_ttest"] == pytest.approx(t.pvalue)
    assert res["t_stat"] == pytest.approx(t.statistic)
    assert math.isnan(res["p_wilcoxon"]) and math.isnan(res["w_stat"])
    assert (res["ci_low"], res["ci_high"]) == pytest.approx(scipy_ci(a - b))
    assert "no Wilcoxon" in res["note"]


def test_all_zero_differences_documented_values():
    a = np.array([0.5, 0.6, 0.7, 0.5, 0.6, 0.7])
    res = paired_comparison(a, a.copy(), OPTS)
    assert res["mean_diff"] == 0.0 and res["sd_diff"] == 0.0
    assert math.isnan(res["p_ttest"]) and math.isnan(res["t_stat"])
    assert res["p_wilcoxon"] == 1.0 and res["w_stat"] == 0.0
    assert math.isnan(res["cohens_d"])
    assert (res["ci_low"], res["ci_high"]) == (0.0, 0.0)
    assert "all differences zero" in res["note"]


def test_constant_nonzero_differences_give_infinite_d():
    b = np.array([0.5, 0.6, 0.7])
    res = paired_comparison(b - 0.25, b, OPTS)  # exactly representable shift
    assert res["cohens_d"] == -math.inf
    assert math.isnan(res["p_ttest"])
    assert res["ci_low"] == pytest.approx(-0.25) and res["ci_high"] == pytest.approx(-0.25)
    assert "zero variance" in res["note"]


def test_paired_comparison_length_mismatch():
    with pytest.raises(ValueError, match="differ in length"):
        paired_comparison([1, 2], [1], OPTS)


# ------------------------------------------------------------------------------------------
# compare_methods on run tables
# ------------------------------------------------------------------------------------------

LORA = {0: 0.70, 1: 0.71, 2: 0.69, 3: 0.72, 4: 0.70, 5: 0.73}
ADA = {0: 0.73, 1: 0.72, 2: 0.74, 3: 0.76, 4: 0.71, 5: 0.79}
GSA = {0: 0.69, 1: 0.74, 2: None, 3: 0.70, 4: 0.72}          # seed 2 failed, seed 5 missing
FULL = {0: 0.75, 1: 0.74, 2: 0.77, 3: 0.78, 4: 0.73, 5: 0.76}


@pytest.fixture
def runs():
    return table(rows("lora", LORA), rows("adalora", ADA), rows("gsa", GSA), rows("full", FULL),
                 rows("lora", LORA, budget=0.8), rows("adalora", {s: v - 0.01 for s, v in ADA.items()}, budget=0.8))


def test_compare_methods_columns_and_values(runs):
    sig = compare_methods(runs, opts=OPTS)
    assert list(sig.columns) == SIGNIFICANCE_COLUMNS
    r = one(sig, task="rte", budget="0.2", method="adalora")
    a = np.array([ADA[s] for s in range(6)])
    b = np.array([LORA[s] for s in range(6)])
    t = stats.ttest_rel(a, b)
    w = stats.wilcoxon(a - b)
    assert r["baseline"] == "lora" and r["reference"] == "lora" and r["comparison"] == "vs_reference"
    assert r["n"] == 6 and r["seeds"] == "0,1,2,3,4,5"
    assert r["metric"] == "accuracy" and r["value_column"] == "dev_main"
    assert r["p_ttest"] == pytest.approx(t.pvalue)
    assert r["p_wilcoxon"] == pytest.approx(w.pvalue)
    assert r["mean_diff"] == pytest.approx((a - b).mean())
    assert r["cohens_d"] == pytest.approx((a - b).mean() / (a - b).std(ddof=1))
    assert (r["ci_low"], r["ci_high"]) == pytest.approx(scipy_ci(a - b))
    assert r["n_failed_method"] == 0 and r["n_missing_method"] == 0


def test_failed_and_missing_seed_are_reported_not_dropped(runs):
    sig = compare_methods(runs, opts=OPTS)
    r = one(sig, task="rte", budget="0.2", method="gsa")
    seeds = [0, 1, 3, 4]
    a = np.array([GSA[s] for s in seeds])
    b = np.array([LORA[s] for s in seeds])
    assert r["n"] == 4 and r["seeds"] == "0,1,3,4"
    assert r["n_ok_method"] == 4
    assert r["n_failed_method"] == 1 and r["failed_seeds_method"] == "2"
    assert r["n_missing_method"] == 1 and r["missing_seeds_method"] == "5"
    assert r["n_failed_baseline"] == 0 and r["n_ok_baseline"] == 6
    assert r["mean_method"] == pytest.approx(a.mean())
    assert r["mean_baseline"] == pytest.approx(b.mean())  # baseline over the paired seeds only
    assert r["p_ttest"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert math.isnan(r["p_wilcoxon"])  # n = 4 < 6
    assert (r["ci_low"], r["ci_high"]) == pytest.approx(scipy_ci(a - b))


def test_status_ok_with_nan_value_counts_as_failed():
    df = table(rows("lora", LORA), rows("adalora", ADA))
    df.loc[(df["method"] == "adalora") & (df["seed"] == 0), "dev_main"] = np.nan
    r = one(compare_methods(df, opts=OPTS), task="rte", method="adalora")
    assert r["n"] == 5 and r["n_failed_method"] == 1 and r["failed_seeds_method"] == "0"


def test_holm_within_family(runs):
    sig = compare_methods(runs, opts=OPTS)
    fam = sig[(sig["task"] == "rte") & (sig["budget"] == "0.2")]
    assert set(fam["method"]) == {"full", "adalora", "gsa"}
    np.testing.assert_allclose(fam["p_ttest_holm"], holm(fam["p_ttest"].to_numpy()))
    np.testing.assert_allclose(fam["p_wilcoxon_holm"], holm(fam["p_wilcoxon"].to_numpy()), equal_nan=True)
    assert (fam["n_tests_family"] == 3).all()
    # another family (budget 0.8: full and adalora) is adjusted separately
    fam8 = sig[(sig["task"] == "rte") & (sig["budget"] == "0.8")]
    assert set(fam8["method"]) == {"full", "adalora"}
    np.testing.assert_allclose(fam8["p_ttest_holm"], holm(fam8["p_ttest"].to_numpy()))


def test_full_belongs_to_every_budget_family(runs):
    sig = compare_methods(runs, opts=OPTS)
    f2 = one(sig, task="rte", budget="0.2", method="full")
    f8 = one(sig, task="rte", budget="0.8", method="full")
    a = np.array([FULL[s] for s in range(6)])
    assert f2["mean_method"] == pytest.approx(a.mean()) == f8["mean_method"]
    assert f8["p_ttest"] == pytest.approx(stats.ttest_rel(a, np.array([LORA[s] for s in range(6)])).pvalue)
    assert "100" not in set(sig["budget"])  # budget tokens (strings), full copied into each family


def test_n1_gives_a_row_without_tests():
    df = table(rows("lora", {0: 0.7}), rows("adalora", {0: 0.75}))
    r = one(compare_methods(df, opts=OPTS), task="rte", method="adalora")
    assert r["n"] == 1 and r["mean_diff"] == pytest.approx(0.05)
    for c in ("p_ttest", "p_wilcoxon", "p_ttest_holm", "ci_low", "ci_high", "cohens_d", "sd_diff"):
        assert math.isnan(r[c]), c
    assert r["n_tests_family"] == 0


def test_missing_reference_gives_rows_with_n0():
    df = table(rows("adalora", ADA), rows("gsa", GSA))
    sig = compare_methods(df, reference="lora", opts=OPTS)
    r = one(sig, task="rte", method="adalora")
    assert r["n"] == 0 and math.isnan(r["p_ttest"])
    assert "lora has no runs" in r["note"]
    assert r["n_missing_baseline"] == 6


def test_all_pairs(runs):
    sig = compare_methods(runs, all_pairs=True, opts=OPTS)
    fam = sig[(sig["task"] == "rte") & (sig["budget"] == "0.2")]
    assert len(fam) == math.comb(4, 2)
    pairs = {frozenset(p) for p in zip(fam["method"], fam["baseline"])}
    assert pairs == {frozenset(p) for p in itertools.combinations(["lora", "adalora", "gsa", "full"], 2)}
    # the reference is the baseline whenever it takes part
    assert (fam.loc[(fam["method"] == "lora") | (fam["baseline"] == "lora"), "baseline"] == "lora").all()
    assert set(fam["comparison"]) == {"vs_reference", "pair"}
    np.testing.assert_allclose(fam["p_ttest_holm"], holm(fam["p_ttest"].to_numpy()))
    r = one(fam, method="gsa", baseline="adalora")
    seeds = [0, 1, 3, 4]
    a, b = np.array([GSA[s] for s in seeds]), np.array([ADA[s] for s in seeds])
    assert r["p_ttest"] == pytest.approx(stats.ttest_rel(a, b).pvalue)


# ------------------------------------------------------------------------------------------
# GLUE average and method statistics
# ------------------------------------------------------------------------------------------

@pytest.fixture
def two_tasks():
    cola_l = {0: 0.50, 1: 0.55, 2: 0.52}
    cola_a = {0: 0.56, 1: 0.57, 2: 0.60}
    rte_l = {0: 0.70, 1: 0.69, 2: 0.72}
    rte_a = {0: 0.71, 1: None, 2: 0.75}  # seed 1 failed on rte -> no GLUE average for it
    df = table(rows("lora", cola_l, task="cola"), rows("adalora", cola_a, task="cola"),
               rows("lora", rte_l), rows("adalora", rte_a))
    return df, cola_l, cola_a, rte_l, rte_a


def test_glue_average_per_seed(two_tasks):
    df, cola_l, cola_a, rte_l, rte_a = two_tasks
    g = glue_average_runs(validate_runs(df))
    r = one(g, method="lora", seed=1)
    assert r["task"] == GLUE_AVG and r["status"] == "ok"
    assert r["dev_main"] == pytest.approx((cola_l[1] + rte_l[1]) / 2)
    assert r["n_tasks"] == 2 and r["tasks"] == "cola,rte"
    bad = one(g, method="adalora", seed=1)
    assert bad["status"] == "failed" and math.isnan(bad["dev_main"]) and "rte" in bad["error"]


def test_glue_avg_rows_in_significance_and_stats(two_tasks):
    df, cola_l, cola_a, rte_l, rte_a = two_tasks
    sig = compare_methods(df, opts=OPTS)
    r = one(sig, task=GLUE_AVG, method="adalora")
    seeds = [0, 2]
    a = np.array([(cola_a[s] + rte_a[s]) / 2 for s in seeds])
    b = np.array([(cola_l[s] + rte_l[s]) / 2 for s in seeds])
    assert r["n"] == 2 and r["n_failed_method"] == 1 and r["failed_seeds_method"] == "1"
    assert r["p_ttest"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx(scipy_ci(a - b))

    st = method_stats(df, OPTS)
    assert list(st.columns) == STATS_COLUMNS
    lg = one(st, task=GLUE_AVG, method="lora")
    x = np.array([(cola_l[s] + rte_l[s]) / 2 for s in range(3)])
    assert lg["n_ok"] == 3 and lg["mean"] == pytest.approx(x.mean())
    assert lg["std"] == pytest.approx(x.std(ddof=1))
    assert (lg["ci_low"], lg["ci_high"]) == pytest.approx(scipy_ci(x))
    assert lg["best_mean"] == pytest.approx(x.mean() + 0.01)
    ag = one(st, task=GLUE_AVG, method="adalora")
    assert ag["n_ok"] == 2 and ag["n_failed"] == 1 and ag["failed_seeds"] == "1"
    ar = one(st, task="rte", method="adalora")
    assert ar["n_ok"] == 2 and ar["n_failed"] == 1
    assert ar["mean"] == pytest.approx((rte_a[0] + rte_a[2]) / 2)


def test_glue_exclude(two_tasks):
    df, cola_l, *_ = two_tasks
    st = method_stats(df, StatsOptions(resamples=2000, glue_exclude=("rte",)))
    r = one(st, task=GLUE_AVG, method="lora")
    assert r["n_tasks"] == 1 and r["mean"] == pytest.approx(np.mean(list(cola_l.values())))


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------

def test_missing_column_error_names_column():
    df = table(rows("lora", LORA)).drop(columns=["dev_main"])
    with pytest.raises(ValueError, match=r"runs table: missing column\(s\) dev_main.*aggregate"):
        compare_methods(df, opts=OPTS)


def test_empty_and_duplicate_tables_raise():
    df = table(rows("lora", LORA))
    with pytest.raises(ValueError, match="no runs"):
        compare_methods(df.iloc[:0], opts=OPTS)
    with pytest.raises(ValueError, match="share a"):
        compare_methods(pd.concat([df, df.iloc[:1]]), opts=OPTS)
    bad = df.assign(status="maybe")
    with pytest.raises(ValueError, match="status"):
        validate_runs(bad)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="confidence"):
        StatsOptions(confidence=95)
    with pytest.raises(ValueError, match="ci_method"):
        StatsOptions(ci_method="normal")


def test_read_table_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="runs.parquet"):
        read_table(tmp_path / "runs.parquet", hint="run aggregate")
    p = tmp_path / "t.parquet"
    pd.DataFrame({"a": [1]}).to_parquet(p)
    with pytest.raises(ValueError, match=r"t\.parquet: missing column\(s\) b"):
        read_table(p, ["a", "b"])
    pd.DataFrame({"a": pd.Series([], dtype=int)}).to_parquet(p)
    with pytest.raises(ValueError, match="no rows"):
        read_table(p, ["a"], allow_empty=False)


# ------------------------------------------------------------------------------------------
# CLI (through a small argparse harness, as the package CLI will call register())
# ------------------------------------------------------------------------------------------

def parse(argv):
    parser = argparse.ArgumentParser(prog="peftbench")
    cli.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_significance_writes_tables(tmp_path, runs):
    rp = tmp_path / "runs.parquet"
    runs.to_parquet(rp)
    out = tmp_path / "tables" / "significance.parquet"
    args = parse(["significance", "--runs", str(rp), "--out", str(out), "--reference", "lora",
                  "--all-pairs", "--resamples", "2000", "--confidence", "0.95", "--seed", "7"])
    assert args.func(args) == 0
    sig = pd.read_parquet(out)
    pd.testing.assert_frame_equal(sig, compare_methods(runs, "lora", True, OPTS), check_dtype=False)
    st = pd.read_parquet(out.with_name("method_stats.parquet"))
    assert (st["task"] == GLUE_AVG).any()
    assert set(st["resamples"]) == {2000}


def test_cli_significance_missing_column_names_file(tmp_path, runs):
    rp = tmp_path / "runs.parquet"
    runs.drop(columns=["seed"]).to_parquet(rp)
    args = parse(["significance", "--runs", str(rp), "--out", str(tmp_path / "s.parquet")])
    with pytest.raises(ValueError, match=r"runs\.parquet: missing column\(s\) seed"):
        args.func(args)


# ------------------------------------------------------------------------------------------
# Budget tokens and runs outside their budget family
# ------------------------------------------------------------------------------------------

R8 = 1_327_104  # the parameter count of LoRA rank 8 on DeBERTa-v3-base's 72 target matrices


def sized(method, values, used, budget="r8", task="rte", capacity_limited=None, allocated=None, **extra):
    """Runs with parameter columns: ``used`` adapter parameters counted against the budget."""
    out = rows(method, values, task=task, budget=budget)
    for r in out:
        full = method == "full"
        r.update(budget_params=184_000_000.0 if full else float(R8), budget_used_params=used,
                 adapter_params=allocated if allocated is not None else used, backbone_params=184_000_000,
                 capacity_limited=capacity_limited, **extra)
    return out


@pytest.fixture
def mixed():
    """r8: lora and adalora match (adalora allocates 1.5x but counts its final 8-rank allocation);
    gsa trains 2,000 gates (capacity-limited), glora 1.2x the budget: both outside the r8 family."""
    parts = []
    for task in ("rte", "cola"):
        parts += [sized("lora", LORA, R8, task=task), sized("adalora", ADA, int(1.005 * R8), task=task, allocated=int(1.5 * R8)),
                  sized("gsa", {s: v for s, v in GSA.items() if v is not None}, 2000, task=task, capacity_limited=True),
                  sized("glora", LORA, int(1.2 * R8), task=task, capacity_limited=False),
                  sized("full", FULL, 184_000_000, task=task)]
    df = table(*parts)
    # a missing gsa run has no sizes: it follows gsa's other runs out of the family
    miss = dict(model="m", task="rte", method="gsa", budget="r8", seed=5, status="missing", error="no metrics")
    return pd.concat([df, pd.DataFrame([miss])], ignore_index=True)


def test_budget_column_is_a_token_and_sorts_as_budgets():
    df = table(rows("lora", {0: 0.7}, budget=10), rows("lora", {0: 0.7}, budget=2), rows("lora", {0: 0.7}, budget="r8"),
               rows("lora", {0: 0.7}, budget="r2"), rows("full", {0: 0.8}))
    v = validate_runs(df)
    assert sorted(v["budget"]) == ["10", "100", "2", "r2", "r8"]  # strings: "100" is full fine-tuning
    st = method_stats(df, OPTS)
    assert list(dict.fromkeys(st.loc[st["task"] == "rte", "budget"])) == ["2", "10", "r2", "r8"]
    assert order_budgets(["r8", "10", "r8~2000", 2, "100", "r2"]) == ["2", "10", "r2", "r8", "r8~2000", "100"]
    with pytest.raises(ValueError, match=r"column budget: budget 'eight'"):
        validate_runs(table(rows("lora", {0: 0.7}, budget="eight")))


def test_runs_outside_their_budget_family_get_their_own(mixed):
    fam = family_runs(mixed, OPTS)
    first = fam.groupby(["method", "budget"]).first()
    assert set(fam.loc[fam["method"] == "gsa", "budget"]) == {"r8~2000"}  # every gsa run, the missing one too
    assert set(fam.loc[fam["method"] == "glora", "budget"]) == {"r8~1600000"}
    assert set(fam.loc[fam["method"].isin(["lora", "adalora"]), "budget"]) == {"r8"}
    assert not first.loc[("gsa", "r8~2000"), "budget_match"] and first.loc[("adalora", "r8"), "budget_match"]
    assert first.loc[("gsa", "r8~2000"), "nominal_budget"] == "r8"
    assert set(fam.loc[fam["method"] == "full", "budget"]) == {"r8"}  # full is not copied into off-families
    assert budget_label("r8~2000") == "outside r8: 2k adapter params"
    assert family_label("r8", 1_592_524) == "r8~1600000" and parse_family("r8~2000")[1] == 2000.0


def test_runs_outside_their_budget_family_are_not_compared_inside_it(mixed):
    sig = compare_methods(mixed, opts=OPTS)
    r8 = sig[sig["budget"] == "r8"]
    assert set(r8["method"]) == {"full", "adalora"} and r8["budget_match"].all()
    g = one(sig, task="rte", budget="r8~2000", method="gsa")
    assert not g["budget_match"] and g["nominal_budget"] == "r8"
    assert g["n"] == 0 and "own family" in g["note"] and "lora has no runs in this family" in g["note"]
    assert g["n_missing_method"] == 1 and g["missing_seeds_method"] == "5"  # counted where gsa is
    # Holm counts only the r8 family's own tests
    assert (r8.loc[r8["task"] == "rte", "n_tests_family"] == 2).all()
    st = method_stats(mixed, OPTS)
    gl = one(st, task=GLUE_AVG, budget="r8~2000", method="gsa")
    assert not gl["budget_match"] and gl["n_ok"] == 4
    assert list(dict.fromkeys(st["budget"])) == ["r8", "r8~2000", "r8~1600000"]  # off-families by real size


def test_a_table_without_sizes_matches_every_run_that_is_not_capacity_limited():
    df = table(rows("lora", LORA), rows("gsa", {0: 0.7, 1: 0.71}))
    assert budget_match(validate_runs(df)).all()
    df["capacity_limited"] = [False] * len(LORA) + [True, True]
    assert list(budget_match(validate_runs(df))) == [True] * len(LORA) + [False, False]
