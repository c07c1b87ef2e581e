# Shared helpers: the package on PYTHONPATH, the config check, the run grid and input functions.
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
from peftbench.budget import TOKEN_REGEX
from peftbench.methods import method_info
from peftbench.runkey import RUN_PATTERN, RunKey
from peftbench.analysis.cli import table_path
from peftbench.tuning import Settings, space_for, space_json
from peftbench.vocab import (
    GENERATOR_DATA_FILES,
    GENERATOR_DIR,
    GENERATOR_PLOTS,
    GENERATOR_SPLIT_FILES,
    GENERATOR_SUMMARY,
    MODEL_CACHE_DIR,
    MODEL_CACHE_MANIFEST,
    OOD_FILE,
    OOD_PLOTS,
    RUN_FILES,
    TABLE_SOURCES,
    TUNING_PLOTS,
    get_task,
)

# Snakemake 9 hands nested --config values over as strings; coerce them, validate against the
# schema (the only place defaults live), check what a schema cannot (methods, tasks, options).
try:
    config.update(pbconfig.validate(config))
except pbconfig.ConfigError as exc:
    raise WorkflowError(f"invalid configuration: {exc}")

GRID = config["grid"]
RUN_DIR = RunKey.wildcard_dir()
TUNING = config["tuning"]
# one Optuna study per (model, task, method, budget): rules/tune.smk, peftbench.tuning
TUNE_DIR = "results/tuning/{model}/{task}/{method}/b{budget}"


wildcard_constraints:
    model="[^/]+",
    task="[a-z0-9_]+",
    method="[a-z0-9_]+",
    budget=TOKEN_REGEX,
    seed="[0-9]+",
    split="[a-z0-9_]+",


class Untracked:
    """A rule param Snakemake's params rerun trigger does not track.

    Snakemake records only params of builtin types (persistence._serialize_param: other objects
    are UNREPRESENTABLE and left out), so a param wrapped in this class is formatted into the
    command (str) but a change of it marks no finished job outdated. Used for the speed-only
    knobs (peftbench.recipe.Runtime); tests/test_workflow_rerun.py checks the behaviour.
    """

    def __init__(self, text):
        self.text = text

    def __str__(self):
        return self.text


def run_keys():
    """Every run of the grid (budget-free methods once, under the full budget)."""
    return [
        RunKey.of(m, t, meth, b, s)
        for m in GRID["models"]
        for t in GRID["tasks"]
        for meth in GRID["methods"]
        for b in ([0] if method_info(meth).budget_free else GRID["budgets"])
        for s in GRID["seeds"]
    ]


def run_dirs():
    """Every run directory of the grid."""
    return [k.run_dir() for k in run_keys()]


def model_spec(wildcards):
    return config["models"][wildcards.model]


# -- model cache (rules/models.smk) ------------------------------------------------------


def model_cache_file(model):
    """The cache manifest of a models: key (rule cache_model), an input of every job that loads
    the model. ancient: the cache is a function of the spec, which each job tracks as its own
    `spec` param, so a cache rebuilt on its own (same spec, bit-identical loads) marks no finished
    job outdated (one rebuilt in the same invocation still reruns its consumers: Snakemake's
    "Input files updated by another job")."""
    return ancient(
        os.path.join(MODEL_CACHE_DIR.format(model=model), MODEL_CACHE_MANIFEST)
    )


def model_cache_dir(model):
    """`--model-cache` of a job: the cache folder of a models: key, untracked (the spec is tracked)."""
    return Untracked(MODEL_CACHE_DIR.format(model=model))


def eval_splits(task):
    return list(get_task(task).eval_splits)


def glue_dir_arg():
    d = config["data"]["glue_dir"]
    return f"--glue-dir {shlex.quote(d)}" if d else ""


def train_inputs(w):
    """The model cache, tokenised train and dev splits, plus the SVD factors for methods that use them."""
    inputs = {
        "model": model_cache_file(w.model),
        "train": f"results/data/{w.model}/{w.task}/train.parquet",
        **{
            s: f"results/data/{w.model}/{w.task}/{s}.parquet"
            for s in eval_splits(w.task)
        },
    }
    if method_info(w.method).uses_svd:
        inputs["svd"] = f"results/svd/{w.model}/factors.safetensors"
    if TUNING["enabled"]:
        inputs["tuned"] = os.path.join(
            TUNE_DIR.format(**tune_wildcards(w)), "best.yaml"
        )
    return inputs


