"""Nothing lost: checkpoints, resume after a kill, bitwise-equal metrics on a CPU."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from conftest import recipe_args
import pytest
import yaml

from peftbench import train as train_mod
from peftbench.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _args(model_dir, data, method, out, ckpt, **recipe):
    rec = {"lr": 2e-3, "epochs": 2, "batch_size": 16, "max_train_samples": 96, "max_eval_samples": 64,
           "log_every": 1, "checkpoint_every": 2, **recipe}
    return ["train", "--model-name", "tiny", "--model", str(model_dir), "--task", "stsb", "--method", method,
            "--budget", "2", "--seed", "3", "--train", str(data["stsb"]["train"]),
            "--dev", f"validation={data['stsb']['validation']}", *recipe_args(rec),
            "--out", str(out), "--checkpoint-dir", str(ckpt)]


class Interrupt(BaseException):
    pass


@pytest.mark.parametrize("method,recipe", [("lora", {}), ("adalora", {}), ("full", {}), ("glora", {}), ("fwlora", {}),
                                           ("lora", {"group_by_length": True}), ("lora", {"eval_every_epoch": False})],
                         ids=["lora", "adalora", "full", "glora", "fwlora", "lora-grouped", "lora-last-epoch-eval"])
def test_interrupted_run_resumes_to_identical_metrics(method, recipe, tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    main(_args(tiny_model_dir, tiny_data, method, tmp_path / "a", tmp_path / "ca", **recipe))
    assert not (tmp_path / "ca" / "checkpoint.pt").exists()  # removed once outputs are complete

    real_save = train_mod.Checkpointer.save
    calls = {"n": 0}

    def save_then_die(self, *a, **k):
        real_save(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 3:  # after the epoch-1 checkpoint and one mid-epoch-2 checkpoint
            raise Interrupt()

    monkeypatch.setattr(train_mod.Checkpointer, "save", save_then_die)
    with pytest.raises(Interrupt):
        main(_args(tiny_model_dir, tiny_data, method, tmp_path / "b", tmp_path / "cb", **recipe))
    assert (tmp_path / "cb" / "checkpoint.pt").is_file() and not (tmp_path / "b" / "metrics.parquet").exists()
    monkeypatch.setattr(train_mod.Checkpointer, "save", real_save)
    main(_args(tiny_model_dir, tiny_data, method, tmp_path / "b", tmp_path / "cb", **recipe))

    a = pd.read_parquet(tmp_path / "a" / "metrics.parquet").iloc[0]
    b = pd.read_parquet(tmp_path / "b" / "metrics.parquet").iloc[0]
    for col in ("dev_pearson", "dev_spearman", "best_dev_pearson", "best_epoch", "steps"):
        assert a[col] == b[col], col
    ca = pd.read_parquet(tmp_path / "a" / "curve.parquet")
    cb = pd.read_parquet(tmp_path / "b" / "curve.parquet")
    assert ca["loss"].equals(cb["loss"]) and ca["step"].equals(cb["step"])


def test_checkpoint_of_another_configuration_is_not_resumed(tiny_model_dir, tiny_data, tmp_path, caplog):
    main(_args(tiny_model_dir, tiny_data, "lora", tmp_path / "a", tmp_path / "c", keep_checkpoints=True, epochs=1))
    assert (tmp_path / "c" / "checkpoint.pt").is_file()  # kept on request (mid-run one, epoch 1 of 1 has none after eval)
    main(_args(tiny_model_dir, tiny_data, "lora", tmp_path / "b", tmp_path / "c", lr=1e-3, epochs=1))
    assert "belongs to another configuration" in caplog.text


@pytest.mark.snakemake
def test_sigkill_then_snakemake_rerun_matches_uninterrupted(tiny_model_dir, glue_dir, tmp_path):
    """A real kill: snakemake runs the train job, SIGKILL hits the whole process group after the
    first checkpoint, and a rerun through Snakemake resumes and ends with the same metrics."""
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["models"] = {"tiny": str(tiny_model_dir)}
    cfg["data"].update(glue_dir=str(glue_dir), max_train_samples=400, max_eval_samples=64)
    cfg["grid"].update(models=["tiny"], tasks=["stsb"], methods=["lora"], budgets=[2.0], seeds=[1])
    cfg["training"]["defaults"].update(epochs=2, batch_size=8, max_length=32, log_every=5, checkpoint_every=10)
    target = "results/runs/tiny/stsb/lora/b2/s1/metrics.parquet"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

    def cmd(work):
        return [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(work), "--configfile",
                str(work / "config.yaml"), "--cores", "2", "--resources", "gpu=1", "--rerun-incomplete", target]

    works = {}
    for name in ("whole", "killed"):
        works[name] = tmp_path / name
        works[name].mkdir()
        (works[name] / "config.yaml").write_text(yaml.safe_dump(cfg))
    # the uninterrupted reference runs alongside the kill and the rerun (the same command and thread
    # count, so the same metrics); it only has to be finished before the comparison
    whole_log = tmp_path / "whole.log"
    with whole_log.open("w") as f:
        whole = subprocess.Popen(cmd(works["whole"]), env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        _kill_and_rerun(cmd, works, env, target)
        assert whole.wait(timeout=600) == 0, whole_log.read_text()[-3000:]
    finally:
        if whole.poll() is None:
            whole.kill()
            whole.wait()
    a = pd.read_parquet(works["whole"] / target).iloc[0]
    b = pd.read_parquet(works["killed"] / target).iloc[0]
    assert a["dev_pearson"] == b["dev_pearson"] and a["dev_spearman"] == b["dev_spearman"]


def _kill_and_rerun(cmd, works, env, target):
    """Snakemake runs the train job in works["killed"]; SIGKILL hits the whole process group after
    the first checkpoint; unlock, rerun, and the job resumes from the checkpoint."""
    ckpt = works["killed"] / "results/checkpoints/tiny/stsb/lora/b2/s1/checkpoint.pt"
    proc = subprocess.Popen(cmd(works["killed"]), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert ckpt.exists(), "no checkpoint was written before the deadline"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (works["killed"] / target).exists()
    # A SIGKILL leaves Snakemake's lock behind: unlock (as the README says), then rerun.
    subprocess.run([*cmd(works["killed"]), "--unlock"], check=True, capture_output=True, env=env, timeout=120)
    rerun = subprocess.run(cmd(works["killed"]), capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = (works["killed"] / "results/logs/train/tiny/stsb/lora/b2/s1.log").read_text()
    assert "resumed from" in log
    assert not ckpt.exists()
