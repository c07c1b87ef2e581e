rule tokenize:
    """Tokenise one GLUE split with the model's fast tokenizer (cached for every method and seed)."""
    input:
        model=lambda w: model_cache_file(w.model),
    output:
        "results/data/{model}/{task}/{split}.parquet",
    log:
        "results/logs/tokenize/{model}/{task}/{split}.log",
    benchmark:
        "results/benchmarks/tokenize/{model}/{task}/{split}.tsv"
    conda:
        "../../envs/train.yaml"
    params:
        spec=model_spec,
        max_length=lambda w: pbconfig.max_length(config, w.task),
        glue=glue_dir_arg(),
        cache=lambda w: model_cache_dir(w.model),
    shell:
        "python -m peftbench tokenize --model {params.spec:q} --model-cache {params.cache} --task {wildcards.task} --split {wildcards.split}"
        " --max-length {params.max_length} {params.glue} --out {output} > {log} 2>&1"
