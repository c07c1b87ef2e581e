rule train:
    """Train one (model, task, method, budget, seed) in the one training loop."""
    input:
        unpack(train_inputs),
    output:
        metrics="results/runs/{model}/{task}/{method}/b{budget}/s{seed}/metrics.parquet",
        curve="results/runs/{model}/{task}/{method}/b{budget}/s{seed}/curve.parquet",
        adapter="results/runs/{model}/{task}/{method}/b{budget}/s{seed}/adapter.safetensors",
        ranks="results/runs/{model}/{task}/{method}/b{budget}/s{seed}/ranks.parquet",
        gradnorms="results/runs/{model}/{task}/{method}/b{budget}/s{seed}/gradnorms.parquet",
    params:
        spec=model_spec,
        recipe=train_recipe,
        args=train_args,
        out=lambda w, output: os.path.dirname(output.metrics),
        # Outside the outputs: Snakemake deletes a failed job's outputs, never this directory.
        checkpoints="results/checkpoints/{model}/{task}/{method}/b{budget}/s{seed}",
    log:
        "results/logs/train/{model}/{task}/{method}/b{budget}/s{seed}.log",
    benchmark:
        "results/benchmarks/train/{model}/{task}/{method}/b{budget}/s{seed}.tsv"
    threads: 2
    resources:
        gpu=1,
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m peftbench train --model-name {wildcards.model} --model {params.spec:q}"
        " --task {wildcards.task} --method {wildcards.method} --budget {wildcards.budget}"
        " --seed {wildcards.seed} --train {input.train} {params.args} --recipe {params.recipe:q}"
        " --checkpoint-dir {params.checkpoints} --out {params.out} > {log} 2>&1"
