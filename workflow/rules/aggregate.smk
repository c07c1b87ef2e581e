rule aggregate:
    """One tidy row per run (runs.parquet) and the runs' curves, ranks and gradient norms."""
    input:
        [f"{d}/{RUN_FILES['metrics']}" for d in run_dirs()],
    output:
        **{name: table_path(name) for name in TABLE_SOURCES},
    log:
        "results/logs/aggregate.log",
    benchmark:
        "results/benchmarks/aggregate.tsv"
    conda:
        "../../envs/analysis.yaml"
    params:
        run_dirs=run_dirs(),
    shell:
        "python -m peftbench aggregate --out-dir $(dirname {output.runs}) {params.run_dirs} > {log} 2>&1"
