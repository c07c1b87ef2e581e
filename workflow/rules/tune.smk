# Tuning stage (issue 13; peftbench.tuning): one Optuna study per (model, task, method, budget)
# before the final runs, only with tuning.enabled: true (otherwise no job of this rule is planned
# and the train rule reads no best.yaml). Trials train on the training split minus
# tuning.holdout_fraction of it and are scored on that held-out part; the GLUE dev set is never read.
#
# The journal (journal.log) is not an output: Snakemake deletes a failed job's outputs, never it,
# so a killed job, or one that stopped after tuning.trials_per_job trials (it exits non-zero, saying
# so), resumes from it when run again (--retries N runs the rest in one invocation).
# Tracked params: the base recipe, the search space and the settings that change a result, so
# editing a method's space reruns exactly that method's studies and, through best.yaml, its runs.
import json

from peftbench.tuning import Settings, space_for, space_json


def tune_settings(w):
    """Tracked tuning settings as JSON (trials_per_job is untracked: it only splits the work)."""
    s = Settings.from_dict(TUNING)
    return json.dumps(
        {k: v for k, v in json.loads(s.to_json()).items() if k != "trials_per_job"},
        sort_keys=True,
    )


def tune_inputs(w):
    """The tokenised training split (the held-out rows are carved from it), plus the SVD factors."""
    inputs = {"train": f"results/data/{w.model}/{w.task}/train.parquet"}
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


rule tuning_table:
    """Every trial of every study in one table (results/tables/trials.parquet; empty when tuning is off)."""
    input:
        [f"{d}/trials.parquet" for d in study_dirs()],
    output:
        table_path("trials"),
    log:
        "results/logs/tuning_table.log",
    conda:
        "../../envs/analysis.yaml"
    params:
        dirs=study_dirs(),
    shell:
        "python -m peftbench tuning-table --out {output} {params.dirs} > {log} 2>&1"


rule tune:
    """Tune lr and the method's options on a held-out part of the training split (Optuna)."""
    input:
        unpack(tune_inputs),
    output:
        best=f"{TUNE_DIR}/best.yaml",
        trials=f"{TUNE_DIR}/trials.parquet",
    log:
        "results/logs/tune/{model}/{task}/{method}/b{budget}.log",
    benchmark:
        "results/benchmarks/tune/{model}/{task}/{method}/b{budget}.tsv"
    conda:
        "../../envs/train.yaml"
    threads: 2
    resources:
        gpu=1,
    params:
        spec=model_spec,
        recipe=train_recipe,
        runtime=train_runtime,
        space=lambda w: space_json(space_for(config, w.method)),
        settings=tune_settings,
        args=tune_args,
        out=lambda w: TUNE_DIR.format(**tune_wildcards(w)),
    shell:
        "python -m peftbench tune --model-name {wildcards.model} --model {params.spec:q}"
        " --task {wildcards.task} --method {wildcards.method} --budget {wildcards.budget}"
        " --train {input.train}{params.args} --recipe {params.recipe:q} --runtime {params.runtime:q}"
        " --space {params.space:q} --settings {params.settings:q}"
        " --storage {params.out}/journal.log --out {params.out} > {log} 2>&1"
