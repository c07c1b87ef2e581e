"""Analysis stage of peftbench: significance tests, comparison figures and the Markdown summary.

Modules:
    significance: seed-paired method comparisons (bootstrap CI, paired t-test, Wilcoxon,
        Cohen's d, Holm–Bonferroni) and per-method statistics, including the GLUE average
        (rows with ``task == "glue_avg"``), from ``results/tables/runs.parquet``.
    plots: one function per figure (glue, task, pareto, cost, curves, ranks, spectrum,
        gradnorms), each returning Matplotlib figures and writing a PDF plus a PNG.
    summary: ``results/comparison/summary.md``.
    cli: ``register(subparsers)`` adds the ``significance``, ``plot`` and ``summary``
        sub-commands to the package CLI.

Outputs of the ``significance`` sub-command:
    ``results/tables/significance.parquet``: one row per comparison (method vs baseline) per
        ``(model, task, budget)``; ``task == "glue_avg"`` rows compare per-seed GLUE averages.
    ``results/tables/method_stats.parquet``: one row per ``(model, task, budget, method)`` with
        seed counts, mean, SD and bootstrap CI; ``task == "glue_avg"`` rows are the GLUE average
        per method per ``(model, budget)``.

Importing this package does not import plotting; import the sub-modules you need.
"""
