rule svd:
    """Top-k SVD of every target matrix (attention q/k/v/output, feed-forward in/out)."""
    input:
        model=lambda w: model_cache_file(w.model),
    output:
        factors="results/svd/{model}/factors.safetensors",
        spectrum="results/svd/{model}/spectrum.parquet",
    log:
        "results/logs/svd/{model}.log",
    benchmark:
        "results/benchmarks/svd/{model}.tsv"
    conda:
        "../../envs/train.yaml"
    resources:
        gpu=1,
    params:
        spec=model_spec,
        top_k=config["svd"]["top_k"],
        cache=lambda w: model_cache_dir(w.model),
    shell:
        "python -m peftbench svd --model-name {wildcards.model} --model {params.spec:q} --model-cache {params.cache}"
        " --top-k {params.top_k} --factors {output.factors} --spectrum {output.spectrum} > {log} 2>&1"
