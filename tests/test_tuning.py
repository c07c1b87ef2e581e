"""The tuning stage (issue 13): search spaces as config data, the held-out split, Optuna journal
studies that resume, and the tuned recipe of the final runs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import recipe_args

from peftbench import config as pbconfig
from peftbench import tuning
from peftbench.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _cfg(**tuning_cfg):
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["tuning"] = tuning_cfg
    return cfg


# ------------------------------------------------------------------------------------------------
# 1. search spaces as config data
# ------------------------------------------------------------------------------------------------

def test_tuning_is_off_by_default_with_a_space_for_every_method():
    from peftbench.methods import METHODS

    out = pbconfig.validate(_cfg())
    t = out["tuning"]
    assert t["enabled"] is False and t["sampler"] == "tpe" and t["pruner"] == "median" and t["trials"] >= 1
    for m in METHODS:
        assert "lr" in tuning.space_for(out, m), m
    assert tuning.space_for(out, "lora")["lr"].log is True
    # the research methods tune their own option next to lr
    assert set(tuning.space_for(out, "glora")) == {"lr", "beta"}
    assert set(tuning.space_for(out, "fwlora")) == {"lr", "lam"}
    assert set(tuning.space_for(out, "gsa")) == {"lr", "lam"}
    assert set(tuning.space_for(out, "dynacsg")) == {"lr", "lam"}
    # a control tunes the same options as its method (glora_uniform's uniform scores ignore beta)
    for control, method in (("glora_shuffled", "glora"), ("fwlora_uniform", "fwlora"), ("dynacsg_static", "dynacsg")):
        assert tuning.space_for(out, control) == tuning.space_for(out, method), control
    assert set(tuning.space_for(out, "glora_uniform")) == {"lr"}
    # full fine-tuning has its own (lower) learning-rate range, not the adapters' one
    assert tuning.space_for(out, "full")["lr"].high < tuning.space_for(out, "lora")["lr"].high


def test_spaces_override_per_method_and_null_drops_a_default():
    out = pbconfig.validate(_cfg(spaces={"adapters": {"lr": {"low": 1e-4, "high": 1e-3}},
                                         "glora": {"beta": None, "min_rank": {"choices": [0, 1]}},
                                         "gsa": {"k": {"low": 4, "high": 16}}}))
    lora = tuning.space_for(out, "lora")["lr"]
    assert (lora.low, lora.high, lora.log) == (1e-4, 1e-3, False)
    g = tuning.space_for(out, "glora")
    assert set(g) == {"lr", "min_rank"} and g["min_rank"].choices == (0, 1)
    k = tuning.space_for(out, "gsa")["k"]
    assert k.integer and (k.low, k.high) == (4, 16)
    assert tuning.space_for(out, "full")["lr"].low == 5e-6  # adapters does not reach full fine-tuning


@pytest.mark.parametrize("tun, key", [
    ({"spaces": {"lora": {"beta": {"low": 0.1, "high": 0.2}}}}, "tuning.spaces.lora.beta"),
    ({"spaces": {"glora": {"beta": {"low": 0.9, "high": 0.5}}}}, "tuning.spaces.glora.beta"),
    ({"spaces": {"fwlora": {"lam": {"low": 1e-3, "high": 1e-3}}}}, "tuning.spaces.fwlora.lam"),
    ({"spaces": {"lora": {"lr": {"low": 0, "high": 1e-3, "log": True}}}}, "tuning.spaces.lora.lr"),
    ({"spaces": {"lora": {"lr": {"low": -1, "high": 1e-3}}}}, "tuning.spaces.lora.lr"),
    ({"spaces": {"glora": {"beta": {"low": 0.5, "high": 1.5}}}}, "tuning.spaces.glora.beta"),
    ({"spaces": {"gsa": {"k": {"low": 2.5, "high": 8}}}}, "tuning.spaces.gsa.k"),
    ({"spaces": {"glora": {"estimator": {"choices": ["lora", "nope"]}}}}, "tuning.spaces.glora"),
    ({"spaces": {"glora": {"estimator": {"choices": []}}}}, "tuning.spaces.glora.estimator"),
    ({"spaces": {"nomethod": {"lr": {"low": 1e-5, "high": 1e-3}}}}, "tuning.spaces.nomethod"),
    ({"spaces": {"lora": {"lr": {"low": 1e-5}}}}, "tuning.spaces.lora.lr"),
    ({"trials": 0}, "tuning.trials"),
    ({"holdout_fraction": 1.0}, "tuning.holdout_fraction"),
    ({"sampler": "grid"}, "tuning.sampler"),
    ({"enabled": True, "spaces": {"lora": {"lr": None}}}, "tuning.spaces.lora"),
])
def test_bad_tuning_input_fails_at_planning_with_the_key(tun, key):
    with pytest.raises(pbconfig.ConfigError, match=key.replace(".", r"\.")):
        pbconfig.validate(_cfg(**tun))


def test_space_json_round_trips():
    from peftbench.methods import get_method

    out = pbconfig.validate(_cfg(spaces={"gsa": {"k": {"low": 4, "high": 16}}}))
    space = tuning.space_for(out, "gsa")
    back = tuning.space_from_json(tuning.space_json(space), get_method("gsa").options_cls)
    assert back == space


# ------------------------------------------------------------------------------------------------
# 2. the held-out split
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cap", [None, 150])
def test_holdout_is_disjoint_fixed_and_inside_the_capped_rows(cap):
    from peftbench.batches import TokenizedSplit  # noqa: F401 (the cap rule capped_rows mirrors)

    fit, hold = tuning.holdout_rows(400, 0.2, seed=7, max_samples=cap)
    capped = tuning.capped_rows(400, cap)
    assert len(np.intersect1d(fit, hold)) == 0
    assert np.array_equal(np.union1d(fit, hold), capped)
    assert len(hold) == int(np.ceil(0.2 * len(capped)))
    fit2, hold2 = tuning.holdout_rows(400, 0.2, seed=7, max_samples=cap)
    assert np.array_equal(hold, hold2) and np.array_equal(fit, fit2)
    _, hold3 = tuning.holdout_rows(400, 0.2, seed=8, max_samples=cap)
    assert not np.array_equal(hold, hold3)


def test_capped_rows_are_the_rows_a_capped_run_trains_on(tiny_data):
    from peftbench.batches import TokenizedSplit

    path = tiny_data["stsb"]["train"]
    full, capped = TokenizedSplit(path), TokenizedSplit(path, 100)
    rows = tuning.capped_rows(len(full), 100)
    assert np.array_equal(full.labels[rows].numpy(), capped.labels.numpy())


def test_holdout_rejects_a_fraction_that_leaves_nothing():
    with pytest.raises(ValueError, match="holdout_fraction"):
        tuning.holdout_rows(3, 0.9, seed=0)
    with pytest.raises(ValueError, match="holdout_fraction"):
        tuning.holdout_rows(10, 0.0, seed=0)


def test_write_holdout_keeps_the_cache_metadata_and_splits_the_rows(tiny_data, tmp_path):
    from peftbench.io import read_metadata

    src = tiny_data["stsb"]["train"]
    fit, hold = tuning.write_holdout(src, tmp_path, 0.25, 0, max_samples=80)
    assert read_metadata(fit) == read_metadata(src) != {}
    f, h = pq.read_table(fit).to_pandas(), pq.read_table(hold).to_pandas()
    assert (len(f), len(h)) == (60, 20)
    key = lambda df: set(map(tuple, df["input_ids"].map(tuple).to_frame().assign(l=df["label"]).values.tolist()))
    assert not key(f) & key(h)


# ------------------------------------------------------------------------------------------------
# 3. journal studies: trials as separate jobs, resume
# ------------------------------------------------------------------------------------------------

def _tune_args(model_dir, data, out, *, method="lora", trials=2, per_job=None, sampler="random", pruner="none",
               space=None, task="stsb", options=None, epochs=1, **extra):
    rec = {"epochs": epochs, "batch_size": 16, "max_train_samples": 64, "max_eval_samples": 32, "log_every": 2,
           "method_options": options or {}, **extra}
    r, rt = recipe_args(rec)[1], recipe_args(rec)[3]
    settings = {"trials": trials, "sampler": sampler, "pruner": pruner, "seed": 0, "holdout_fraction": 0.25,
                "trials_per_job": per_job}
    return ["tune", "--model-name", "tiny", "--model", str(model_dir), "--task", task, "--method", method,
            "--budget", "2", "--train", str(data[task]["train"]), "--recipe", r, "--runtime", rt,
            "--space", json.dumps(space or {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}),
            "--settings", json.dumps(settings), "--storage", str(out / "journal.log"), "--out", str(out)]


def test_study_in_two_jobs_of_one_trial_loses_and_repeats_nothing(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "study"
    with pytest.raises(SystemExit):  # 1 of 2 trials: the job says to run it again
        main(_tune_args(tiny_model_dir, tiny_data, out, per_job=1))
    t1 = pd.read_parquet(out / "trials.parquet")
    assert list(t1["trial"]) == [0] and not (out / "best.yaml").exists()
    main(_tune_args(tiny_model_dir, tiny_data, out, per_job=1))
    t2 = pd.read_parquet(out / "trials.parquet")
    assert list(t2["trial"]) == [0, 1] and list(t2["state"]) == ["COMPLETE", "COMPLETE"]
    assert t2.loc[0, "param_lr"] == t1.loc[0, "param_lr"] != t2.loc[1, "param_lr"]  # not drawn again
    assert (t2["seconds"] > 0).all() and t2["value"].notna().all() and (t2["metric"] == "pearson").all()
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["tuning_trials"] == 2 and best["best_trial"] == int(t2["value"].idxmax())
    assert best["lr"] == t2.loc[best["best_trial"], "param_lr"]
    assert best["tuning_s"] == pytest.approx(t2["seconds"].sum())
    # a complete study runs nothing more
    main(_tune_args(tiny_model_dir, tiny_data, out, per_job=1))
    assert len(pd.read_parquet(out / "trials.parquet")) == 2


def test_trial_trains_on_fit_rows_and_scores_on_holdout_never_on_dev(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "study"
    main(_tune_args(tiny_model_dir, tiny_data, out, trials=1))
    m = pd.read_parquet(out / "trials" / "0000" / "metrics.parquet").iloc[0]
    assert (m["train_examples"], m["eval_examples"]) == (48, 16)  # 64 capped rows, 25 % held out
    assert not (out / "trials" / "0000" / "adapter.safetensors").exists()  # no weights kept per trial
    assert not (out / "trials" / "0000" / "method_state.pt").exists()  # nor the method's state
    trial = pd.read_parquet(out / "trials.parquet").iloc[0]
    assert trial["value"] == m["dev_main"]


class Killed(BaseException):
    pass


def test_killed_job_resumes_without_losing_a_finished_trial(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    from peftbench import train as train_mod

    out = tmp_path / "study"
    real = train_mod.run
    calls = {"n": 0}

    def die_in_second(**kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Killed()
        return real(**kw)

    monkeypatch.setattr(train_mod, "run", die_in_second)
    with pytest.raises(Killed):
        main(_tune_args(tiny_model_dir, tiny_data, out, trials=2))
    monkeypatch.setattr(train_mod, "run", real)
    main(_tune_args(tiny_model_dir, tiny_data, out, trials=2))
    t = pd.read_parquet(out / "trials.parquet")
    # trial 0 kept, trial 1 (killed mid-run) marked and not counted, trial 2 ran in its place
    assert list(t["trial"]) == [0, 1, 2]
    assert list(t["state"]) == ["COMPLETE", "FAIL", "COMPLETE"] and list(t["counted"]) == [True, False, True]
    assert t.loc[1, "outcome"] == tuning.KILLED
    assert yaml.safe_load((out / "best.yaml").read_text())["tuning_trials"] == 2


@pytest.mark.parametrize("eval_every_epoch", [True, False])
def test_median_pruner_prunes_on_the_per_epoch_holdout_score(tiny_model_dir, tiny_data, tmp_path, monkeypatch,
                                                            eval_every_epoch):
    """The pruner reads every epoch, also where the config evaluates only the last one."""
    import optuna

    calls = []
    real = optuna.trial.Trial.should_prune

    def prune_third(self):
        calls.append(self.number)
        return self.number == 2

    monkeypatch.setattr(optuna.trial.Trial, "should_prune", prune_third)
    out = tmp_path / "study"
    main(_tune_args(tiny_model_dir, tiny_data, out, trials=3, pruner="median", epochs=2,
                    eval_every_epoch=eval_every_epoch))
    t = pd.read_parquet(out / "trials.parquet")
    # asked after epoch 1 only (never after the last epoch, which would throw a finished trial away)
    assert list(t["state"]) == ["COMPLETE", "COMPLETE", "PRUNED"] and calls == [0, 1, 2]
    assert not (out / "trials" / "0002" / "metrics.parquet").exists()
    assert yaml.safe_load((out / "best.yaml").read_text())["tuning_trials"] == 3
    assert real is not None


def test_pruner_is_never_asked_after_the_last_epoch(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    import optuna

    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: True)
    out = tmp_path / "study"
    main(_tune_args(tiny_model_dir, tiny_data, out, trials=1, pruner="median", epochs=1))
    assert list(pd.read_parquet(out / "trials.parquet")["state"]) == ["COMPLETE"]


def test_research_option_is_tuned_and_reaches_the_trial(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "study"
    main(_tune_args(tiny_model_dir, tiny_data, out, method="fwlora", trials=1,
                    space={"lr": {"low": 1e-4, "high": 1e-2, "log": True},
                           "lam": {"low": 1e-6, "high": 1e-2, "log": True}}, options={"beta": 0.9, "lam": 1.0}))
    t = pd.read_parquet(out / "trials.parquet").iloc[0]
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["method_options"]["lam"] == t["param_lam"]
    assert best["method_options"]["lam"] != 1.0 and 1e-6 <= best["method_options"]["lam"] <= 1e-2
    assert best["method_options"]["beta"] == 0.9  # untuned options keep the configured value


def test_study_name_changes_with_the_space_not_with_the_trial_count():
    from peftbench.recipe import Recipe

    rec = Recipe.from_dict({})
    s = tuning.Settings.from_dict({"trials": 4})
    space = {"lr": tuning.Param("lr", 1e-4, 1e-2, log=True)}
    name = tuning.study_name("m", "stsb", "lora", "2", rec, s, space)
    assert name.startswith("m/stsb/lora/b2#")
    import dataclasses

    assert tuning.study_name("m", "stsb", "lora", "2", rec, dataclasses.replace(s, trials=9, trials_per_job=1),
                             space) == name
    assert tuning.study_name("m", "stsb", "lora", "2", rec, s,
                             {"lr": tuning.Param("lr", 1e-4, 1e-3, log=True)}) != name
    assert tuning.study_name("m", "stsb", "lora", "2", dataclasses.replace(rec, epochs=7), s, space) != name


def test_apply_best_replaces_lr_and_options_and_names_a_broken_file(tmp_path):
    from peftbench.recipe import Recipe

    rec = Recipe.from_dict({"lr": 1e-5, "method_options": {"lam": 1.0}})
    (tmp_path / "best.yaml").write_text(yaml.safe_dump({"lr": 3e-4, "method_options": {"lam": 0.5},
                                                        "tuning_trials": 4, "tuning_s": 12.5}))
    out, extra = tuning.apply_best(rec, tmp_path / "best.yaml")
    assert (out.lr, out.method_options, out.epochs) == (3e-4, {"lam": 0.5}, rec.epochs)
    assert extra == {"tuning_trials": 4, "tuning_s": 12.5}
    (tmp_path / "bad.yaml").write_text("lr: 1.0\n")
    with pytest.raises(ValueError, match="method_options"):
        tuning.apply_best(rec, tmp_path / "bad.yaml")


# ------------------------------------------------------------------------------------------------
# 5. reporting
# ------------------------------------------------------------------------------------------------

def test_expected_max_is_dodge_eq_1():
    v = np.array([0.3, 0.1, 0.2])
    # n = 1: the mean; n -> inf: the maximum; n = 2 by enumeration of the 9 ordered pairs
    assert tuning.expected_max(v, 1) == pytest.approx(0.2)
    pairs = [max(a, b) for a in v for b in v]
    assert tuning.expected_max(v, 2) == pytest.approx(np.mean(pairs))
    assert tuning.expected_max(v, 200) == pytest.approx(0.3)
    curve = tuning.expected_max(v, np.arange(1, 6))
    assert curve.shape == (5,) and (np.diff(curve) >= 0).all()
    assert tuning.expected_max([0.5, np.nan], 3) == pytest.approx(0.5)
    with pytest.raises(ValueError, match=">= 1"):
        tuning.expected_max(v, 0)
    with pytest.raises(ValueError, match="no finite"):
        tuning.expected_max([np.nan], 1)


def test_collect_trials_keys_every_study(tmp_path):
    a = tmp_path / "results/tuning/tiny/stsb/lora/b2"
    b = tmp_path / "results/tuning/tiny/stsb/full/b100"
    for d, n in ((a, 2), (b, 1)):
        d.mkdir(parents=True)
        pd.DataFrame({"trial": range(n), "state": ["COMPLETE"] * n, "value": [0.5] * n}).to_parquet(d / "trials.parquet")
    out = tmp_path / "trials.parquet"
    assert tuning.collect_trials([a, b], out) == 3
    t = pd.read_parquet(out)
    assert list(t.columns[:4]) == ["model", "task", "method", "budget"]
    assert list(t["method"]) == ["lora", "lora", "full"] and list(t["budget"]) == ["2", "2", "100"]
    assert tuning.collect_trials([], tmp_path / "empty.parquet") == 0
    assert {"model", "state", "value"} <= set(pd.read_parquet(tmp_path / "empty.parquet").columns)
    with pytest.raises(FileNotFoundError, match="rule tune"):
        tuning.collect_trials([tmp_path / "results/tuning/tiny/stsb/gsa/b2"], out)


def test_evp_plot_one_line_per_method_from_complete_trials():
    from peftbench.analysis import plots
    from test_plots import make_trials

    figs = plots.plot_evp(make_trials())
    assert len(figs) == 1
    ax = figs[0].axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert set(lines) == {"lora", "fwlora"}
    x, y = lines["lora"].get_data()
    assert list(x) == [1, 2, 3]  # the pruned trial has no score
    assert y[-1] == pytest.approx(100 * tuning.expected_max([0.5, 0.55, 0.6], 3))
    label, title = ax.get_ylabel(), figs[0]._suptitle.get_text()
    assert label.count("(") == 1 and label.endswith(("(%)", "(×100)")), label  # one unit, not two
    assert title.count("budget") == 1, title
    empty = plots.plot_evp(make_trials().iloc[0:0])
    assert len(empty) == 1  # placeholder page


def test_summary_lists_tuning_cost_only_for_tuned_runs():
    from peftbench.analysis.summary import _tuning_table

    runs = pd.DataFrame({"method": ["lora", "lora", "gsa"], "budget": ["2", "2", "2"], "task": ["stsb"] * 3,
                         "seed": [1, 2, 1], "tuning_trials": [4, 4, 4], "tuning_s": [10.0, 10.0, 30.0]})
    lines = _tuning_table(runs)
    row = [ln for ln in lines if ln.startswith("| lora |")]
    assert row == ["| lora | 2 | 1 | 4 | 10 |"]  # the seeds share one study
    assert _tuning_table(runs.drop(columns=["tuning_trials", "tuning_s"])) == []


def test_best_record_flags_a_study_whose_trials_all_tie(caplog):
    """A held-out slice on which every trial scores the same (e.g. MCC 0: all at chance) selects
    nothing; best.yaml says so (tied_trials) and the job warns."""
    import logging

    import optuna

    from peftbench.recipe import Recipe
    from peftbench.tuning import best_record

    dist = {"lr": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)}
    tied = optuna.create_study(study_name="tied", direction="maximize")
    for lr in (1e-4, 1e-3, 3e-3):
        tied.add_trial(optuna.trial.create_trial(params={"lr": lr}, distributions=dist, value=0.0))
    with caplog.at_level(logging.WARNING, logger="peftbench.tuning"):
        rec = best_record(tied, Recipe.from_dict({}), "lora", "matthews_correlation", {})
    assert rec["tied_trials"] == 3 and rec["best_trial"] == 0
    assert "cannot tell the settings apart" in caplog.text
    caplog.clear()
    apart = optuna.create_study(study_name="apart", direction="maximize")
    for lr, v in ((1e-4, 0.1), (1e-3, 0.3), (3e-3, 0.2)):
        apart.add_trial(optuna.trial.create_trial(params={"lr": lr}, distributions=dist, value=v))
    with caplog.at_level(logging.WARNING, logger="peftbench.tuning"):
        rec = best_record(apart, Recipe.from_dict({}), "lora", "matthews_correlation", {})
    assert rec["tied_trials"] == 1 and rec["lr"] == 1e-3 and "cannot tell" not in caplog.text
