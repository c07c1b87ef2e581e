# OOD stage: every finished run of a task with `ood.sets.<task>` in the config is scored on those
# sets (peftbench.ood; label spaces mapped by peftbench.vocab.OOD_MAPS, checked when the config is
# validated), then the per-run ood.parquet files are collected into results/tables/ood.parquet.
from peftbench.vocab import OOD_FILE


def ood_sets(task):
    """OOD sets configured for `task` (ood.sets.<task>; empty: no OOD job)."""
    return list(config["ood"]["sets"].get(task, []))


def ood_files():
    """The ood.parquet of every run whose task has OOD sets."""
    return [f"{k.run_dir()}/{OOD_FILE}" for k in run_keys() if ood_sets(k.task)]


def ood_inputs(w):
    """The trained run (adapter, metrics), plus the SVD factors for methods that use them."""
    run = wildcard_key(w).run_dir()
    inputs = {
        "adapter": f"{run}/{RUN_FILES['adapter']}",
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
        key=lambda w: " ".join(wildcard_key(w).cli_args()),
        recipe=train_recipe,
        runtime=train_runtime,
        args=ood_args,
        run=lambda w: wildcard_key(w).run_dir(),
        max_length=lambda w: pbconfig.max_length(config, w.task),
    shell:
        "python -m peftbench evaluate-ood {params.key} --model {params.spec:q} --run-dir {params.run}"
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