def tune_wildcards(w):
    """The tuning study of a train job: its (model, task, method, budget), every seed alike."""
    return {"model": w.model, "task": w.task, "method": w.method, "budget": w.budget}


def train_args(w, input):
    """`--dev SPLIT=PATH` for every dev split, `--svd` where the method needs it, `--tuned
    best.yaml` when tuning is enabled (lr and options from the study; an input, so a new best.yaml
    reruns the run), and for a
    percentage budget `--budget-denominator` (a tracked param: changing grid.budget_denominator
    reruns exactly the percentage-budget runs; r<N> and full budgets do not depend on it).
    """
    dev = " ".join(f"--dev {s}={input[s]}" for s in eval_splits(w.task))
    svd = f" --svd {input.svd}" if method_info(w.method).uses_svd else ""
    den = (
        f" --budget-denominator {GRID['budget_denominator']}"
        if wildcard_key(w).budget.is_pct
        else ""
    )
    tuned = f" --tuned {input.tuned}" if TUNING["enabled"] else ""
    return dev + svd + den + tuned


def wildcard_key(w):
    """The RunKey of a train job's wildcards."""
    return RunKey.of(w.model, w.task, w.method, w.budget, w.seed)


def train_recipe(w):
    """The run's tracked training recipe as JSON (a param: changing it reruns the run)."""
    return pbconfig.recipe_for(config, w.task, w.method).to_json()


def train_runtime(w):
    """The run's speed-only knobs as JSON, untracked (changing them reruns nothing)."""
    return Untracked(pbconfig.runtime_for(config, w.task, w.method).to_json())


# -- tuning stage (rules/tune.smk) --------------------------------------------------------


def tune_settings(w):
    """Tracked tuning settings as JSON (trials_per_job is untracked: it only splits the work)."""
    s = Settings.from_dict(TUNING)
    return json.dumps(
        {k: v for k, v in json.loads(s.to_json()).items() if k != "trials_per_job"},
        sort_keys=True,
    )


def tune_inputs(w):
    """The model cache, the tokenised training split (the held-out rows are carved from it), plus the SVD factors."""
    inputs = {
        "model": model_cache_file(w.model),
        "train": f"results/data/{w.model}/{w.task}/train.parquet",
    }
    if method_info(w.method).uses_svd:
        inputs["svd"] = f"results/svd/{w.model}/factors.safetensors"
    return inputs


def tune_args(w, input):
    svd = f" --svd {input.svd}" if method_info(w.method).uses_svd else ""
    den = (
        f" --budget-denominator {GRID['budget_denominator']}"
        if RunKey.of(w.model, w.task, w.method, w.budget, 0).budget.is_pct
        else ""
    )
    per_job = TUNING["trials_per_job"]
    return svd + den + (f" --trials-per-job {per_job}" if per_job else "")


def study_dirs():
    """Every tuning study of the grid (none when tuning is off)."""
    if not TUNING["enabled"]:
        return []
    return sorted(
        {
            TUNE_DIR.format(
                model=k.model, task=k.task, method=k.method, budget=k.budget_token
            )
            for k in run_keys()
        }
    )


# -- OOD stage (rules/ood.smk) --------------------------------------------------------------


def ood_sets(task):
    """OOD sets configured for `task` (ood.sets.<task>; empty: no OOD job)."""
    return list(config["ood"]["sets"].get(task, []))


def ood_files():
    """The ood.parquet of every run whose task has OOD sets."""
    return [f"{k.run_dir()}/{OOD_FILE}" for k in run_keys() if ood_sets(k.task)]


def ood_inputs(w):
    """The model cache, the trained run (adapter, method state, metrics), plus the SVD factors for methods that use them."""
    run = wildcard_key(w).run_dir()
    inputs = {
        "model": model_cache_file(w.model),
        "adapter": f"{run}/{RUN_FILES['adapter']}",
        "method_state": f"{run}/{RUN_FILES['method_state']}",
        "metrics": f"{run}/{RUN_FILES['metrics']}",
        # the main dev split: the stage re-scores it to check the reloaded model is the trained one
        "dev": f"results/data/{w.model}/{w.task}/{eval_splits(w.task)[0]}.parquet",
    }
    if method_info(w.method).uses_svd:
        inputs["svd"] = f"results/svd/{w.model}/factors.safetensors"
    return inputs


