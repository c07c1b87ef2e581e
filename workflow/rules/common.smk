# Shared helpers: the package on PYTHONPATH, config checks, the run grid and input functions.
import os
import sys

PACKAGE_DIR = os.path.join(workflow.basedir, "workflow")
# Rules call `python -m peftbench`; the package is used from this checkout, installed or not.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (PACKAGE_DIR, os.environ.get("PYTHONPATH")) if p
)
sys.path.insert(0, PACKAGE_DIR)

import peftbench.config as pbconfig
from peftbench.methods import get_method
from peftbench.tasks import get_task

# Schema validation (Snakefile) filled defaults; now the checks a schema cannot express.
try:
    pbconfig.check(config)
except pbconfig.ConfigError as exc:
    raise WorkflowError(f"invalid configuration: {exc}")

GRID = config["grid"]


wildcard_constraints:
    model="[^/]+",
    task="[a-z0-9]+",
    method="[a-z0-9_]+",
    budget="[0-9]+(\.[0-9]+)?",
    seed="[0-9]+",
    split="[a-z0-9_]+",


def fmt_budget(b):
    """Budget as written in paths: 0.5 -> '0.5', 1.0 -> '1', full fine-tuning -> '100'."""
    return f"{float(b):g}"


def method_budgets(method):
    """Budgets a method runs at: budget-free methods (full) once, under 100."""
    return ["100"] if get_method(method).budget_free else [fmt_budget(b) for b in GRID["budgets"]]


def run_dirs():
    """Every run directory of the grid."""
    return [
        f"results/runs/{m}/{t}/{meth}/b{b}/s{s}"
        for m in GRID["models"]
        for t in GRID["tasks"]
        for meth in GRID["methods"]
        for b in method_budgets(meth)
        for s in GRID["seeds"]
    ]


def model_spec(wildcards):
    return config["models"][wildcards.model]


def eval_splits(task):
    return list(get_task(task).eval_splits)


def glue_dir_arg():
    d = config["data"].get("glue_dir")
    return f"--glue-dir {d}" if d else ""
