"""The tuning stage in the DAG, through real Snakemake: no tune job unless tuning.enabled; with it,
one study per (model, task, method, budget) before train, whose best.yaml the runs read; editing
one method's search space reruns exactly that method's study and runs."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from conftest import snakemake_run as smk
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.snakemake


def job_counts(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """``{rule: jobs}`` from a dry run's "Job stats" table."""
    text = proc.stdout + proc.stderr
    stats = text.split("Job stats:", 1)[1] if "Job stats:" in text else ""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", stats, re.M)
            if m.group(1) not in ("job", "total")}


def _config(work: Path, tiny_model_dir, glue_dir, methods, tuning=None) -> None:
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["models"] = {"tiny": str(tiny_model_dir)}
    cfg["data"].update(glue_dir=str(glue_dir), max_train_samples=48, max_eval_samples=32)
    cfg["grid"].update(models=["tiny"], tasks=["stsb"], methods=methods, budgets=[2.0], seeds=[1])
    cfg["training"]["defaults"].update(epochs=1, batch_size=8, max_length=32, log_every=2)
    if tuning is not None:
        cfg["tuning"] = tuning
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))


def test_disabled_tuning_plans_the_same_jobs_as_no_tuning_section(tmp_path, tiny_model_dir, glue_dir):
    methods = ["lora", "fwlora", "full"]
    _config(tmp_path, tiny_model_dir, glue_dir, methods)
    base = job_counts(smk(tmp_path, "-n"))
    _config(tmp_path, tiny_model_dir, glue_dir, methods, tuning={"enabled": False, "trials": 3})
    off = job_counts(smk(tmp_path, "-n"))
    assert off == base and "tune" not in off and "tuning_table" not in off and base["train"] == 3
    _config(tmp_path, tiny_model_dir, glue_dir, methods, tuning={"enabled": True, "trials": 3})
    on = job_counts(smk(tmp_path, "-n"))
    assert on["tune"] == 3 and on["train"] == 3  # one study per (model, task, method, budget)
    assert on["tuning_table"] == 1  # the expected-validation-performance figure reads its table
    assert {k: v for k, v in on.items() if k not in ("tune", "tuning_table")} == {**base, "plot": base["plot"] + 1}


def test_bad_space_fails_at_planning(tmp_path, tiny_model_dir, glue_dir):
    _config(tmp_path, tiny_model_dir, glue_dir, ["lora"],
            tuning={"enabled": True, "spaces": {"lora": {"lr": {"low": 1e-3, "high": 1e-4}}}})
    proc = smk(tmp_path, "-n", check=False)
    assert proc.returncode != 0 and "tuning.spaces.lora.lr" in proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_model_dir, glue_dir):
    """A finished tiny tuned grid: lora and FW-LoRA, 2 trials each, one task."""
    work = tmp_path_factory.mktemp("tuned")
    _config(work, tiny_model_dir, glue_dir, ["lora", "fwlora"],
            tuning={"enabled": True, "trials": 2, "sampler": "random", "pruner": "none", "holdout_fraction": 0.25})
    targets = [f"results/runs/tiny/stsb/{m}/b2/s1/metrics.parquet" for m in ("lora", "fwlora")]
    # two one-thread GPU-rule jobs at a time (the default profile's gpu=1 would serialise them): the
    # two studies, then the two final runs, side by side on the test machine's two cores
    smk(work, *targets, "--resources", "gpu=2", "--set-threads", "tune=1", "train=1")
    return work, targets


def test_tuned_runs_read_best_yaml(tuned):
    work, _ = tuned
    for m in ("lora", "fwlora"):
        study = work / "results" / "tuning" / "tiny" / "stsb" / m / "b2"
        best = yaml.safe_load((study / "best.yaml").read_text())
        trials = pd.read_parquet(study / "trials.parquet")
        assert len(trials) == 2 and (trials["state"] == "COMPLETE").all()
        assert (study / "journal.log").is_file()
        row = pd.read_parquet(work / "results" / "runs" / "tiny" / "stsb" / m / "b2" / "s1" / "metrics.parquet").iloc[0]
        assert row["lr"] == pytest.approx(best["lr"])
        assert row["tuning_trials"] == 2 and row["tuning_s"] == pytest.approx(best["tuning_s"])
        assert row["train_examples"] == 48  # the final run trains on the whole (capped) training split
    best = yaml.safe_load((work / "results/tuning/tiny/stsb/fwlora/b2/best.yaml").read_text())
    assert set(best["space"]) == {"lr", "lam"}


def test_editing_one_space_reruns_exactly_that_method(tuned):
    work, targets = tuned
    assert "Nothing to be done" in smk(work, "-n", *targets).stdout + smk(work, "-n", *targets).stderr
    proc = smk(work, "-n", *targets, "--config",
               "tuning={enabled: true, trials: 2, sampler: random, pruner: none, holdout_fraction: 0.25, "
               "spaces: {fwlora: {lam: {low: 1.0e-5, high: 1.0e-3, log: true}}}}")
    counts = job_counts(proc)
    assert counts.get("tune") == 1 and counts.get("train") == 1, proc.stdout[-3000:]
    assert "wildcards: model=tiny, task=stsb, method=fwlora" in proc.stdout
    assert "method=lora" not in proc.stdout


def test_tuning_cost_reaches_runs_table_and_evp_figure(tuned):
    work, _ = tuned
    smk(work, "results/tables/runs.parquet", "results/tables/trials.parquet", "results/comparison/evp.pdf")
    runs = pd.read_parquet(work / "results/tables/runs.parquet")
    assert (runs["tuning_trials"] == 2).all() and (runs["tuning_s"] > 0).all()
    trials = pd.read_parquet(work / "results/tables/trials.parquet")
    assert len(trials) == 4 and set(trials["method"]) == {"lora", "fwlora"}
    assert (work / "results/comparison/evp.png").is_file()
