# Tuning stage (issue 13; peftbench.tuning): one Optuna study per (model, task, method, budget)
# before the final runs, only with tuning.enabled: true (otherwise no job of this rule is planned
# and the train rule reads no best.yaml). Trials train on the training split minus
# tuning.holdout_fraction of it and are scored on that held-out part; the GLUE dev set is never read.
#
# The journal (journal.log) is not an output: Snakemake deletes a failed job's outputs, never it,
# so a killed job, or one that stopped after tuning.trials_per_job trials (it exits non-zero, saying
# so), resumes from it when run again (--retries N runs the rest in one invocation).
# Its input functions live in common.smk.
# Tracked params: the base recipe, the search space and the settings that change a result, so
# editing a method's space reruns exactly that method's studies and, through best.yaml, its runs.


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
        cache=lambda w: model_cache_dir(w.model),
        recipe=train_recipe,
        runtime=train_runtime,
        space=lambda w: space_json(space_for(config, w.method)),
        settings=tune_settings,
        args=tune_args,
        out=lambda w: TUNE_DIR.format(**tune_wildcards(w)),
    shell:
        "python -m peftbench tune --model-name {wildcards.model} --model {params.spec:q}"
        " --model-cache {params.cache} --task {wildcards.task} --method {wildcards.method} --budget {wildcards.budget}"
        " --train {input.train}{params.args} --recipe {params.recipe:q} --runtime {params.runtime:q}"
        " --space {params.space:q} --settings {params.settings:q}"
        " --storage {params.out}/journal.log --out {params.out} > {log} 2>&1"
