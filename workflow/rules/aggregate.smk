rule aggregate:
    """One tidy row per run (runs.parquet) and the runs' curves, ranks and gradient norms."""
    input:
        [f"{d}/metrics.parquet" for d in run_dirs()],
    output:
        runs="results/tables/runs.parquet",
        curves="results/tables/curves.parquet",
        ranks="results/tables/ranks.parquet",
        gradnorms="results/tables/gradnorms.parquet",
    params:
        run_dirs=run_dirs(),
    log:
        "results/logs/aggregate.log",
    benchmark:
        "results/benchmarks/aggregate.tsv"
    conda:
        "../../envs/analysis.yaml"
    shell:
        "python -m peftbench aggregate --out-dir $(dirname {output.runs}) {params.run_dirs} > {log} 2>&1"
