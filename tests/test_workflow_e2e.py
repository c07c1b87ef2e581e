"""End to end: the real Snakemake DAG on the repo's small config (.test/config.yaml): real GLUE
data (the sample shipped in workflow/data/glue-sample) and the real all-MiniLM-L6-v2, every
method. Runs `snakemake --cores 2 --resources gpu=2 --set-threads train=1` (two one-thread train
jobs at a time)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile")]
TASKS = ["stsb", "cola"]
SEEDS = [1, 2]


def e2e_config(glue_dir: Path) -> dict:
    cfg = yaml.safe_load((ROOT / ".test" / "config.yaml").read_text())
    cfg["data"]["glue_dir"] = str(glue_dir)  # the workdir is elsewhere: an absolute path
    return cfg


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([*SNAKEMAKE, "-d", str(workdir), "--configfile", str(workdir / "config.yaml"), *args],
                          capture_output=True, text=True, env=env, timeout=1500)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def workflow_run(tmp_path_factory, glue_dir):
    from peftbench.methods import METHODS

    work = tmp_path_factory.mktemp("e2e")
    cfg = e2e_config(glue_dir)
    methods = cfg["grid"]["methods"]
    assert cfg["grid"]["tasks"] == TASKS and cfg["grid"]["seeds"] == SEEDS
    # every method family runs for real; the controls and static baselines are variants of these
    # (same code paths) and run through the CLI in their own unit tests
    families = {"full", "lora", "adalora", "glora", "fwlora", "spectral_a", "spectral_r", "gsa", "dynacsg", "phased"}
    assert set(methods) == families and families <= set(METHODS)
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    # Two one-thread train jobs at a time (`gpu` is only a slot counter on a CPU host; gpu=2 overrides
    # the default profile's gpu=1): each job is dominated by its single-threaded start-up (Python,
    # the transformers import, the model load), so two of them overlapping use the test machine's
    # two cores far better than one two-thread job.
    snakemake(work, "--cores", "2", "--resources", "gpu=2", "--set-threads", "train=1")
    return work, methods


@pytest.mark.e2e
def test_runs_table_from_real_data(workflow_run):
    work, methods = workflow_run
    runs = pd.read_parquet(work / "results/tables/runs.parquet")
    assert len(runs) == len(TASKS) * len(methods) * len(SEEDS)
    assert set(runs["status"]) == {"ok"}
    assert set(runs["method"]) == set(methods) and set(runs["task"]) == set(TASKS)
    assert set(runs.loc[runs.method == "full", "budget"]) == {"100"}  # budget tokens (strings)
    assert set(runs.loc[runs.method != "full", "budget"]) == {"0.6"}
    for col in ["model", "seed", "metric", "dev_main", "best_dev_main", "trainable_params", "adapter_params",
                "head_params", "backbone_params", "trainable_pct", "train_s", "samples_per_s", "peak_mem_mib",
                "torch_version", "transformers_version", "peft_version", "protocol"]:
        assert col in runs.columns, col
        assert runs[col].notna().all(), col
    assert runs["backbone_params"].eq(runs["backbone_params"].iloc[0]).all()
    assert 22_000_000 < runs["backbone_params"].iloc[0] < 23_000_000  # all-MiniLM-L6-v2
    stsb, cola = runs[runs.task == "stsb"], runs[runs.task == "cola"]
    assert set(stsb["metric"]) == {"pearson"} and set(cola["metric"]) == {"matthews_correlation"}
    assert stsb["dev_pearson"].between(-1, 1).all() and stsb["dev_spearman"].between(-1, 1).all()
    assert cola["dev_matthews_correlation"].between(-1, 1).all() and cola["dev_accuracy"].between(0, 1).all()
    # MiniLM is a sentence-similarity model: even a few STS-B steps correlate positively.
    assert stsb["dev_pearson"].mean() > 0
    assert stsb.groupby("method")["dev_pearson"].nunique().max() > 1  # seeds really differ
    peft_rows = runs[runs.method.isin(["lora", "adalora"])]
    assert (peft_rows["trainable_pct"] < 1.0).all()
    assert (runs.loc[runs.method == "full", "trainable_pct"] == 100.0).all()


@pytest.mark.e2e
def test_stage_artefacts(workflow_run):
    work, _ = workflow_run
    spec = pd.read_parquet(work / "results/svd/minilm/spectrum.parquet")
    assert spec["module"].nunique() == 36 and spec["index"].max() == 63
    assert (work / "results/svd/minilm/factors.safetensors").stat().st_size > 0
    tok = pd.read_parquet(work / "results/data/minilm/stsb/train.parquet")
    assert len(tok) == len(pd.read_parquet(glue_dir_of(work) / "stsb/train.parquet"))
    assert tok["input_ids"].map(len).max() <= 48
    sig = pd.read_parquet(work / "results/tables/significance.parquet")
    assert len(sig) > 0
    curves = pd.read_parquet(work / "results/tables/curves.parquet")
    assert {"step", "loss", "lr", "kind"} <= set(curves.columns)


@pytest.mark.e2e
def test_plots_and_summary(workflow_run):
    work, _ = workflow_run
    comp = work / "results/comparison"
    for name in ["glue", *TASKS, "pareto", "cost", "curves", "ranks", "spectrum", "gradnorms"]:
        pdf = comp / f"{name}.pdf"
        assert pdf.read_bytes()[:5] == b"%PDF-", pdf
        assert (comp / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (comp / "summary.md").read_text()
    assert "lora" in summary and "full" in summary and "|" in summary


@pytest.mark.e2e
def test_nothing_left_to_do_and_targeted_rerun(workflow_run):
    work, _ = workflow_run
    out = snakemake(work, "-n", "--cores", "2").stdout
    assert "Nothing to be done" in out
    (work / "results/comparison/pareto.pdf").unlink()
    plan = snakemake(work, "-n", "--cores", "2", "results/comparison/pareto.pdf").stdout
    assert "rule plot:" in plan and "kind=pareto" in plan
    assert "train" not in plan.split("Job stats:")[-1].split("Reasons:")[0]
    snakemake(work, "--cores", "2", "results/comparison/pareto.pdf")
    assert (work / "results/comparison/pareto.pdf").read_bytes()[:5] == b"%PDF-"


@pytest.mark.e2e
def test_dry_run_of_default_config_plans_every_stage(tmp_path):
    (tmp_path / "config.yaml").write_text((ROOT / "config.yaml").read_text())
    proc = subprocess.run([*SNAKEMAKE, "-n", "--cores", "2", "-d", str(tmp_path), "results/comparison/glue.pdf"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rule in ("cache_model", "tokenize", "train", "aggregate", "significance", "plot"):
        assert f"rule {rule}:" in proc.stdout, rule
    assert "kind=glue" in proc.stdout


def glue_dir_of(work: Path) -> Path:
    return Path(yaml.safe_load((work / "config.yaml").read_text())["data"]["glue_dir"])


def test_snakefmt_check_is_clean():
    """The Snakefile and rule files are formatted as snakefmt formats them."""
    proc = subprocess.run([sys.executable, "-m", "snakefmt", "--check", "Snakefile", "workflow/rules"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:] + "\nFix: run `snakefmt Snakefile workflow/rules`"


def test_snakemake_lint_is_clean():
    proc = subprocess.run([*SNAKEMAKE, "--lint"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.mark.e2e
def test_html_report_builds_offline(workflow_run):
    work, _ = workflow_run
    snakemake(work, "--report", "results/report.html")
    html = (work / "results/report.html").read_text(errors="replace")
    assert "<html" in html.lower()
    for name in ("glue.pdf", "pareto.pdf", "summary.md"):
        assert name in html, name
