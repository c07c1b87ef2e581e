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
    proc = snakemake_run(work, "results/tables/ood.parquet", "results/tables/ood_significance.parquet",
                         "results/comparison/ood.pdf")
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
