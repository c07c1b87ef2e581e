"""The analysis stage reads the shared vocabulary (peftbench.vocab, peftbench.methods, the config
schema's defaults) instead of keeping its own copies, and counts ``missing`` runs (the aggregate
rule's rows without metrics.parquet) everywhere."""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from peftbench import vocab
from peftbench.aggregate import aggregate
from peftbench.analysis import cli, plots
from peftbench.analysis.significance import (
    StatsOptions,
    budget_free_methods,
    compare_methods,
    method_stats,
    order_methods,
    validate_runs,
)
from peftbench.analysis.summary import summary_markdown
from peftbench.config import schema_defaults
from peftbench.methods import FULL_BUDGET, METHODS

ROOT = Path(__file__).resolve().parents[1]
OPTS = StatsOptions(resamples=500, seed=0)


def metrics_row(method, task, seed, value, budget=0.2):
    full = method == "full"
    b = FULL_BUDGET if full else budget
    return dict(model="m", task=task, method=method, budget=b, seed=seed, status="ok", error=None,
                metric=vocab.TASKS[task].main_metric, dev_main=value, best_dev_main=value + 0.01,
                trainable_params=1000, adapter_params=900, head_params=100, backbone_params=100_000,
                trainable_pct=100.0 if full else b, train_s=10.0, samples_per_s=100.0, peak_mem_mib=500.0,
                protocol="mean over seeds, last epoch", device="cpu")


@pytest.fixture
def runs_with_missing(tmp_path):
    """runs.parquet as the aggregate stage writes it when adalora/rte/seed 2 has no metrics.parquet."""
    dirs = []
    for task, base in (("cola", 0.5), ("rte", 0.7)):
        for method, shift in (("full", 0.02), ("lora", 0.0), ("adalora", 0.1)):
            for seed in (0, 1, 2):
                b = "100" if method == "full" else "0.2"
                d = tmp_path / "runs" / "m" / task / method / f"b{b}" / f"s{seed}"
                d.mkdir(parents=True)
                dirs.append(d)
                if (method, task, seed) == ("adalora", "rte", 2):
                    continue  # killed: no metrics.parquet
                pd.DataFrame([metrics_row(method, task, seed, base + shift + 0.004 * seed + 0.001 * (seed % 2))]
                             ).to_parquet(d / "metrics.parquet")
    counts = aggregate(dirs, tmp_path / "tables")
    assert counts["missing"] == 1
    runs = pd.read_parquet(tmp_path / "tables" / "runs.parquet")
    assert (runs["status"] == "missing").sum() == 1
    return runs


def test_missing_run_goes_through_every_analysis_and_is_reported(runs_with_missing):
    runs = runs_with_missing
    sig = compare_methods(runs, opts=OPTS)
    r = sig[(sig["task"] == "rte") & (sig["method"] == "adalora")].iloc[0]
    assert r["n"] == 2 and r["seeds"] == "0,1"
    assert r["n_missing_method"] == 1 and r["missing_seeds_method"] == "2"
    assert r["n_failed_method"] == 0
    g = sig[(sig["task"] == vocab.GLUE_AVG) & (sig["method"] == "adalora")].iloc[0]
    assert g["n"] == 2 and g["n_missing_method"] == 1  # the GLUE average of seed 2 is incomplete

    st = method_stats(runs, OPTS)
    s = st[(st["task"] == "rte") & (st["method"] == "adalora")].iloc[0]
    assert (s["n_ok"], s["n_failed"], s["n_missing"]) == (2, 0, 1) and s["missing_seeds"] == "2"
    assert (st["metric"] != "").all()

    fig = plots.plot_glue(runs, sig, OPTS)[0]
    rte = [ax for ax in fig.axes if ax.get_title() == "RTE"][0]
    assert "adalora (n=2)†" in [t.get_text() for t in rte.get_xticklabels()]
    cost = plots.plot_cost(validate_runs(runs))[0]
    assert any("Not counted: 1 missing run." in t.get_text() for t in cost.texts)

    md = summary_markdown(runs, sig, OPTS)
    ada = [ln for ln in md.splitlines() if ln.startswith("| adalora |")][0]
    assert "(2/3)" in ada
    assert "18 runs, 0 failed, 1 missing" in md
    row = [ln for ln in md.splitlines() if ln.startswith("| m | rte | adalora |")][0]
    assert "| missing |" in row and "metrics.parquet" in row


