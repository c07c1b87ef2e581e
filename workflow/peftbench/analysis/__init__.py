"""Analysis stage of peftbench: significance tests, comparison figures and the Markdown summary.

Modules:
    significance: seed-paired method comparisons (bootstrap CI, paired t-test, Wilcoxon,
        Cohen's d, Holm–Bonferroni) and per-method statistics, including the GLUE average
        (rows with ``task == "glue_avg"``), from ``results/tables/runs.parquet``.
    examples: example-level tests from ``results/tables/predictions.parquet`` (hierarchical
        bootstrap over seeds and dev examples, McNemar per seed, Almost Stochastic Order).
    plots: one function per figure (glue, task, pareto, cost, curves, ranks, spectrum,
        gradnorms), each returning Matplotlib figures and writing a PDF plus a PNG.
    summary: ``results/comparison/summary.md``.
    cli: ``register(subparsers)`` adds the ``significance``, ``plot`` and ``summary``
        sub-commands to the package CLI; ``plot_inputs``/``plot_argv`` map a figure name to its
        input tables and ``peftbench plot`` arguments (used by the ``plot`` rule too).

Shared names come from the vocabulary, never from copies here: tasks, metrics, run statuses,
tables and plot kinds from :mod:`peftbench.vocab`; methods (order, labels, which are
budget-free) from :mod:`peftbench.methods`; defaults of the statistics options from the config
schema (:func:`peftbench.config.schema_defaults`). A run's ``status`` is ``ok``, ``failed`` or
``missing`` (:data:`peftbench.vocab.RUN_STATUSES`); failed and missing runs are counted in every
table and figure, never dropped.

Outputs of the ``significance`` sub-command:
    ``results/tables/significance.parquet``: one row per comparison (method vs baseline) per
        ``(model, task, budget)``; ``task == "glue_avg"`` rows compare per-seed GLUE averages.
    ``results/tables/method_stats.parquet``: one row per ``(model, task, budget, method)`` with
        seed counts, mean, SD and bootstrap CI; ``task == "glue_avg"`` rows are the GLUE average
        per method per ``(model, budget)``.
    ``results/tables/example_significance.parquet`` (with ``--predictions``): one row per
        example-level test (:data:`peftbench.analysis.examples.EXAMPLE_COLUMNS`).

Importing this package does not import plotting; import the sub-modules you need.
"""
