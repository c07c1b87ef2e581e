"""The OOD stage (issue 14, step 5): label-space mappings checked at planning, and the ANLI
proxy for RTE-trained runs through real Snakemake on a tiny model with the shipped ANLI sample.
HANS (MNLI-trained runs) is hub-only: its table entry is checked here, its data cannot be."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import snakemake_run

from peftbench import config as pbconfig
from peftbench.ood import breakdown_rows, check_ood, correct, headline, score
from peftbench.vocab import HANS_HEURISTICS, OOD_MAPS, OOD_SETS, OODMap

ROOT = Path(__file__).resolve().parents[1]
ANLI_SAMPLE = ROOT / "workflow" / "data" / "ood-sample" / "anli"


def test_every_declared_mapping_is_complete():
    for task, name in OOD_MAPS:
        assert check_ood(task, name).ood_set == name
    m = OOD_MAPS[("rte", "anli_r1")]
    assert m.gold == {0: 0, 1: 1, 2: 1} and m.pred == {0: 0, 1: 1}
    assert OOD_MAPS[("mnli", "hans")].pred == {0: 0, 1: 1, 2: 1}
    assert OOD_SETS["hans"].local is None  # hub only


def test_bad_mappings_fail_with_the_name():
    with pytest.raises(ValueError, match="unknown OOD set 'anli_r9'"):
        check_ood("rte", "anli_r9")
    with pytest.raises(ValueError, match=r"no label mapping for OOD set 'hans' after training on 'rte'"):
        check_ood("rte", "hans")
    bad = {("rte", "anli_r1"): OODMap("rte", "anli_r1", ("entailment", "not_entailment"), {0: 0, 1: 1}, {0: 0, 1: 1}, "")}
    with pytest.raises(ValueError, match=r"\(rte, anli_r1\)\.gold misses class\(es\) \[2\] of set anli_r1"):
        check_ood("rte", "anli_r1", maps=bad)
    bad = {("rte", "anli_r1"): OODMap("rte", "anli_r1", ("e", "n"), {0: 0, 1: 1, 2: 1}, {0: 0}, "")}
    with pytest.raises(ValueError, match=r"\.pred misses class\(es\) \[1\] of task rte"):
        check_ood("rte", "anli_r1", maps=bad)


@pytest.mark.parametrize("sets,match", [({"rte": ["anli_r9"]}, "ood.sets.rte: unknown OOD set 'anli_r9'"),
                                        ({"cola": ["anli_r1"]}, "ood.sets.cola: no label mapping"),
                                        ({"xnli": ["anli_r1"]}, "ood.sets.xnli: unknown task")])
def test_bad_ood_config_fails_at_planning(sets, match):
    with pytest.raises(pbconfig.ConfigError, match=match):
        pbconfig.load(ROOT / "config.yaml", {"ood": {"sets": sets}})


def test_score_maps_both_label_spaces():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])  # predictions 0, 1, 1, 0
    gold = np.array([0, 1, 2, 2])  # ANLI: entailment, neutral, contradiction, contradiction
    assert score(logits, gold, OOD_MAPS[("rte", "anli_r1")]) == 0.75
    mnli = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])  # MNLI contradiction -> non-entailment
    assert score(mnli, np.array([1, 0]), OOD_MAPS[("mnli", "hans")]) == 1.0


def test_ood_sample_is_small_and_licensed():
    files = sorted(ANLI_SAMPLE.glob("dev_r*.parquet"))
    assert [f.name for f in files] == ["dev_r1.parquet", "dev_r2.parquet", "dev_r3.parquet"]
    assert sum(f.stat().st_size for f in files) < 100_000
    assert "CC BY-NC 4.0" in (ANLI_SAMPLE.parent / "README.md").read_text()


def _rte_from_anli(frame: pd.DataFrame) -> pd.DataFrame:
    """RTE-schema rows from ANLI rows (the documented proxy: neutral/contradiction -> 1)."""
    return pd.DataFrame({"sentence1": frame["premise"], "sentence2": frame["hypothesis"],
                         "label": frame["label"].map(OOD_MAPS[("rte", "anli_r1")].gold).astype("int64"),
                         "idx": np.arange(len(frame), dtype=np.int32)})


@pytest.mark.snakemake
def test_anli_proxy_stage_through_snakemake(tmp_path, tiny_model_dir):
    # RTE-shaped data made of the ANLI sample: train on r2 + r3, validate on r1, so the OOD score
    # on anli_r1 must equal the run's own dev accuracy (the reloaded adapter is the trained model)
    glue = tmp_path / "glue" / "rte"
    glue.mkdir(parents=True)
    r = {k: pd.read_parquet(ANLI_SAMPLE / f"dev_r{k}.parquet") for k in (1, 2, 3)}
    _rte_from_anli(pd.concat([r[2], r[3]], ignore_index=True)).to_parquet(glue / "train.parquet")
    _rte_from_anli(r[1]).to_parquet(glue / "validation.parquet")
    work = tmp_path / "work"
    work.mkdir()
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["models"] = {"tiny": str(tiny_model_dir)}
    cfg["data"].update(glue_dir=str(glue.parent), anli_dir=str(ANLI_SAMPLE), max_train_samples=None,
                       max_eval_samples=None)
    # glora re-allocates its ranks during the run: the OOD stage must restore them to reload it
    cfg["grid"].update(models=["tiny"], tasks=["rte"], methods=["lora", "glora"], budgets=["r2"], seeds=[1])
    cfg["training"]["defaults"].update(epochs=1, batch_size=16, max_length=32)
    cfg["training"]["adapters"] = {"lr": 5e-3}
    cfg["ood"] = {"sets": {"rte": ["anli_r1", "anli_r2", "anli_r3"]}}
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    # two one-thread GPU-rule jobs at a time (the default profile's gpu=1 would serialise them): the
    # two runs and their OOD evaluations side by side on the test machine's two cores; train and
    # evaluate_ood at the same thread count, so the re-scored dev split is exact
    proc = snakemake_run(work, "results/tables/ood.parquet", "results/tables/ood_significance.parquet",
                         "results/comparison/ood.pdf", "--resources", "gpu=2",
                         "--set-threads", "train=1", "evaluate_ood=1")
    assert "rule evaluate_ood:" in proc.stdout + proc.stderr
    ood = pd.read_parquet(work / "results" / "tables" / "ood.parquet")
    assert list(ood["ood_set"]) == ["anli_r1", "anli_r2", "anli_r3"] * 2  # no breakdown: headline rows only
    assert (ood[["breakdown", "subset", "gold_class"]] == "all").all().all()
    assert list(ood["n"]) == [40] * 6 and ood["accuracy"].between(0, 1).all()
    assert list(ood["method"]) == ["glora"] * 3 + ["lora"] * 3 and set(ood["train_task"]) == {"rte"}
    assert ood["source"].str.startswith(str(ANLI_SAMPLE)).all()
    for method in ("lora", "glora"):
        run = work / "results" / "runs" / "tiny" / "rte" / method / "br2" / "s1"
        m = pd.read_parquet(run / "metrics.parquet").iloc[0]
        o = ood[ood["method"] == method].set_index("ood_set")
        assert o.loc["anli_r1", "accuracy"] == m["dev_accuracy"], method
        pd.testing.assert_frame_equal(pd.read_parquet(run / "ood.parquet"), o.reset_index()[ood.columns],
                                      check_dtype=False)
        # the stage's own reload check: the reloaded model re-scores the dev split as logged
        assert (o["reload_dev_main"] == m["dev_main"]).all() and o["reload_matches"].all(), method
    assert bool(m["reallocated"])  # glora's ranks changed shape during the run, and it reloaded
    # the significance stage tests the OOD accuracies like the dev metric; the ood figure is drawn
    osig = pd.read_parquet(work / "results" / "tables" / "ood_significance.parquet")
    assert list(osig["ood_set"]) == ["anli_r1", "anli_r2", "anli_r3"]
    assert set(osig["method"]) == {"glora"} and set(osig["baseline"]) == {"lora"}
    assert list(osig["value_column"]) == [f"ood_anli_r{k}_accuracy" for k in (1, 2, 3)]
    assert (osig["n"] == 1).all()  # one seed: no test, but the row and its difference are there
    o = ood.set_index(["method", "ood_set"])["accuracy"]
    assert osig.set_index("ood_set").loc["anli_r2", "mean_diff"] == pytest.approx(
        o["glora", "anli_r2"] - o["lora", "anli_r2"])
    assert (work / "results" / "comparison" / "ood.pdf").stat().st_size > 0
    assert (work / "results" / "comparison" / "ood.png").stat().st_size > 0


def _hans_frame():
    # the jhu-cogsci/hans schema: label 0 entailment, 1 non-entailment; heuristic and subcase columns
    return pd.DataFrame({
        "premise": ["p"] * 8, "hypothesis": ["h"] * 8,
        "label": [0, 0, 1, 1, 0, 1, 1, 0],
        "heuristic": ["lexical_overlap"] * 4 + ["subsequence"] * 2 + ["constituent"] * 2,
        "subcase": ["ln_a", "ln_a", "le_b", "le_b", "sn_c", "se_d", "ce_e", "cn_f"],
    })


def test_hans_breakdown_per_heuristic_gold_class_and_subcase():
    df = _hans_frame()
    # an MNLI model that always says entailment (class 0): right exactly on the entailed examples
    logits = np.tile([1.0, 0.0, 0.0], (len(df), 1))
    logits[2] = [0.0, 0.0, 1.0]  # one non-entailed lexical-overlap example predicted contradiction
    right = correct(logits, df["label"].to_numpy(), OOD_MAPS[("mnli", "hans")])
    assert right.tolist() == [True, True, True, False, True, False, False, True]
    rows = pd.DataFrame(breakdown_rows(df, right, OOD_SETS["hans"]))
    by = rows.set_index(["breakdown", "subset", "gold_class"])
    assert by.loc[("heuristic", "lexical_overlap", "entailment"), "accuracy"] == 1.0
    assert by.loc[("heuristic", "lexical_overlap", "non-entailment"), ["n", "accuracy"]].tolist() == [2, 0.5]
    assert by.loc[("heuristic", "constituent", "non-entailment"), "accuracy"] == 0.0
    assert by.loc[("subcase", "le_b", "non-entailment"), "accuracy"] == 0.5
    assert list(rows["breakdown"].unique()) == ["heuristic", "subcase"]
    assert rows[rows["breakdown"] == "heuristic"]["n"].sum() == len(df)
    assert ("subcase", "le_b", "entailment") not in by.index  # combinations without examples are left out
    assert set(rows.loc[rows["breakdown"] == "heuristic", "subset"]) == set(HANS_HEURISTICS)
    with pytest.raises(ValueError, match=r"OOD set hans: missing breakdown column\(s\) \['subcase'\]"):
        breakdown_rows(df.drop(columns="subcase"), right, OOD_SETS["hans"])
    assert breakdown_rows(df, right, OOD_SETS["anli_r1"]) == []  # ANLI declares no breakdown


def test_headline_rows_feed_the_explorer_columns():
    from peftbench.analysis.explorer import with_ood_columns

    key = {"model": "tiny", "task": "mnli", "method": "lora", "budget": "r8", "seed": 1}
    ood = pd.DataFrame([{**key, "ood_set": "hans", "breakdown": "all", "subset": "all", "gold_class": "all",
                         "accuracy": 0.6},
                        {**key, "ood_set": "hans", "breakdown": "heuristic", "subset": "subsequence",
                         "gold_class": "entailment", "accuracy": 0.9}])
    assert headline(ood)["accuracy"].tolist() == [0.6]
    runs = pd.DataFrame([{**key, "dev_main": 0.8}])
    assert with_ood_columns(runs, ood)["ood_hans_accuracy"].tolist() == [0.6]


def _runs_and_ood():
    """RTE runs of lora (reference) and glora, 4 seeds, and their ANLI r1/r2 accuracies (one
    glora seed lacks its anli_r2 row); an SST-2 family without OOD sets."""
    acc = {"lora": [0.30, 0.34, 0.32, 0.36], "glora": [0.35, 0.36, 0.37, 0.41]}
    runs, ood = [], []
    for method, values in acc.items():
        for seed, v in enumerate(values):
            key = {"model": "tiny", "task": "rte", "method": method, "budget": "r8", "seed": seed}
            runs.append({**key, "status": "ok", "metric": "accuracy", "dev_main": 0.6 + v / 10})
            runs.append({**key, "task": "sst2", "status": "ok", "metric": "accuracy", "dev_main": 0.8})
            for s, shift in (("anli_r1", 0.0), ("anli_r2", 0.05)):
                if not (method == "glora" and seed == 3 and s == "anli_r2"):
                    ood.append({**key, "ood_set": s, "breakdown": "all", "subset": "all", "gold_class": "all",
                                "accuracy": v + shift})
    return pd.DataFrame(runs), pd.DataFrame(ood)


def test_ood_accuracies_are_tested_like_dev_metrics():
    from scipy import stats
    from statsmodels.stats.multitest import multipletests

    from peftbench.analysis.significance import StatsOptions, compare_methods, compare_ood

    runs, ood = _runs_and_ood()
    opts = StatsOptions(resamples=200)
    res = compare_ood(runs, ood, reference="lora", opts=opts)
    assert list(res["ood_set"]) == ["anli_r1", "anli_r2"] and set(res["task"]) == {"rte"}  # no glue_avg, no sst2
    r1 = res.set_index("ood_set").loc["anli_r1"]
    assert r1["value_column"] == "ood_anli_r1_accuracy" and r1["metric"] == "accuracy" and r1["n"] == 4
    lora = ood[(ood.method == "lora") & (ood.ood_set == "anli_r1")]["accuracy"].to_numpy()
    glora = ood[(ood.method == "glora") & (ood.ood_set == "anli_r1")]["accuracy"].to_numpy()
    t = stats.ttest_rel(glora, lora)
    assert r1["p_ttest"] == pytest.approx(t.pvalue) and r1["mean_diff"] == pytest.approx((glora - lora).mean())
    assert r1["p_ttest_holm"] == pytest.approx(multipletests([t.pvalue], method="holm")[1][0])
    r2 = res.set_index("ood_set").loc["anli_r2"]
    assert r2["n"] == 3 and r2["n_missing_method"] == 1 and r2["missing_seeds_method"] == "3"
    # the same numbers as the dev-metric tests of a runs table holding the OOD accuracy as its value
    as_dev = runs[runs.task == "rte"].copy()
    as_dev["dev_main"] = as_dev.apply(lambda r: lora[r.seed] if r.method == "lora" else glora[r.seed], axis=1)
    dev = compare_methods(as_dev, reference="lora", opts=opts)
    dev = dev[dev.task == "rte"].iloc[0]
    for col in ("mean_diff", "ci_low", "ci_high", "p_ttest", "cohens_d"):
        assert r1[col] == pytest.approx(dev[col]), col
    assert compare_ood(runs, ood.iloc[:0], reference="lora").empty


def test_anli_dev_and_test_rounds_are_declared_for_rte_and_mnli():
    """Issue 14: MNLI-trained models are scored on HANS and ANLI r1-r3 dev and test; RTE-trained
    models on the ANLI proxy (dev offline, test from the hub)."""
    for r in (1, 2, 3):
        dev, test = OOD_SETS[f"anli_r{r}"], OOD_SETS[f"anli_r{r}_test"]
        assert (dev.split, test.split) == (f"dev_r{r}", f"test_r{r}") and dev.hub_id == test.hub_id == "facebook/anli"
        for name in (dev.name, test.name):
            assert check_ood("rte", name).gold == {0: 0, 1: 1, 2: 1}
            m = check_ood("mnli", name)
            assert m.classes == ("entailment", "neutral", "contradiction") and m.pred == {0: 0, 1: 1, 2: 2}
    assert check_ood("mnli", "hans").pred == {0: 0, 1: 1, 2: 1}
