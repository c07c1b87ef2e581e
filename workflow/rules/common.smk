# Shared helpers: the package on PYTHONPATH, config checks, the run grid and input functions.
import json
import os
import shlex
import sys

PACKAGE_DIR = os.path.join(workflow.basedir, "workflow")
# Rules call `python -m peftbench`; the package is used from this checkout, installed or not
# (also inside --sdm conda environments and on cluster nodes that share the file system).
# (braces doubled twice: once for this f-string, once for Snakemake's shell formatting)
shell.prefix(
    f"set -euo pipefail; export PYTHONPATH={shlex.quote(PACKAGE_DIR)}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; "
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


def train_inputs(w):
    """Tokenised train and dev splits, plus the SVD factors for methods that use them."""
    inputs = {
        "train": f"results/data/{w.model}/{w.task}/train.parquet",
        **{s: f"results/data/{w.model}/{w.task}/{s}.parquet" for s in eval_splits(w.task)},
    }
    if get_method(w.method).uses_svd:
        inputs["svd"] = f"results/svd/{w.model}/factors.safetensors"
    return inputs


def train_args(w, input):
    """`--dev SPLIT=PATH` for every dev split, and `--svd` where the method needs it."""
    dev = " ".join(f"--dev {s}={input[s]}" for s in eval_splits(w.task))
    svd = f" --svd {input.svd}" if get_method(w.method).uses_svd else ""
    return dev + svd


def train_recipe(w):
    """The run's resolved training recipe as JSON (a param: changing it reruns the run)."""
    return json.dumps(pbconfig.recipe_for(config, w.task, w.method), sort_keys=True)
