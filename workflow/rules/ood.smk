# OOD stage: every finished run of a task with `ood.sets.<task>` in the config is scored on those
# sets (peftbench.ood; label spaces mapped by peftbench.vocab.OOD_MAPS, checked when the config is
# validated), then the per-run ood.parquet files are collected into results/tables/ood.parquet.


rule evaluate_ood:
    """Score one trained run on the OOD sets of its task."""
    input:
        unpack(ood_inputs),
    output:
        f"{RUN_DIR}/{OOD_FILE}",
    log:
        f"results/logs/ood/{RUN_PATTERN}.log",
    benchmark:
        f"results/benchmarks/ood/{RUN_PATTERN}.tsv"
    conda:
        "../../envs/train.yaml"
    threads: 2
    resources:
        gpu=1,
    params:
        spec=model_spec,
        cache=lambda w: model_cache_dir(w.model),
        key=lambda w: " ".join(wildcard_key(w).cli_args()),
        recipe=train_recipe,
        runtime=train_runtime,
        args=ood_args,
        run=lambda w: wildcard_key(w).run_dir(),
        max_length=lambda w: pbconfig.max_length(config, w.task),
    shell:
        "python -m peftbench evaluate-ood {params.key} --model {params.spec:q} --model-cache {params.cache} --run-dir {params.run}"
        " --dev {input.dev} --max-length {params.max_length} {params.args}"
        " --recipe {params.recipe:q} --runtime {params.runtime:q} --out {output} > {log} 2>&1"


rule aggregate_ood:
    """results/tables/ood.parquet: every run's OOD accuracies."""
    input:
        ood_files(),
    output:
        table_path("ood"),
    log:
        "results/logs/aggregate_ood.log",
    benchmark:
        "results/benchmarks/aggregate_ood.tsv"
    conda:
        "../../envs/analysis.yaml"
    shell:
        "python -m peftbench aggregate-ood --out {output} {input} > {log} 2>&1"
