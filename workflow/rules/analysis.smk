# Analysis stage: significance tests, comparison figures and summary.md.
#
# Inputs come from the aggregate rule (results/tables/*.parquet) and the svd rule
# (results/svd/{model}/spectrum.parquet). Every rule calls the package CLI (`python -m peftbench
# ...`, the same as the `peftbench` entry point; the package is put on PYTHONPATH by the shell
# prefix in common.smk; see workflow/peftbench/analysis/cli.py). The statistics settings are
# passed to every rule so that plots, summary and significance.parquet show the same numbers.
#
# Config keys (all optional, under `analysis:`): reference_method (lora), all_pairs (false),
# bootstrap_resamples (10000), confidence (0.95), bootstrap_seed (0), ci_method (BCa),
# value (dev_main: final epoch; best_dev_main: best epoch), glue_avg_exclude ([]).

ANALYSIS_CFG = config.get("analysis", {}) or {}
ANALYSIS_MODELS = config.get("grid", {}).get("models", [])
ANALYSIS_TASKS = sorted(
    {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"}
    | set(config.get("grid", {}).get("tasks", []))
)
ANALYSIS_STATS = (
    f"--resamples {int(ANALYSIS_CFG.get('bootstrap_resamples', 10000))} "
    f"--confidence {float(ANALYSIS_CFG.get('confidence', 0.95))} "
    f"--seed {int(ANALYSIS_CFG.get('bootstrap_seed', 0))} "
    f"--ci-method {ANALYSIS_CFG.get('ci_method', 'BCa')} "
    f"--value {ANALYSIS_CFG.get('value', 'dev_main')}"
    + (
        " --glue-exclude " + " ".join(ANALYSIS_CFG["glue_avg_exclude"])
        if ANALYSIS_CFG.get("glue_avg_exclude")
        else ""
    )
)


rule significance:
    input:
        runs="results/tables/runs.parquet",
    output:
        table="results/tables/significance.parquet",
        stats="results/tables/method_stats.parquet",
    params:
        reference=ANALYSIS_CFG.get("reference_method", "lora"),
        all_pairs="--all-pairs" if ANALYSIS_CFG.get("all_pairs", False) else "",
        stats=ANALYSIS_STATS,
    log:
        "results/logs/significance.log",
    benchmark:
        "results/benchmarks/significance.tsv"
    conda:
        "../../envs/analysis.yaml"
    shell:
        "python -m peftbench significance --runs {input.runs} --out {output.table} "
        "--stats-out {output.stats} --reference {params.reference} {params.all_pairs} "
        "{params.stats} > {log} 2>&1"


rule plot_glue:
    input:
        runs="results/tables/runs.parquet",
        significance="results/tables/significance.parquet",
    output:
        pdf=report(
            "results/comparison/glue.pdf",
            caption="../report/glue.rst",
            category="Comparison",
        ),
        png="results/comparison/glue.png",
    params:
        reference=ANALYSIS_CFG.get("reference_method", "lora"),
        stats=ANALYSIS_STATS,
    log:
        "results/logs/plot_glue.log",
    benchmark:
        "results/benchmarks/plot_glue.tsv"
    conda:
        "../../envs/analysis.yaml"
    shell:
        "python -m peftbench plot glue --runs {input.runs} --significance {input.significance} "
        "--reference {params.reference} --out {output.pdf} {params.stats} > {log} 2>&1"


rule plot_task:
    input:
        runs="results/tables/runs.parquet",
        significance="results/tables/significance.parquet",
    output:
        pdf=report(
            "results/comparison/{task}.pdf",
            caption="../report/task.rst",
            category="Comparison",
            subcategory="Per task",
        ),
        png="results/comparison/{task}.png",
    wildcard_constraints:
        task="|".join(ANALYSIS_TASKS),
    params:
        reference=ANALYSIS_CFG.get("reference_method", "lora"),
        stats=ANALYSIS_STATS,
    log:
        "results/logs/plot_task/{task}.log",
    benchmark:
        "results/benchmarks/plot_task/{task}.tsv"
    conda:
        "../../envs/analysis.yaml"
    shell:
        "python -m peftbench plot task --task {wildcards.task} --runs {input.runs} "
        "--significance {input.significance} --reference {params.reference} "
        "--out {output.pdf} {params.stats} > {log} 2>&1"


rule plot_pareto:
    input:
        runs="results/tables/runs.parquet",
    output:
        pdf=report(
            "results/comparison/pareto.pdf",
            caption="../report/pareto.rst",
            category="Comparison",
        ),
        png="results/comparison/pareto.png",
    params:
        stats=ANALYSIS_STATS,
    log:
        "results/logs/plot_pareto.log",
    benchmark:
        "results/benchmarks/plot_pareto.tsv"
    conda:
        "../../envs/analysis.yaml"
    shell:
        "python -m peftbench plot pareto --runs {input.runs} --out {output.pdf} {params.stats} > {log} 2>&1"


rule plot_cost:
    input:
        runs="results/tables/runs.parquet",
    output:
        pdf=report(
            "results/comparison/cost.pdf",
            caption="../report/cost.rst",
            category="Comparison",
        ),
        png="results/comparison/cost.png",
    log:
        "results/logs/plot_cost.log",
    benchmark:
        "results/benchmarks/plot_cost.tsv"
    conda:
        "../../envs/analysis.yaml"
    shell:
        "python -m peftbench plot cost --runs {input.runs} --out {output.pdf} > {log} 2>&1"


rule plot_curves:
    input:
        curves="results/tables/curves.parquet",
    output:
        pdf=report(
            "results/comparison/curves.pdf",
            caption="../report/curves.rst",
            category="Comparison",
        ),
        png="results/comparison/curves.png",
    params:
        reference=ANALYSIS_CFG.get("reference_method", "lora"),
    log:
        "results/logs/plot_curves.log",
    benchmark:
        "results/benchmarks/plot_curves.tsv"
    conda:
        "../../envs/analysis.yaml"
    shell:
        "python -m peftbench plot curves --curves {input.curves} --reference {params.reference} "
        "--out {output.pdf} > {log} 2>&1"


rule plot_ranks:
    input:
        ranks="results/tables/ranks.parquet",
    output:
        pdf=report(
            "results/comparison/ranks.pdf",
            caption="../report/ranks.rst",
            category="Comparison",
        ),
        png="results/comparison/ranks.png",
    log:
        "results/logs/plot_ranks.log",
    benchmark:
        "results/benchmarks/plot_ranks.tsv"
    conda:
        "../../envs/analysis.yaml"
    shell:
        "python -m peftbench plot ranks --ranks {input.ranks} --out {output.pdf} > {log} 2>&1"


rule plot_spectrum:
    input:
        spectrum=expand("results/svd/{model}/spectrum.parquet", model=ANALYSIS_MODELS),
    output:
        pdf=report(
            "results/comparison/spectrum.pdf",
            caption="../report/spectrum.rst",
            category="Comparison",
        ),
        png="results/comparison/spectrum.png",
    log:
        "results/logs/plot_spectrum.log",
    benchmark:
        "results/benchmarks/plot_spectrum.tsv"
    conda:
        "../../envs/analysis.yaml"
    shell:
        "python -m peftbench plot spectrum --spectrum {input.spectrum} --out {output.pdf} > {log} 2>&1"


rule plot_gradnorms:
    input:
        gradnorms="results/tables/gradnorms.parquet",
    output:
        pdf=report(
            "results/comparison/gradnorms.pdf",
            caption="../report/gradnorms.rst",
            category="Comparison",
        ),
        png="results/comparison/gradnorms.png",
    log:
        "results/logs/plot_gradnorms.log",
    benchmark:
        "results/benchmarks/plot_gradnorms.tsv"
    conda:
        "../../envs/analysis.yaml"
    shell:
        "python -m peftbench plot gradnorms --gradnorms {input.gradnorms} --out {output.pdf} > {log} 2>&1"


rule summary:
    input:
        runs="results/tables/runs.parquet",
        significance="results/tables/significance.parquet",
    output:
        md=report(
            "results/comparison/summary.md",
            caption="../report/summary.rst",
            category="Comparison",
        ),
    params:
        reference=ANALYSIS_CFG.get("reference_method", "lora"),
        stats=ANALYSIS_STATS,
    log:
        "results/logs/summary.log",
    benchmark:
        "results/benchmarks/summary.tsv"
    conda:
        "../../envs/analysis.yaml"
    shell:
        "python -m peftbench summary --runs {input.runs} --significance {input.significance} "
        "--reference {params.reference} --out {output.md} {params.stats} > {log} 2>&1"
