# Model cache (issue 17; peftbench.modelcache): each models: key is resolved once per DAG into
# results/models/{model}/ (peftbench.vocab.MODEL_CACHE_DIR), a save_pretrained folder with
# safetensors weights (a GGUF model's dequantised fp32, copied files otherwise) and the tokenizer.
# Every rule that loads the model (svd, tokenize, tune, train, evaluate_ood, evaluate_generator)
# reads it with --model-cache and still records the spec (--model) in its outputs. Its input
# functions live in common.smk.


rule cache_model:
    """Resolve (and for GGUF dequantise) one model spec into a local save_pretrained folder."""
    output:
        os.path.join(MODEL_CACHE_DIR, MODEL_CACHE_MANIFEST),
    log:
        "results/logs/cache_model/{model}.log",
    benchmark:
        "results/benchmarks/cache_model/{model}.tsv"
    conda:
        "../../envs/train.yaml"
    params:
        spec=model_spec,
        out=lambda w: MODEL_CACHE_DIR.format(model=w.model),
    shell:
        "python -m peftbench cache-model --model {params.spec:q} --out {params.out} > {log} 2>&1"
