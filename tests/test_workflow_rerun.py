"""What reruns a finished run through real Snakemake, and `--config` overrides as a user types them.

Speed-only knobs (compile, length buckets, evaluation batch size, checkpoint and log cadence)
travel outside Snakemake's params trigger, so toggling them leaves finished runs alone; the
hyperparameters that change a result (learning rate, method options, training caps) rerun them.
Snakemake 9 passes nested `--config` values as strings; the workflow coerces them.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import snakemake_run as smk
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.snakemake
TARGET = "results/runs/tiny/stsb/lora/b2/s1/metrics.parquet"


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir, glue_dir):
    """One finished tiny LoRA run (2-layer random BERT, 32 STS-B examples, 1 epoch)."""
    work = tmp_path_factory.mktemp("rerun")
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["models"] = {"tiny": str(tiny_model_dir)}
    cfg["data"].update(glue_dir=str(glue_dir), max_train_samples=32, max_eval_samples=32)
    cfg["grid"].update(models=["tiny"], tasks=["stsb"], methods=["lora"], budgets=[2.0], seeds=[1])
    cfg["training"]["defaults"].update(epochs=1, batch_size=8, max_length=32)
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    smk(work, TARGET)
    assert (work / TARGET).is_file()
    return work


def planned(proc: subprocess.CompletedProcess) -> bool:
    """Whether a dry run plans the train job."""
    return "rule train:" in proc.stdout


@pytest.mark.parametrize("override", [
    "training={defaults: {compile: true, compile_backend: eager, length_buckets: 4}}",
    "training={defaults: {eval_batch_size: 7, log_every: 3, checkpoint_every: 0, keep_checkpoints: true}}",
])
def test_speed_knobs_do_not_rerun_finished_runs(finished, override):
    proc = smk(finished, "-n", TARGET, "--config", override)
    assert not planned(proc) and "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout[-2000:]


@pytest.mark.parametrize("override", [
    "training={adapters: {lr: 1.0e-3}}",
    "method_options={lora: {alpha: 8}}",
    "data={max_train_samples: 16}",
    "training={defaults: {warmup_ratio: 0.2}}",
])
def test_result_changing_hyperparameters_rerun(finished, override):
    proc = smk(finished, "-n", TARGET, "--config", override)
    assert planned(proc), proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "params" in proc.stdout.split("Reasons:")[-1]


def test_config_overrides_as_a_user_types_them(finished):
    """Numbers, lists, booleans and null inside nested --config values (strings in Snakemake 9)."""
    proc = smk(finished, "-n", "--config", "data={max_train_samples: 64, max_eval_samples: null}",
               "grid={seeds: [1, 2], budgets: [2.0, 4]}", "training={defaults: {compile: false}}")
    assert proc.returncode == 0
    assert proc.stdout.count("rule train:") == 4  # 2 seeds x 2 budgets


def test_a_bad_override_names_the_key(finished):
    proc = smk(finished, "-n", "--config", "data={max_train_samples: many}", check=False)
    assert proc.returncode != 0
    assert "data.max_train_samples" in proc.stdout + proc.stderr


def test_a_bad_method_option_fails_at_planning(finished):
    proc = smk(finished, "-n", "--config", "method_options={glora: {beta: 2}}", check=False)
    assert proc.returncode != 0
    assert "method_options.glora.beta: 2.0 — must be in [0, 1)" in proc.stdout + proc.stderr
