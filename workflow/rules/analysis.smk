# Analysis stage: significance tests, comparison figures, summary.md and explorer.html.
#
# Inputs come from the aggregate rule (results/tables/*.parquet) and the svd rule
# (results/svd/{model}/spectrum.parquet). Every rule calls the package CLI (`python -m peftbench
# ...`, the same as the `peftbench` entry point; the package is put on PYTHONPATH by the shell
# prefix in common.smk; see workflow/peftbench/analysis/cli.py). The statistics settings are
# passed to every rule so that plots, summary and significance.parquet show the same numbers.
#
# Config keys under `analysis:` (reference_method, all_pairs, bootstrap_resamples, confidence,
# bootstrap_seed, ci_method, value, glue_avg_exclude): their defaults live in the schema
# (workflow/schemas/config.schema.yaml), which filled them in when the Snakefile validated the
# config, so they are read here without fallbacks.
#
# One `plot` rule draws every figure: results/comparison/{kind}.pdf (+ .png) for each kind of
# peftbench.vocab.PLOTS, where a per-task kind's figures are named after the task
# (results/comparison/cola.pdf). Its inputs and command line come from the same table
# (peftbench.analysis.cli.plot_inputs / plot_argv), so nothing is listed twice.
from peftbench.analysis.cli import figure_names, plot_argv, plot_inputs, table_path
from peftbench.vocab import TASKS

ANALYSIS = config["analysis"]
ANALYSIS_STATS = shlex.join(
    [
        "--resamples",
        str(ANALYSIS["bootstrap_resamples"]),
        "--confidence",
        str(ANALYSIS["confidence"]),
        "--seed",
        str(ANALYSIS["bootstrap_seed"]),
        "--ci-method",
        ANALYSIS["ci_method"],
        "--value",
        ANALYSIS["value"],
        "--glue-exclude",
        *ANALYSIS["glue_avg_exclude"],
    ]
)


rule significance:
    input:
        runs=table_path("runs"),
        predictions=table_path("predictions"),
        # OOD accuracies are tested like the dev metric when ood.sets names sets for a grid task
        ood=[table_path("ood")] if ood_files() else [],
    output:
        **({"ood": table_path("ood_significance")} if ood_files() else {}),
        table=table_path("significance"),
        stats=table_path("method_stats"),
        examples=table_path("example_significance"),
    log:
        "results/logs/significance.log",
    benchmark:
        "results/benchmarks/significance.tsv"
    # the analysis stage's longest job, which summary, explorer and four figures wait for: it
    # starts before the figures that do not need it (they fill the other cores meanwhile)
    priority: 10
    conda:
        "../../envs/analysis.yaml"
    params:
        reference=ANALYSIS["reference_method"],
        all_pairs="--all-pairs" if ANALYSIS["all_pairs"] else "--no-all-pairs",
        stats=ANALYSIS_STATS,
        ood=lambda w, input, output: (
            f"--ood {input.ood} --ood-out {output.ood}" if input.ood else ""
        ),
    shell:
        "python -m peftbench significance --runs {input.runs} --out {output.table} "
        "--stats-out {output.stats} --predictions {input.predictions} --examples-out {output.examples} "
        "--reference {params.reference} {params.all_pairs} {params.ood} "
        "{params.stats} > {log} 2>&1"


rule plot:
    input:
        unpack(lambda w: plot_inputs(w.kind, GRID["models"])),
    output:
        pdf=report(
            "results/comparison/{kind}.pdf",
            caption="../report/plot.rst",
            category="Comparison",
            subcategory=lambda w: "Per task" if w.kind in TASKS else None,
        ),
        png="results/comparison/{kind}.png",
    log:
        "results/logs/plot_{kind}.log",
    benchmark:
        "results/benchmarks/plot_{kind}.tsv"
    wildcard_constraints:
        kind="|".join(figure_names()),
    conda:
        "../../envs/analysis.yaml"
    params:
        args=lambda w, input: shlex.join(plot_argv(w.kind, input)),
        reference=ANALYSIS["reference_method"],
        stats=ANALYSIS_STATS,
    shell:
        "python -m peftbench plot {params.args} --reference {params.reference} "
        "--out {output.pdf} {params.stats} > {log} 2>&1"


rule summary:
    input:
        runs=table_path("runs"),
        significance=table_path("significance"),
    output:
        md=report(
            "results/comparison/summary.md",
            caption="../report/summary.rst",
            category="Comparison",
        ),
    log:
        "results/logs/summary.log",
    benchmark:
        "results/benchmarks/summary.tsv"
    conda:
        "../../envs/analysis.yaml"
    params:
        reference=ANALYSIS["reference_method"],
        stats=ANALYSIS_STATS,
    shell:
        "python -m peftbench summary --runs {input.runs} --significance {input.significance} "
        "--reference {params.reference} --out {output.md} {params.stats} > {log} 2>&1"


rule explorer:
    """The interactive comparison page (one self-contained HTML: plotly.js and the data inlined)."""
    input:
        runs=table_path("runs"),
        significance=table_path("significance"),
        # OOD accuracies (y axes ood_<set>_accuracy) when ood.sets names sets for a grid task
        ood=[table_path("ood")] if ood_files() else [],
    output:
        html=report(
            "results/comparison/explorer.html",
            caption="../report/explorer.rst",
            category="Comparison",
        ),
    log:
        "results/logs/explorer.log",
    benchmark:
        "results/benchmarks/explorer.tsv"
    conda:
        "../../envs/analysis.yaml"
    params:
        reference=ANALYSIS["reference_method"],
        value=ANALYSIS["value"],
        ood=lambda w, input: f"--ood {input.ood}" if input.ood else "",
    shell:
        "python -m peftbench explorer --runs {input.runs} --significance {input.significance} "
        "--reference {params.reference} --value {params.value} {params.ood} --out {output.html} > {log} 2>&1"
