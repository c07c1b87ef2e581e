"""Example-level statistics (issue 14, step 3): every p-value checked against a direct
scipy/statsmodels/deepsig computation on a fixed hand-made predictions table."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from peftbench.analysis.examples import (ASO_ITERATIONS, EXAMPLE_COLUMNS, MCNEMAR_EXACT_BELOW, example_significance,
                                         hierarchical_bootstrap, mcnemar_test, metric_rows)
from peftbench.analysis.significance import StatsOptions
from peftbench.metrics import compute_metrics
from peftbench.vocab import get_task

OPTS = StatsOptions(resamples=300, confidence=0.95, seed=3)
SEEDS = (1, 2, 3)


def _predictions(task_name, method, seed, n=40, skill=0.7):
    """A fixed predictions table of one run: classes right with probability ``skill``."""
    task = get_task(task_name)
    rng = np.random.default_rng([ord(c) for c in task_name + method] + [seed])
    idx = np.arange(100, 100 + n)
    if task.is_regression:
        gold = np.random.default_rng(0).uniform(0, 5, n).astype(np.float32)
        pred = (gold + rng.normal(0, 2 * (1 - skill), n)).astype(np.float32)
        cols = {"score": pred}
    else:
        gold = np.random.default_rng(0).integers(0, 2, n).astype(np.int8)
        right = rng.random(n) < skill
        pred = np.where(right, gold, 1 - gold).astype(np.int8)
        cols = {"logit_0": (pred == 0).astype(np.float32), "logit_1": (pred == 1).astype(np.float32)}
    return pd.DataFrame({"model": "m", "task": task_name, "method": method, "budget": "r8", "seed": seed,
                         "epoch": np.int16(2), "split": "validation", "idx": idx, "label": gold,
                         "prediction": pred, **cols})


def _tables(task_name, skills):
    task = get_task(task_name)
    preds, runs = [], []
    for method, skill in skills.items():
        for s in SEEDS:
            p = _predictions(task_name, method, s, skill=skill)
            preds.append(p)
            # an earlier epoch that must be ignored (dev_main is the final epoch)
            preds.append(p.assign(epoch=np.int16(1), prediction=p["label"]))
            logits = p[["score"]].to_numpy() if task.is_regression else p[["logit_0", "logit_1"]].to_numpy()
            m = compute_metrics(task, logits, p["label"].to_numpy(), "validation")
            runs.append(dict(model="m", task=task_name, method=method, budget="r8", seed=s, status="ok", error=None,
                             metric=task.main_metric, dev_main=m[task.main_metric], best_epoch=2))
    return pd.DataFrame(runs), pd.concat(preds, ignore_index=True)


@pytest.mark.parametrize("metric,regression", [("accuracy", False), ("f1", False),
                                               ("matthews_correlation", False), ("pearson", True),
                                               ("spearman", True)])
def test_metric_rows_match_compute_metrics(metric, regression):
    rng = np.random.default_rng(1)
    task = get_task({"accuracy": "mrpc", "f1": "mrpc", "matthews_correlation": "cola"}.get(metric, "stsb"))
    for _ in range(5):
        if regression:
            gold = rng.uniform(0, 5, (3, 30))
            out = gold + rng.normal(0, 1, (3, 30))
            out[2] = 1.0  # constant: correlation 0
        else:
            gold = rng.integers(0, 2, (3, 30))
            out = rng.integers(0, 2, (3, 30))
            out[2] = 0  # no positive prediction: F1 0, MCC 0
        got = metric_rows(metric, gold, out, regression)
        for k in range(3):
            logits = out[k][:, None] if regression else np.eye(2)[out[k]]
            want = compute_metrics(task, logits, gold[k], "validation")[metric]
            assert got[k] == pytest.approx(want, abs=1e-12)


def test_hierarchical_bootstrap_equals_direct_loop():
    """The documented draw order, replayed with sklearn's MCC via compute_metrics."""
    task = get_task("cola")
    runs, preds = _tables("cola", {"lora": 0.7, "dora": 0.8})
    sub = preds[preds["epoch"] == 2]
    gold = sub[(sub.method == "lora") & (sub.seed == 1)]["label"].to_numpy()
    pm = np.stack([sub[(sub.method == "dora") & (sub.seed == s)]["prediction"].to_numpy() for s in SEEDS])
    pr = np.stack([sub[(sub.method == "lora") & (sub.seed == s)]["prediction"].to_numpy() for s in SEEDS])
    res = hierarchical_bootstrap(gold, pm, pr, "matthews_correlation", False, OPTS)

    def mcc(g, p):
        return compute_metrics(task, np.eye(2)[p], g, "validation")["matthews_correlation"]

    rng = np.random.default_rng(OPTS.seed)
    boot = []
    for _ in range(OPTS.resamples):
        s = rng.integers(0, 3, 3)
        e = rng.integers(0, len(gold), (3, len(gold)))
        boot.append(np.mean([mcc(gold[e[k]], pm[s[k], e[k]]) - mcc(gold[e[k]], pr[s[k], e[k]]) for k in range(3)]))
    boot = np.array(boot)
    observed = np.mean([mcc(gold, pm[k]) - mcc(gold, pr[k]) for k in range(3)])
    assert res["mean_diff"] == pytest.approx(observed, abs=1e-12)
    assert res["ci_low"] == pytest.approx(np.quantile(boot, 0.025), abs=1e-9)
    assert res["ci_high"] == pytest.approx(np.quantile(boot, 0.975), abs=1e-9)
    p = min(1.0, 2 * min(1 + (boot <= 0).sum(), 1 + (boot >= 0).sum()) / (OPTS.resamples + 1))
    assert res["p_value"] == pytest.approx(p, abs=1e-12)


