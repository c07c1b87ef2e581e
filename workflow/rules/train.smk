rule train:
    """Train one (model, task, method, budget, seed) in the one training loop."""
    input:
        unpack(train_inputs),
    output:
        **{name: f"{RUN_DIR}/{fname}" for name, fname in RUN_FILES.items()},
    log:
        f"results/logs/train/{RUN_PATTERN}.log",
    benchmark:
        f"results/benchmarks/train/{RUN_PATTERN}.tsv"
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
        args=train_args,
        out=lambda w: wildcard_key(w).run_dir(),
        # Outside the outputs: Snakemake deletes a failed job's outputs, never this directory.
        checkpoints=lambda w: wildcard_key(w).checkpoint_dir(),
    shell:
        "python -m peftbench train {params.key} --model {params.spec:q} --model-cache {params.cache} --train {input.train} {params.args}"
        " --recipe {params.recipe:q} --runtime {params.runtime:q}"
        " --checkpoint-dir {params.checkpoints} --out {params.out} > {log} 2>&1"