def test_method_whose_runs_are_all_missing():
    rows = [metrics_row("lora", "rte", s, 0.7 + 0.01 * s) for s in range(3)]
    rows += [dict(model="m", task="rte", method="adalora", budget=0.2, seed=s, status="missing",
                  error="no metrics.parquet") for s in range(3)]
    runs = pd.DataFrame(rows)
    fig = plots.plot_glue(runs, None, OPTS)[0]
    assert "all runs missing" in [t.get_text() for ax in fig.axes for t in ax.texts]
    md = summary_markdown(runs, None, OPTS)
    assert [ln for ln in md.splitlines() if ln.startswith("| adalora |")][0].split("|")[2].strip() == "missing"
    # a table whose runs are all missing has no metric columns at all
    only = pd.DataFrame(rows[3:])
    st = method_stats(only, OPTS)
    assert (st["n_ok"] == 0).all() and set(st["metric"]) >= {"accuracy"}


def test_unknown_status_names_the_allowed_ones():
    df = pd.DataFrame([metrics_row("lora", "rte", 0, 0.7)]).assign(status="maybe")
    with pytest.raises(ValueError, match="'maybe'.*allowed: 'ok', 'failed', 'missing'"):
        validate_runs(df)
    for status in vocab.RUN_STATUSES:
        validate_runs(pd.DataFrame([metrics_row("lora", "rte", 0, 0.7)]).assign(status=status))


# ------------------------------------------------------------------------------------------
# Defaults come from the config schema
# ------------------------------------------------------------------------------------------

def parse(argv):
    parser = argparse.ArgumentParser(prog="peftbench")
    cli.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_defaults_are_the_schemas():
    d = schema_defaults("analysis")
    o = StatsOptions()
    assert (o.resamples, o.confidence, o.seed, o.ci_method, o.value, list(o.glue_exclude)) == (
        d["bootstrap_resamples"], d["confidence"], d["bootstrap_seed"], d["ci_method"], d["value"],
        d["glue_avg_exclude"])
    a = parse(["significance", "--runs", "r", "--out", "s"])
    assert (a.reference, a.all_pairs, a.resamples, a.confidence, a.seed, a.ci_method, a.value, a.glue_exclude) == (
        d["reference_method"], d["all_pairs"], d["bootstrap_resamples"], d["confidence"], d["bootstrap_seed"],
        d["ci_method"], d["value"], d["glue_avg_exclude"])
    assert cli._opts(a) == o


def test_analysis_rules_read_the_config_without_fallbacks():
    text = (ROOT / "workflow" / "rules" / "analysis.smk").read_text()
    assert ".get(" not in text
    report = "".join(p.read_text() for p in (ROOT / "workflow" / "report").glob("*.rst"))
    assert ".get(" not in report


# ------------------------------------------------------------------------------------------
# Plot kinds, inputs and command lines come from vocab.PLOTS
# ------------------------------------------------------------------------------------------