def test_hierarchical_bootstrap_edge_cases():
    gold = np.array([0, 1, 0, 1, 1])
    same = np.array([[0, 1, 1, 1, 0], [1, 1, 0, 1, 1]])
    res = hierarchical_bootstrap(gold, same, same, "accuracy", False, OPTS)
    assert res["mean_diff"] == 0 and res["ci_low"] == res["ci_high"] == 0 and res["p_value"] == 1.0
    right, wrong = np.tile(gold, (2, 1)), np.tile(1 - gold, (2, 1))
    res = hierarchical_bootstrap(gold, right, wrong, "accuracy", False, OPTS)
    assert res["mean_diff"] == 1.0 and res["p_value"] == pytest.approx(2 / (OPTS.resamples + 1))
    with pytest.raises(ValueError, match="need equal"):
        hierarchical_bootstrap(gold, right, wrong[:, :3], "accuracy", False, OPTS)


def test_mcnemar_against_scipy():
    gold = np.zeros(200, dtype=int)
    # b = 3 only-method-right, c = 9 only-reference-right: exact binomial
    method = np.r_[np.zeros(150), np.zeros(3), np.ones(9), np.ones(38)].astype(int)
    ref = np.r_[np.zeros(150), np.ones(3), np.zeros(9), np.ones(38)].astype(int)
    res = mcnemar_test(gold, method, ref)
    assert res["exact"] and res["n_discordant"] == 12
    assert res["p_value"] == pytest.approx(stats.binomtest(3, 12, 0.5).pvalue)
    # b = 30, c = 10: chi-square with continuity correction
    method = np.r_[np.zeros(100), np.zeros(30), np.ones(10), np.ones(60)].astype(int)
    ref = np.r_[np.zeros(100), np.ones(30), np.zeros(10), np.ones(60)].astype(int)
    res = mcnemar_test(gold, method, ref)
    assert not res["exact"] and 40 >= MCNEMAR_EXACT_BELOW
    chi2 = (abs(30 - 10) - 1) ** 2 / 40
    assert res["statistic"] == pytest.approx(chi2) and res["p_value"] == pytest.approx(stats.chi2.sf(chi2, 1))
    assert res["mean_diff"] == pytest.approx((130 - 110) / 200)