def ood_args(w, input):
    """`--sets`, `--anli-dir`, `--svd` and `--budget-denominator` of one OOD job."""
    anli = config["data"]["anli_dir"]
    args = "--sets " + " ".join(ood_sets(w.task))
    args += f" --anli-dir {shlex.quote(anli)}" if anli else ""
    args += f" --svd {input.svd}" if method_info(w.method).uses_svd else ""
    if wildcard_key(w).budget.is_pct:
        args += f" --budget-denominator {GRID['budget_denominator']}"
    return args


# -- parameter generator, seed 004 (rules/generator.smk) ---------------------------------------


GENERATOR_LOGS = os.path.join("results/logs/generator", config["generator"]["name"])
GENERATOR_BENCHMARKS = os.path.join(
    "results/benchmarks/generator", config["generator"]["name"]
)


def generator_settings():
    """The resolved generator: section (peftbench.generator.settings.resolve; checked at planning)."""
    from peftbench.generator.settings import resolve

    if not config["generator"]["enabled"]:
        raise WorkflowError(
            "a generator target was requested but generator.enabled is false; set generator: {enabled: true} "
            "(see workflow/configs/generator.yaml)"
        )
    return resolve(config)


def generator_dir():
    """results/generator/{name} of the configured generator."""
    return GENERATOR_DIR.format(name=config["generator"]["name"])


def generator_runs():
    """The run directories whose snapshots the generator collects."""
    s = generator_settings()
    return [
        RunKey.of(s.model, t, s.method, s.budget, seed).run_dir()
        for t in s.tasks
        for seed in s.seeds
    ]


def generator_run_files(name):
    """One run file (a key of RUN_FILES) of every collected run."""
    return [os.path.join(d, RUN_FILES[name]) for d in generator_runs()]


def generator_data_files():
    """The dataset files (rule tokenize_params)."""
    return {
        k: os.path.join(generator_dir(), "data", f)
        for k, f in GENERATOR_DATA_FILES.items()
    }


def generator_eval_inputs(w):
    """A split's evaluation inputs: dataset, backbone cache, generator, the runs' adapters and metrics, dev splits."""
    s = generator_settings()
    return {
        **generator_data_files(),
        "model": model_cache_file(s.model),
        "generator": os.path.join(
            generator_dir(), w.split, GENERATOR_SPLIT_FILES["weights"]
        ),
        "adapters": generator_run_files("adapter"),
        "metrics": generator_run_files("metrics"),
        "dev": [
            f"results/data/{s.model}/{t}/{sp}.parquet"
            for t in s.tasks
            for sp in eval_splits(t)
        ],
    }


def generator_eval_args(w):
    """--model, --dev-dir, --recipes (tracked: each task's training recipe) and the denominator."""
    s = generator_settings()
    recipes = {
        t: json.loads(pbconfig.recipe_for(config, t, s.method).to_json())
        for t in s.tasks
    }
    args = f"--model {shlex.quote(config['models'][s.model])} --dev-dir results/data/{s.model}"
    args += f" --recipes {shlex.quote(json.dumps(recipes, sort_keys=True))}"
    if RunKey.of(s.model, s.tasks[0], s.method, s.budget, 0).budget.is_pct:
        args += f" --budget-denominator {GRID['budget_denominator']}"
    return args


def generator_split_files(name):
    """One file (a key of GENERATOR_SPLIT_FILES) of every split."""
    return [
        os.path.join(generator_dir(), sp, GENERATOR_SPLIT_FILES[name])
        for sp in generator_settings().splits()
    ]


def generator_targets():
    """The generator's summary and figures (none when generator.enabled is false)."""
    if not config["generator"]["enabled"]:
        return []
    return [os.path.join(generator_dir(), GENERATOR_SUMMARY["markdown"])] + [
        os.path.join(generator_dir(), f"{k}.pdf") for k in GENERATOR_PLOTS
    ]