def test_figure_names_and_plot_argv():
    per_task = [p.name for p in vocab.PLOTS.values() if p.per_task]
    assert per_task == ["task"]
    names = cli.figure_names(["cola", "rte"])
    assert names == [k for k, p in vocab.PLOTS.items() if not p.per_task] + ["cola", "rte"]
    assert cli.plot_kind("cola") == (vocab.PLOTS["task"], "cola")
    assert cli.plot_kind("glue") == (vocab.PLOTS["glue"], None)
    with pytest.raises(KeyError, match="unknown figure 'task'"):
        cli.plot_kind("task")  # the per-task kind is named after its tasks
    inputs = cli.plot_inputs("cola", ["minilm"])
    assert inputs == {"runs": "results/tables/runs.parquet", "significance": "results/tables/significance.parquet",
                      "example_significance": "results/tables/example_significance.parquet"}
    assert cli.plot_argv("cola", inputs) == ["task", "--task", "cola", "--runs", "results/tables/runs.parquet",
                                             "--significance", "results/tables/significance.parquet",
                                             "--example_significance",
                                             "results/tables/example_significance.parquet"]
    spec = cli.plot_inputs("spectrum", ["a", "b"])
    assert cli.plot_argv("spectrum", spec) == ["spectrum", "--spectrum", "results/svd/a/spectrum.parquet",
                                               "results/svd/b/spectrum.parquet"]
    for name in cli.figure_names(vocab.TASKS):  # every command line parses
        args = parse(["plot", *cli.plot_argv(name, cli.plot_inputs(name, ["m"])), "--out", "x.pdf"])
        assert args.kind == cli.plot_kind(name)[0].name


def test_plot_options_are_the_tables_of_vocab():
    sub = argparse.ArgumentParser().add_subparsers()
    cli.register(sub)
    plot = sub.choices["plot"]
    kind = [a for a in plot._actions if a.dest == "kind"][0]
    assert list(kind.choices) == list(vocab.PLOTS)
    options = {a.dest for a in plot._actions}
    assert {k for p in vocab.PLOTS.values() for k in p.inputs} <= options


def test_caption_has_a_section_per_kind():
    jinja2 = pytest.importorskip("jinja2")
    from docutils.core import publish_parts

    text = (ROOT / "workflow" / "report" / "plot.rst").read_text()
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    cfg = {"analysis": schema_defaults("analysis")}
    rendered = {}
    for name in cli.figure_names(vocab.TASKS):
        sm = SimpleNamespace(wildcards=SimpleNamespace(kind=name), params=SimpleNamespace(reference="lora"),
                             config=cfg)
        rendered[name] = env.from_string(text).render(snakemake=sm)
        assert "95%" in rendered[name] or name in ("cost", "curves", "ranks", "spectrum", "gradnorms", "gradheatmap", "evp")
        publish_parts(rendered[name], writer="html", settings_overrides={"halt_level": 2})
    kinds = [k for k, p in vocab.PLOTS.items() if not p.per_task]
    assert len({rendered[k] for k in kinds} | {rendered["cola"]}) == len(kinds) + 1
    assert "Results on cola" in rendered["cola"]
    for k in kinds:
        assert re.search(rf'kind == "{k}"', text), k


# ------------------------------------------------------------------------------------------
# Methods: order, colours and budget-free methods from the method table
# ------------------------------------------------------------------------------------------

def test_method_order_and_colours_follow_the_method_table():
    assert order_methods(reversed(list(METHODS))) == list(METHODS)
    assert order_methods(["zeta", "lora", "full", "gsa"], reference="gsa") == ["full", "gsa", "lora", "zeta"]
    colors = plots.method_colors(["phased", "lora"])
    assert colors == {m: c for m, c in plots.method_colors(list(METHODS)).items() if m in ("phased", "lora")}


def test_budget_free_methods_from_the_table():
    df = pd.DataFrame(dict(method=["full", "lora", "lora", "mystery", "other"],
                           budget=[FULL_BUDGET, 0.2, FULL_BUDGET, FULL_BUDGET, 0.5]))
    # lora is an adapter method in the table even if a (hypothetical) run says budget 100;
    # an unknown method counts as budget-free when all its runs are at FULL_BUDGET
    assert budget_free_methods(df) == {"full", "mystery"}
    assert {m for m, info in METHODS.items() if info.budget_free} <= budget_free_methods(
        pd.DataFrame(dict(method=list(METHODS), budget=np.full(len(METHODS), 0.3))))