def test_example_significance_table():
    deepsig = pytest.importorskip("deepsig")
    runs, preds = _tables("rte", {"lora": 0.6, "dora": 0.75, "adalora": 0.62})
    out = example_significance(runs, preds, reference="lora", opts=OPTS)
    assert list(out.columns) == EXAMPLE_COLUMNS
    assert set(out["method"]) == {"dora", "adalora"} and set(out["reference"]) == {"lora"}
    # per method: one bootstrap row, one McNemar row per seed, one ASO row
    assert out.groupby("method")["test"].apply(list).to_dict() == {
        m: ["hier_bootstrap", "mcnemar", "mcnemar", "mcnemar", "aso"] for m in ("dora", "adalora")}
    final = preds[preds["epoch"] == 2]

    def arr(m):
        return np.stack([final[(final.method == m) & (final.seed == s)]["prediction"].to_numpy() for s in SEEDS])

    gold = final[(final.method == "lora") & (final.seed == 1)]["label"].to_numpy()
    boot = out[out.test == "hier_bootstrap"].set_index("method")
    for m in ("dora", "adalora"):
        direct = hierarchical_bootstrap(gold, arr(m), arr("lora"), "accuracy", False, OPTS)
        assert boot.loc[m, "p_value"] == pytest.approx(direct["p_value"])
        # the observed difference is the seed-level mean difference of dev_main
        dm = runs.set_index(["method", "seed"])["dev_main"]
        assert boot.loc[m, "mean_diff"] == pytest.approx(np.mean([dm[(m, s)] - dm[("lora", s)] for s in SEEDS]))
        assert boot.loc[m, "n_examples"] == 40 and boot.loc[m, "n_seeds"] == 3
    assert list(boot.loc[["dora", "adalora"], "p_holm"]) == pytest.approx(
        list(multipletests(boot.loc[["dora", "adalora"], "p_value"], method="holm")[1]))
    mc = out[out.test == "mcnemar"]
    for _, r in mc.iterrows():
        direct = mcnemar_test(gold, arr(r["method"])[SEEDS.index(r["seed"])], arr("lora")[SEEDS.index(r["seed"])])
        assert r["p_value"] == pytest.approx(direct["p_value"])
    assert list(mc["p_holm"]) == pytest.approx(list(multipletests(mc["p_value"], method="holm")[1]))
    assert set(mc["n_tests_family"]) == {6}
    aso = out[out.test == "aso"].set_index("method")
    dm = runs.set_index(["method", "seed"])["dev_main"]
    want = deepsig.aso(dm["dora"].to_numpy(), dm["lora"].to_numpy(), confidence_level=OPTS.confidence,
                       num_bootstrap_iterations=ASO_ITERATIONS, show_progress=False, seed=OPTS.seed)
    assert aso.loc["dora", "eps_min"] == pytest.approx(want)
    assert aso["p_value"].isna().all()


def test_example_significance_non_decomposable_and_missing_reference():
    runs, preds = _tables("stsb", {"lora": 0.6, "dora": 0.8})
    out = example_significance(runs, preds, reference="lora", opts=OPTS, aso=False)
    assert list(out["test"]) == ["hier_bootstrap"]  # no McNemar for a regression task
    r = out.iloc[0]
    assert r["metric"] == "pearson" and np.isfinite(r["p_value"]) and r["ci_low"] <= r["mean_diff"] <= r["ci_high"]
    out = example_significance(runs, preds, reference="adalora", opts=OPTS, aso=False)
    assert out["note"].str.contains("adalora has no ok runs").all() and out["p_value"].isna().all()
    with pytest.raises(ValueError, match="missing column.*idx"):
        example_significance(runs, preds.drop(columns=["idx"]), reference="lora", opts=OPTS)


def test_significance_cli_writes_example_table(tmp_path):
    from peftbench.cli import main

    runs, preds = _tables("cola", {"lora": 0.6, "dora": 0.8})
    runs.to_parquet(tmp_path / "runs.parquet")
    preds.to_parquet(tmp_path / "predictions.parquet")
    main(["significance", "--runs", str(tmp_path / "runs.parquet"), "--out", str(tmp_path / "significance.parquet"),
          "--predictions", str(tmp_path / "predictions.parquet"), "--resamples", "1000"])
    ex = pd.read_parquet(tmp_path / "example_significance.parquet")
    assert list(ex["test"]) == ["hier_bootstrap", "aso"]  # MCC: no McNemar
    assert (tmp_path / "significance.parquet").is_file()  # the seed-level table as before
