import json


def train_inputs(w):
    inputs = {
        "train": f"results/data/{w.model}/{w.task}/train.parquet",
        **{s: f"results/data/{w.model}/{w.task}/{s}.parquet" for s in eval_splits(w.task)},
    }
    if get_method(w.method).uses_svd:
        inputs["svd"] = f"results/svd/{w.model}/factors.safetensors"
    return inputs


def train_args(w, input):
    dev = " ".join(f"--dev {s}={input[s]}" for s in eval_splits(w.task))
    svd = f" --svd {input.svd}" if get_method(w.method).uses_svd else ""
    return dev + svd


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
        recipe=lambda w: json.dumps(pbconfig.recipe_for(config, w.task, w.method), sort_keys=True),
        args=train_args,
        out=lambda w, output: os.path.dirname(output.metrics),
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
        " --out {params.out} > {log} 2>&1"
