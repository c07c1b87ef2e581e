"""The SLURM profile on a real scheduler: the one-node test cluster of .ci/slurm-setup.sh.

Runs the tiny workflow (tiny random BERT, STS-B, lora + full, one seed, 32 examples) through
`snakemake --workflow-profile workflow/profiles/slurm` and checks, from the scheduler's own records,
that the GPU rules (train, svd) were submitted with a GPU request (`--gpus=1`), that SLURM
allocated them the node's GPU, that the CPU rules were not, that the per-rule partition, CPUs,
memory and time limit of the profile arrived, and that the outputs are complete.

Without a cluster the test skips, unless the environment variable CI is set (CI=true): then it
fails, so that CI cannot pass without having run it. Start the cluster (root) with
`bash .ci/slurm-setup.sh start`, stop it with `bash .ci/slurm-setup.sh stop`.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.snakemake
PROFILE = ROOT / "workflow" / "profiles" / "slurm"
CLUSTER_NAME = "peftbench-ci"  # .ci/slurm-setup.sh
PROLOG_LOG = Path("/var/log/slurm/prolog.log")
JOBCOMP_LOG = Path("/var/log/slurm/jobcomp.log")
TARGETS = ["results/tables/runs.parquet", "results/svd/tiny/factors.safetensors"]
GPU_RULES = {"train", "svd"}
SETUP_HINT = "start it (as root) with `bash .ci/slurm-setup.sh start`; stop it with `bash .ci/slurm-setup.sh stop`"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _cmd(*args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _cluster_problem() -> str | None:
    """Why the test cluster cannot be used, or None when it can."""
    for tool in ("sbatch", "squeue", "sinfo", "scontrol"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (SLURM client tools are not installed)"
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "snakemake-executor-plugin-slurm is not installed (pip install -e '.[workflow]')"
    conf = _cmd("scontrol", "show", "config")
    if conf is None or conf.returncode != 0:
        return "slurmctld does not answer (`scontrol show config` failed)"
    m = re.search(r"^ClusterName\s*=\s*(\S+)", conf.stdout, re.M)
    if not m or m.group(1) != CLUSTER_NAME:
        return f"this SLURM cluster is not the test cluster {CLUSTER_NAME!r} of .ci/slurm-setup.sh"
    nodes = _cmd("sinfo", "-h", "-p", "gpu", "-o", "%t %G")
    if nodes is None or not re.search(r"^(idle|mix|alloc)\S*\s+gpu:", nodes.stdout, re.M):
        return "no usable node with a GPU in partition `gpu` (slurmd down?)"
    return None


@pytest.fixture(scope="module")
def cluster():
    problem = _cluster_problem()
    if problem is not None:
        msg = f"SLURM test cluster unavailable: {problem}; {SETUP_HINT}"
        if _in_ci():
            pytest.fail(f"{msg} (CI is set, so this is an error, not a skip)")
        pytest.skip(msg)


def _job_records(workdir: Path) -> list[dict]:
    """`scontrol show job -o` records (finished jobs stay MinJobAge=600 s) of jobs run in workdir."""
    out = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True, timeout=30, check=True)
    jobs = []
    for line in out.stdout.splitlines():
        rec = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if rec.get("WorkDir") == str(workdir):
            jobs.append(rec)
    return jobs


def _rule(rec: dict) -> str:
    """The rule of a job, from the comment the plugin sets (rule_<name>[_wildcards_...])."""
    m = re.match(r"rule_(.+?)(_wildcards_.*)?$", rec.get("Comment", ""))
    assert m, f"job {rec.get('JobId')} has no Snakemake comment: {rec.get('Comment')}"
    return m.group(1)


def _prolog_gpus() -> dict[str, str]:
    """JobId -> GPU indices that slurmd handed the job (SLURM_JOB_GPUS; 'none' for CPU jobs)."""
    if not PROLOG_LOG.is_file():
        return {}
    found = {}
    for line in PROLOG_LOG.read_text().splitlines():
        m = re.match(r"JobId=(\d+) JobGpus=(\S+)", line)
        if m:
            found[m.group(1)] = m.group(2)
    return found


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory, tiny_model_dir, glue_dir):
    work = tmp_path_factory.mktemp("slurm")
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["models"] = {"tiny": str(tiny_model_dir)}
    cfg["data"].update(glue_dir=str(glue_dir), max_train_samples=32, max_eval_samples=32)
    cfg["grid"].update(models=["tiny"], tasks=["stsb"], methods=["lora", "full"], budgets=[2.0], seeds=[1])
    cfg["training"]["defaults"].update(epochs=1, batch_size=16, max_length=32, log_every=1)
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(work),
           "--configfile", str(work / "config.yaml"), "--workflow-profile", str(PROFILE),
           # poll soon after submission (the plugin's default first poll is after 40 s)
           "--slurm-init-seconds-before-status-checks", "2", "--verbose", *TARGETS]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=work)
    seconds = time.monotonic() - t0
    print(f"slurm workflow run: {seconds:.0f} s")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"snakemake on SLURM failed:\n{log[-8000:]}"
    return work, log, _job_records(work)


def test_outputs_complete(slurm_run):
    work, _, _ = slurm_run
    runs = pd.read_parquet(work / "results/tables/runs.parquet")
    assert len(runs) == 2 and set(runs["method"]) == {"lora", "full"}
    assert set(runs["status"]) == {"ok"}
    assert runs["dev_pearson"].between(-1, 1).all()
    for method, budget in (("lora", "2"), ("full", "100")):
        d = work / f"results/runs/tiny/stsb/{method}/b{budget}/s1"
        for f in ("metrics.parquet", "curve.parquet", "adapter.safetensors", "ranks.parquet", "gradnorms.parquet"):
            assert (d / f).stat().st_size > 0, d / f
    assert (work / "results/svd/tiny/factors.safetensors").stat().st_size > 0


def test_every_job_went_through_slurm(slurm_run):
    _, log, jobs = slurm_run
    rules = sorted(_rule(j) for j in jobs)
    assert rules == ["aggregate", "cache_model", "svd", "tokenize", "tokenize", "train", "train"], rules
    assert all(j["JobState"] == "COMPLETED" and j["ExitCode"] == "0:0" for j in jobs), jobs
    # the persistent job-completion log of slurmctld has them too
    comp = JOBCOMP_LOG.read_text() if JOBCOMP_LOG.is_file() else ""
    for j in jobs:
        assert re.search(rf"^JobId={j['JobId']} .*JobState=COMPLETED .*WorkDir={re.escape(j['WorkDir'])} ", comp, re.M)
    assert log.count("has been submitted with SLURM jobid") == len(jobs)


def test_gpu_rules_request_and_get_a_gpu(slurm_run):
    _, log, jobs = slurm_run
    gpus = _prolog_gpus()
    for j in jobs:
        rule = _rule(j)
        requested = re.fullmatch(r"gres[:/]gpu:1", j.get("TresPerJob", ""))
        if rule in GPU_RULES:
            # what sbatch asked for, as slurmctld recorded it (--gpus=1 -> TresPerJob=gres:gpu:1)
            assert requested, f"{rule} job {j['JobId']} was submitted without a GPU: {j}"
            assert j["Partition"] == "gpu", j
            # what slurmd allocated: the node's one GPU (index 0), seen by the node prolog
            assert gpus.get(j["JobId"]) == "0", f"{rule} job {j['JobId']} got no GPU: {gpus}"
        else:
            assert not requested and gpus.get(j["JobId"]) == "none", f"{rule} job {j['JobId']} holds a GPU: {j}"
            assert j["Partition"] == "cpu", j  # the cluster's default partition
    # the submission itself (sbatch call in Snakemake's log)
    train_calls = [ln for ln in log.splitlines() if "sbatch call:" in ln and "--comment rule_train_" in ln]
    assert len(train_calls) == 2 and all(" --gpus=1 " in ln for ln in train_calls), train_calls


def test_one_gpu_serialises_train_jobs(slurm_run):
    """The node has CPUs and memory for both train jobs at once; only its single GPU keeps them apart."""
    _, _, jobs = slurm_run
    train = sorted((j for j in jobs if _rule(j) == "train"), key=lambda j: j["StartTime"])
    first_end, second_start = (datetime.fromisoformat(train[0]["EndTime"]),
                               datetime.fromisoformat(train[1]["StartTime"]))
    assert second_start >= first_end, [(j["JobId"], j["StartTime"], j["EndTime"]) for j in train]


def test_profile_resources_reach_sbatch(slurm_run):
    profile = yaml.safe_load((PROFILE / "config.v8+.yaml").read_text())
    _, _, jobs = slurm_run
    for j in jobs:
        rule = _rule(j)
        res = {**profile["default-resources"], **profile.get("set-resources", {}).get(rule, {})}
        assert j["NumCPUs"] == str(res["cpus_per_task"]), (rule, j["NumCPUs"])
        assert j["MinMemoryNode"] == f"{res['mem_mb']}M", (rule, j["MinMemoryNode"])
        h, m = divmod(int(res["runtime"]), 60)
        assert j["TimeLimit"] in (f"{h:02d}:{m:02d}:00", f"{h}:{m:02d}:00"), (rule, j["TimeLimit"])
