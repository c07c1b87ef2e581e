"""Tests of peftbench.analysis.plots, summary and the plot/summary CLI on small hand-made tables."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection

from peftbench import vocab
from peftbench.analysis import cli, plots
from peftbench.analysis.significance import GLUE_AVG, StatsOptions, compare_methods
from peftbench.analysis.summary import summary_markdown, write_summary

OPTS = StatsOptions(resamples=500, seed=0)
METRIC = {"cola": "matthews_correlation", "rte": "accuracy", "stsb": "pearson"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_rows(method, task, values, budget=0.2, model="m"):
    """``values``: seed -> value, None for a failed run."""
    full = method == "full"
    out = []
    for seed, v in values.items():
        b = 100.0 if full else budget
        out.append(dict(
            model=model, task=task, method=method, budget=b, seed=seed,
            status="failed" if v is None else "ok", error="RuntimeError: CUDA out of memory" if v is None else None,
            metric=METRIC.get(task, "accuracy"), dev_main=np.nan if v is None else v,
            best_dev_main=np.nan if v is None else v + 0.01, best_epoch=2,
            trainable_params=22_700_000 if full else int(b * 227_000) + 770,
            adapter_params=22_700_000 if full else int(b * 227_000), head_params=770,
            backbone_params=22_700_000, trainable_pct=100.0 if full else b,
            train_s=200.0 if full else 100.0 + seed, samples_per_s=400.0 if full else 700.0,
            peak_mem_mib=3000.0 if full else 1500.0 + 100 * b, steps=300, epochs=3,
            protocol="mean over seeds, last epoch", device="cpu"))
    return out


def make_runs(tasks=("cola", "rte"), budgets=(0.2,), seeds=(0, 1, 2)):
    rows = []
    base = {"cola": 0.50, "rte": 0.70}
    for t in tasks:
        for b in budgets:
            rows += run_rows("lora", t, {s: base[t] + 0.004 * s for s in seeds}, b)
            # adalora: clearly better, with seed-to-seed variation in the difference
            rows += run_rows("adalora", t, {s: base[t] + 0.10 + 0.004 * s + 0.002 * (s % 2) for s in seeds}, b)
        rows += run_rows("full", t, {s: base[t] + 0.02 - 0.003 * s for s in seeds})
    return pd.DataFrame(rows)


def pdf_pages(path) -> int:
    data = path.read_bytes()
    assert data[:5] == b"%PDF-", f"{path} is not a PDF"
    return len(re.findall(rb"/Type\s*/Page(?![a-zA-Z])", data))


def check_png(path):
    assert path.exists(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def texts(fig):
    out = [t.get_text() for ax in fig.axes for t in ax.texts]
    return out + [t.get_text() for t in fig.texts]


def panels(fig):
    """Axes that are panels (not colour bars)."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


@pytest.fixture(scope="module")
def runs():
    return make_runs()


@pytest.fixture(scope="module")
def sig(runs):
    return compare_methods(runs, opts=OPTS)


# ------------------------------------------------------------------------------------------
# glue / task
# ------------------------------------------------------------------------------------------

def test_glue_panels_and_marks(runs, sig):
    # files of every kind are checked in test_cli_plot_and_summary
    figs = plots.plot_glue(runs, sig, OPTS)
    assert len(figs) == 1
    titles = [ax.get_title() for ax in panels(figs[0])]
    assert titles == ["CoLA", "RTE", "GLUE average (2 tasks)"]
    # adalora is better than lora on every seed: the Holm-adjusted paired t-test marks it
    row = sig[(sig["task"] == "cola") & (sig["method"] == "adalora")].iloc[0]
    assert row["p_ttest_holm"] < 0.05
    ada = 100 * np.mean([0.60 + 0.004 * s + 0.002 * (s % 2) for s in range(3)])
    assert f"{ada:.1f}" + plots._stars(row["p_ttest_holm"]) in texts(figs[0])
    assert any("Holm-adjusted" in t for t in texts(figs[0]))
    ticks = [t.get_text() for t in panels(figs[0])[0].get_xticklabels()]
    assert ticks == ["full (n=3)", "lora (n=3)", "adalora (n=3)"]


def test_glue_one_page_per_budget_with_full_on_each(tmp_path):
    r2 = make_runs(budgets=(0.2, 0.8))
    out = tmp_path / "comparison" / "glue.pdf"
    figs = plots.plot_glue(r2, None, OPTS, out=out)
    assert len(figs) == 2 and pdf_pages(out) == 2
    check_png(out.with_suffix(".png"))
    for fig in figs:
        ticks = [t.get_text() for t in panels(fig)[0].get_xticklabels()]
        assert ticks[0] == "full (n=3)"
        assert any("No significance marks" in t for t in texts(fig))


def test_glue_one_seed_one_task_missing_method_and_failed_runs():
    rows = (run_rows("lora", "rte", {0: 0.7}) + run_rows("adalora", "rte", {0: None})
            + run_rows("gsa", "cola", {0: 0.5}) + run_rows("lora", "cola", {0: 0.45}))
    df = pd.DataFrame(rows)
    figs = plots.plot_glue(df, compare_methods(df, opts=OPTS), OPTS)
    fig = figs[0]
    axes = panels(fig)
    assert [ax.get_title() for ax in axes] == ["CoLA", "RTE", "GLUE average (2 tasks)"]
    rte = axes[1]
    rte_texts = [t.get_text() for t in rte.texts]
    assert "all runs failed" in rte_texts  # adalora's only run failed
    assert "no runs" in rte_texts  # gsa never ran rte
    assert "70.0" in rte_texts  # lora, one seed: value annotated, no interval
    ticks = [t.get_text() for t in rte.get_xticklabels()]
    assert "adalora (n=0)†" in ticks


def test_one_task_only():
    df = pd.DataFrame(run_rows("lora", "rte", {0: 0.7, 1: 0.72}) + run_rows("adalora", "rte", {0: 0.74, 1: 0.73}))
    fig = plots.plot_glue(df, None, OPTS)[0]
    assert [ax.get_title() for ax in panels(fig)] == ["RTE", "GLUE average (1 task)"]


def test_task_plot_panels_per_budget(runs, sig):
    r2 = make_runs(budgets=(0.2, 0.8))
    figs = plots.plot_task(r2, "rte", compare_methods(r2, opts=OPTS), OPTS)
    assert len(figs) == 1
    assert [ax.get_title() for ax in panels(figs[0])] == ["0.2% budget", "0.8% budget"]
    with pytest.raises(ValueError, match="no rows for task 'mnli'.*cola, rte"):
        plots.plot_task(runs, "mnli", sig, OPTS)


def test_significance_table_missing_column_raises(runs, sig):
    with pytest.raises(ValueError, match=r"missing column\(s\) p_ttest_holm"):
        plots.plot_glue(runs, sig.drop(columns=["p_ttest_holm"]), OPTS)


# ------------------------------------------------------------------------------------------
# pareto / cost
# ------------------------------------------------------------------------------------------

def test_pareto_points_and_front():
    r2 = make_runs(budgets=(0.2, 0.8))
    figs = plots.plot_pareto(r2, OPTS)
    assert len(figs) == 1
    ax = panels(figs[0])[0]
    assert ax.get_xscale() == "log"
    assert "% of backbone" in ax.get_xlabel() and "(%)" in ax.get_ylabel()
    # one errorbar series per method; points: lora 2 budgets, adalora 2, full 1
    npts = {c.get_label(): len(c.lines[0].get_xdata()) for c in ax.containers}
    assert npts == {"full": 1, "lora": 2, "adalora": 2}
    ada = [c for c in ax.containers if c.get_label() == "adalora"][0]
    np.testing.assert_allclose(np.asarray(ada.lines[0].get_xdata(), dtype=float), [0.2, 0.8])
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "Pareto front" in legend


BACKBONE = 184_000_000
R8 = 1_327_104  # LoRA rank 8 on DeBERTa-v3-base's 72 target matrices


def r8_runs():
    """r8 runs with parameter counts: adalora allocates 1.5x its budget (init rank 12) and ends at
    8 (effective = the budget); gsa trains 2,000 gates (capacity-limited, outside the r8 family)."""
    rows = []
    for t, base in (("cola", 0.50), ("rte", 0.70)):
        for method, d, alloc, eff, used, cap in (("lora", 0.0, R8, None, R8, None),
                                                 ("adalora", 0.05, int(1.5 * R8), R8, int(1.005 * R8), None),
                                                 ("gsa", -0.05, 2000, None, 2000, True)):
            for r in run_rows(method, t, {s: base + d + 0.004 * s for s in range(3)}):
                r.update(budget="r8", adapter_params=alloc, trainable_params=alloc + 770, effective_adapter_params=eff, budget_used_params=used,
                         budget_params=float(R8), backbone_params=BACKBONE, capacity_limited=cap,
                         trainable_pct=100 * alloc / BACKBONE, budget_denominator="backbone")
                rows.append(r)
        for r in run_rows("full", t, {s: base + 0.02 for s in range(3)}):
            r.update(adapter_params=BACKBONE, backbone_params=BACKBONE, budget_params=float(BACKBONE),
                     budget_used_params=BACKBONE, trainable_pct=100.0)
            rows.append(r)
    return pd.DataFrame(rows)


def test_pareto_x_is_the_final_effective_count_with_the_allocated_count_marked():
    figs = plots.plot_pareto(r8_runs(), OPTS)
    ax = panels(figs[0])[0]
    xs = {c.get_label(): np.asarray(c.lines[0].get_xdata(), dtype=float) for c in ax.containers}
    np.testing.assert_allclose(xs["adalora"], [100 * R8 / BACKBONE])  # effective, not 1.5x allocated
    np.testing.assert_allclose(xs["lora"], [100 * R8 / BACKBONE])
    np.testing.assert_allclose(xs["gsa"], [100 * 2000 / BACKBONE])   # drawn at its real size
    alloc = [ln for ln in ax.lines if ln.get_gid() == "allocated:adalora"]
    assert len(alloc) == 1
    np.testing.assert_allclose(alloc[0].get_xdata(), [100 * 1.5 * R8 / BACKBONE], rtol=1e-6)
    assert not [ln for ln in ax.lines if ln.get_gid() in ("allocated:lora", "allocated:gsa")]
    assert [ln.get_gid() for ln in ax.lines if (ln.get_gid() or "").startswith("off:")] == ["off:gsa"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.startswith("allocated parameters") for t in legend)
    assert "outside its budget family (own size)" in legend
    assert "final effective adapter parameters" in ax.get_xlabel()
    labels = [t.get_text() for t in ax.texts]
    assert any(t.endswith("(r8)") for t in labels) and any(t.endswith("(r8, own family)") for t in labels)


def test_rank_budget_and_off_family_pages_and_summary_sections():
    df = r8_runs()
    sig = compare_methods(df, opts=OPTS)
    figs = plots.plot_glue(df, sig, OPTS)
    assert [f.get_suptitle() for f in figs] == ["m: GLUE dev, r8 budget (LoRA rank 8)",
                                                "m: GLUE dev, outside r8: 2k adapter params (own family)"]
    ticks = [t.get_text() for t in panels(figs[0])[0].get_xticklabels()]
    assert ticks == ["full (n=3)", "lora (n=3)", "adalora (n=3)"]  # gsa is not in the r8 family
    task = plots.plot_task(df, "rte", sig, OPTS)[0]
    assert [ax.get_title() for ax in panels(task)] == ["r8 budget (LoRA rank 8)",
                                                       "outside r8: 2k adapter params (own family)"]
    md = summary_markdown(df, sig, OPTS)
    heads = [ln for ln in md.splitlines() if ln.startswith("## m:")]
    assert heads[0] == "## m: budget r8 (the parameter count of LoRA rank 8 on every adapted matrix)"
    assert heads[1].startswith("## m: outside r8: 2k adapter params — planned at budget r8")
    cost = {ln.split(" | ")[0]: ln for ln in md.splitlines() if ln.startswith(("| gsa |", "| adalora |"))
            and "1,327,104" in ln}
    assert "| 0 / 6 |" in cost["| gsa"] and "| 6 / 6 |" in cost["| adalora"]
    assert plots.plot_cost(df)  # token budgets in the cost bars


def test_pareto_front_helper():
    idx = plots.pareto_front([0.1, 0.2, 0.5, 100.0], [80.0, 79.0, 83.0, 82.0])
    assert list(idx) == [0, 2]


def test_cost_bars(runs):
    figs = plots.plot_cost(runs)
    assert len(figs) == 1
    left, right = panels(figs[0])
    assert left.get_ylabel() == "training time per run (s)"
    assert right.get_ylabel() == "peak memory (MiB)"
    assert len(left.patches) == 3 and len(right.patches) == 3  # full, lora, adalora at one budget
    heights = {t.get_text() for t in left.texts}
    assert {"200", "101"} <= heights  # full 200 s; lora/adalora mean of 100, 101, 102 s


def test_cost_requires_columns(runs):
    with pytest.raises(ValueError, match=r"missing column\(s\) peak_mem_mib"):
        plots.plot_cost(runs.drop(columns=["peak_mem_mib"]))


# ------------------------------------------------------------------------------------------
# curves / ranks / spectrum / gradnorms
# ------------------------------------------------------------------------------------------

def make_curves(runs, eval_steps=(0, 50, 100)):
    rows = []
    for r in runs.itertuples():
        for step in eval_steps:
            rows.append(dict(model=r.model, task=r.task, method=r.method, budget=r.budget, seed=r.seed,
                             step=step, epoch=step / 50, kind="eval", loss=np.nan, lr=1e-4,
                             dev_main=0.5 + step / 1000 + 0.01 * r.seed))
        for step in (0, 50, 100):
            rows.append(dict(model=r.model, task=r.task, method=r.method, budget=r.budget, seed=r.seed,
                             step=step, epoch=step / 50, kind="train", loss=0.7 - step / 1000 + 0.01 * r.seed,
                             lr=1e-4, dev_main=np.nan))
    return pd.DataFrame(rows)


def test_curves_mean_and_band(runs):
    figs = plots.plot_curves(make_curves(runs))
    assert len(figs) == 1
    axes = panels(figs[0])
    assert [ax.get_title() for ax in axes] == ["CoLA", "RTE", "CoLA: training loss", "RTE: training loss"]
    line = [ln for ln in axes[0].lines if ln.get_label() == "lora (n=3)"][0]
    seeds = runs.loc[(runs.method == "lora") & (runs.task == "cola"), "seed"].unique()
    np.testing.assert_allclose(line.get_ydata(), 100 * (0.5 + np.array([0, 50, 100]) / 1000 + 0.01 * np.mean(seeds)))
    assert any(isinstance(c, PolyCollection) for c in axes[0].collections)
    assert axes[0].get_xlabel() == "training step"
    # the training loss below the dev panel: the mean over seeds at each logged step
    loss = [ln for ln in axes[2].lines if ln.get_label() == "lora (n=3)"][0]
    np.testing.assert_allclose(loss.get_ydata(), 0.7 - np.array([0, 50, 100]) / 1000 + 0.01 * np.mean(seeds))
    assert axes[2].get_ylabel() == "training loss"
    assert not any("One evaluation per run" in t for t in texts(figs[0]))


def test_curves_of_runs_evaluated_once_say_so_and_keep_the_loss(runs):
    """eval_every_epoch: false leaves one dev point per run; the loss row still shows training."""
    fig = plots.plot_curves(make_curves(runs, eval_steps=(100,)))[0]
    axes = panels(fig)
    assert len(axes) == 4 and all(len(ln.get_xdata()) == 1 for ln in axes[0].lines)
    assert all(len(ln.get_xdata()) == 3 for ln in axes[2].lines)
    assert any("One evaluation per run" in t for t in texts(fig))


def test_curves_without_loss_rows_have_one_row_of_panels(runs):
    c = make_curves(runs)
    fig = plots.plot_curves(c[c["kind"] == "eval"])[0]
    assert [ax.get_title() for ax in panels(fig)] == ["CoLA", "RTE"]


def test_curves_one_seed_has_no_band():
    df = pd.DataFrame(run_rows("lora", "rte", {0: 0.7}))
    fig = plots.plot_curves(make_curves(df))[0]
    assert not any(isinstance(c, PolyCollection) for c in panels(fig)[0].collections)


def test_curves_show_open_gates_over_training(runs):
    """⟨k⟩ (mean_k, logged by the gated spectral methods) gets a page of its own: mean over seeds."""
    c = make_curves(runs)
    c["mean_k"] = np.nan
    gated = (c["method"] == "adalora") & (c["kind"] == "train")
    c.loc[gated, "mean_k"] = c.loc[gated, "step"] / 50 + c.loc[gated, "seed"]
    figs = plots.plot_curves(c)
    assert len(figs) == 2
    axes = panels(figs[1])
    assert [ax.get_title() for ax in axes] == ["CoLA", "RTE"] and "open gates" in axes[0].get_ylabel()
    (line,) = [ln for ln in axes[0].lines]
    assert line.get_label() == "adalora (n=3)"
    seeds = runs.loc[runs.method == "adalora", "seed"].unique()
    np.testing.assert_allclose(line.get_ydata(), np.array([0, 1, 2]) + np.mean(seeds))
    assert len(plots.plot_curves(make_curves(runs))) == 1  # no mean_k column: no gate page


def test_curves_without_eval_rows_raise(runs):
    c = make_curves(runs)
    with pytest.raises(ValueError, match="no eval rows"):
        plots.plot_curves(c[c["kind"] == "train"])


def make_ranks(allocating=True):
    rows = []
    for method in ("lora", "adalora"):
        for seed in (0, 1):
            for layer in range(3):
                for kind in ("query", "value"):
                    rank = 8.0 if method == "lora" or not allocating else float(layer * 2 + seed + (kind == "value"))
                    rows.append(dict(model="m", task="rte", method=method, budget=0.2, seed=seed,
                                     module=f"encoder.layer.{layer}.attention.self.{kind}", layer=layer,
                                     kind=kind, rank=rank, score=np.nan))
    return pd.DataFrame(rows)


def test_ranks_heatmap_values():
    figs = plots.plot_ranks(make_ranks())
    assert len(figs) == 1  # only adalora allocates
    ax = panels(figs[0])[0]
    img = ax.images[0].get_array()
    # cell (layer 2, value) = mean over seeds of 2*2 + seed + 1 = 5.5
    assert img[2, 1] == pytest.approx(5.5)
    assert img[0, 0] == pytest.approx(0.5)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["query", "value"]
    assert "adalora" in figs[0].get_suptitle()


def test_ranks_placeholder_when_no_method_allocates(tmp_path):
    out = tmp_path / "ranks.pdf"
    for table in (make_ranks(allocating=False), make_ranks().iloc[:0]):
        figs = plots.plot_ranks(table, out=out)
        assert len(figs) == 1 and pdf_pages(out) == 1
        assert "no method allocates ranks in this run" in texts(figs[0])


def make_spectrum(model="m"):
    rows = []
    for layer in range(2):
        for kind in ("query", "intermediate"):
            s = np.array([4.0, 2.0, 1.0]) * (layer + 1)
            e = np.cumsum(s ** 2) / np.sum(s ** 2)
            for i in range(3):
                rows.append(dict(model=model, module=f"l{layer}.{kind}", layer=layer, kind=kind, index=i,
                                 sigma=s[i], energy=e[i]))
    return pd.DataFrame(rows)


def test_spectrum():
    # files are checked in test_cli_plot_and_summary (two spectrum files -> two pages)
    figs = plots.plot_spectrum(pd.concat([make_spectrum("a"), make_spectrum("b")]))
    assert len(figs) == 2
    assert [f.get_suptitle().split(":")[0] for f in figs] == ["a", "b"]
    axes = panels(figs[0])
    assert len(axes) == 4  # 2 kinds x (sigma, energy)
    assert axes[0].get_title() == "query" and axes[0].get_yscale() == "log"
    energy = axes[2].lines[0].get_ydata()
    np.testing.assert_allclose(energy, 100 * np.cumsum([16, 4, 1]) / 21)
    assert len(figs[0].axes) == 5  # plus the layer colour bar


def make_gradnorms():
    rows = []
    for seed in (0, 1):
        for step in (0, 10):
            for layer, g in enumerate((3.0, 4.0)):
                rows.append(dict(model="m", task="rte", method="phased", budget=0.2, seed=seed, step=step,
                                 group="attention", layer=layer, grad_norm=g * (1 + seed)))
            rows.append(dict(model="m", task="rte", method="phased", budget=0.2, seed=seed, step=step,
                             group="head", layer=-1, grad_norm=1.0))
    return pd.DataFrame(rows)


def test_gradnorms_group_norm():
    figs = plots.plot_gradnorms(make_gradnorms())
    assert len(figs) == 1
    ax = panels(figs[0])[0]
    att = [ln for ln in ax.lines if ln.get_label() == "attention"][0]
    # sqrt(3^2 + 4^2) = 5 for seed 0, 10 for seed 1 -> mean 7.5
    np.testing.assert_allclose(att.get_ydata(), [7.5, 7.5])
    assert ax.get_yscale() == "log"


def make_logged_gradnorms():
    """Rows as peftbench.train.gradient_norms writes them: per-layer rows AND the group's own row
    (layer -1) for attention, only a layer -1 row for head and total."""
    rows = []
    for seed in (0, 1):
        for step in (0, 10):
            k = 1 + seed
            for layer, g in enumerate((3.0, 4.0)):
                rows.append(dict(model="m", task="rte", method="phased", budget=0.2, seed=seed, step=step,
                                 group="attention", layer=layer, grad_norm=g * k))
            for group, v in (("attention", 5.0 * k), ("head", 12.0 * k), ("total", 13.0 * k)):
                rows.append(dict(model="m", task="rte", method="phased", budget=0.2, seed=seed, step=step,
                                 group=group, layer=-1, grad_norm=v))
    return pd.DataFrame(rows)


def test_gradnorms_use_the_group_row_not_its_sum_with_the_layer_rows():
    ax = panels(plots.plot_gradnorms(make_logged_gradnorms())[0])[0]
    lines = {ln.get_label(): ln.get_ydata() for ln in ax.lines}
    # attention: the logged group norm 5 (seed 0) / 10 (seed 1), not sqrt(3² + 4² + 5²) = 5·√2
    np.testing.assert_allclose(lines["attention"], [7.5, 7.5])
    np.testing.assert_allclose(lines["head"], [18.0, 18.0])
    np.testing.assert_allclose(lines["total"], [19.5, 19.5])
    assert list(lines) == ["attention", "head", "total"]  # GRAD_GROUPS order, the total last


def test_gradnorms_placeholder(tmp_path):
    out = tmp_path / "gradnorms.pdf"
    figs = plots.plot_gradnorms(make_gradnorms().iloc[:0], out=out)
    assert pdf_pages(out) == 1
    check_png(tmp_path / "gradnorms.png")
    assert any("no gradient norms were logged" in t for t in texts(figs[0]))
    # aggregate writes an empty table with the key columns only
    keys_only = pd.DataFrame(columns=["model", "task", "method", "budget", "seed"])
    assert any("no gradient norms were logged" in t for t in texts(plots.plot_gradnorms(keys_only)[0]))
    assert "no method allocates ranks in this run" in texts(plots.plot_ranks(keys_only)[0])


def test_gradnorms_missing_column_raises():
    with pytest.raises(ValueError, match=r"gradnorms table: missing column\(s\) grad_norm"):
        plots.plot_gradnorms(make_gradnorms().drop(columns=["grad_norm"]))


def test_save_figures_rejects_non_pdf(tmp_path):
    fig = plots.placeholder_figure("t", "m")
    with pytest.raises(ValueError, match=r"\.pdf"):
        plots.save_figures([fig], tmp_path / "x.png")


# ------------------------------------------------------------------------------------------
# summary.md
# ------------------------------------------------------------------------------------------

def test_summary_markdown(tmp_path):
    df = make_runs()
    df = pd.concat([df, pd.DataFrame(run_rows("gsa", "rte", {0: 0.7, 1: None, 2: 0.71})
                                     + run_rows("gsa", "cola", {0: 0.5, 1: 0.51, 2: 0.52}))])
    sig = compare_methods(df, opts=OPTS)
    md = summary_markdown(df, sig, OPTS)
    assert "**Protocol:** mean over seeds, last epoch" in md and "evaluated after the last epoch only" not in md
    once = df.assign(eval_every_epoch=[i % 2 == 0 for i in range(len(df))])
    assert (f"dev splits evaluated after the last epoch only in {len(df) // 2} of {len(df)} runs"
            in summary_markdown(once, sig, OPTS))
    assert "evaluated after the last epoch only in every run" in summary_markdown(
        df.assign(eval_every_epoch=False), sig, OPTS)
    header = [ln for ln in md.splitlines() if ln.startswith("| method | CoLA")][0]
    assert header == "| method | CoLA (MCC) | RTE (acc) | GLUE avg (2 tasks) |"
    ada = [ln for ln in md.splitlines() if ln.startswith("| adalora |")][0]
    cola = np.array([0.60 + 0.004 * s + 0.002 * (s % 2) for s in range(3)])
    p = sig[(sig["task"] == "cola") & (sig["method"] == "adalora")]["p_ttest_holm"].iloc[0]
    stars = plots._stars(p).replace("*", "\\*")
    assert stars
    assert f"**{100 * cola.mean():.1f} ± {100 * cola.std(ddof=1):.1f}**{stars}" in ada  # best in column
    assert "| lora (reference) |" in md
    gsa = [ln for ln in md.splitlines() if ln.startswith("| gsa |")][0]
    assert "(2/3)" in gsa  # one rte seed failed
    assert "CUDA out of memory" in md and "## Failed runs" in md
    assert "Holm-adjusted paired t-test" in md
    cost = [ln for ln in md.splitlines() if ln.startswith("| full |") and "—" in ln]
    assert cost and "22,700,000" in cost[0] and "| 200 |" in cost[0]
    out = write_summary(df, sig, tmp_path / "c" / "summary.md", OPTS)
    assert out.read_text(encoding="utf-8") == md


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------

def make_trials() -> pd.DataFrame:
    """A trials table (peftbench.tuning.collect_trials) of two studies, one trial pruned."""
    rows = []
    for method, base in (("lora", 0.5), ("fwlora", 0.55)):
        for i in range(4):
            rows.append({"model": "a", "task": "cola", "method": method, "budget": "0.5", "trial": i,
                         "state": "PRUNED" if i == 3 else "COMPLETE",
                         "value": float("nan") if i == 3 else base + 0.05 * i, "seconds": 1.0})
    return pd.DataFrame(rows)


def parse(argv):
    parser = argparse.ArgumentParser(prog="peftbench")
    cli.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_plot_and_summary(tmp_path, runs, sig):
    paths = {}
    from peftbench.analysis.significance import compare_ood

    ood = make_ood_runs()[1].query("task == 'rte'")
    for name, df in (("runs", runs), ("significance", sig), ("curves", make_curves(runs)),
                     ("ranks", make_ranks()), ("gradnorms", make_gradnorms()), ("trials", make_trials()),
                     ("example_significance", make_example_significance()), ("ood", ood),
                     ("ood_significance", compare_ood(runs, ood, opts=OPTS))):
        paths[name] = tmp_path / f"{name}.parquet"
        df.to_parquet(paths[name])
    # two spectrum files (as from two svd jobs) are concatenated: here one per module kind
    spec = [tmp_path / "s1.parquet", tmp_path / "s2.parquet"]
    sp = make_spectrum("a")
    sp[sp["kind"] == "query"].to_parquet(spec[0])
    sp[sp["kind"] == "intermediate"].to_parquet(spec[1])
    stat = ["--resamples", "500", "--seed", "0"]
    calls = {
        "glue": ["--runs", paths["runs"], "--significance", paths["significance"]],
        "task": ["--runs", paths["runs"], "--significance", paths["significance"], "--example_significance",
                 paths["example_significance"], "--task", "cola"],
        "pareto": ["--runs", paths["runs"]],
        "cost": ["--runs", paths["runs"]],
        "curves": ["--curves", paths["curves"]],
        "ranks": ["--ranks", paths["ranks"]],
        "spectrum": ["--spectrum", *spec],
        "gradnorms": ["--gradnorms", paths["gradnorms"]],
        "gradheatmap": ["--gradnorms", paths["gradnorms"]],
        "evp": ["--trials", paths["trials"]],
        "ood": ["--runs", paths["runs"], "--ood", paths["ood"], "--significance", paths["significance"],
                "--ood_significance", paths["ood_significance"]],
    }
    assert set(calls) == set(vocab.PLOTS)
    for kind, extra in calls.items():
        out = tmp_path / "comparison" / f"{kind}.pdf"
        args = parse(["plot", kind, *map(str, extra), "--out", str(out), *stat])
        assert args.func(args) == 0
        assert pdf_pages(out) == 1, kind
        check_png(out.with_suffix(".png"))
    out = tmp_path / "comparison" / "summary.md"
    args = parse(["summary", "--runs", str(paths["runs"]), "--significance", str(paths["significance"]),
                  "--out", str(out), *stat])
    assert args.func(args) == 0
    assert out.read_text(encoding="utf-8") == summary_markdown(runs, sig, OPTS)


def test_cli_spectrum_concatenates_files(tmp_path, monkeypatch):
    sp = make_spectrum("a")
    files = [tmp_path / "q.parquet", tmp_path / "i.parquet", tmp_path / "b.parquet"]
    sp[sp["kind"] == "query"].to_parquet(files[0])
    sp[sp["kind"] == "intermediate"].to_parquet(files[1])
    make_spectrum("b").to_parquet(files[2])
    seen = {}
    monkeypatch.setattr(plots, "save_figures", lambda figs, out: seen.update(figs=figs) or (out, out))
    args = parse(["plot", "spectrum", "--spectrum", *map(str, files), "--out", str(tmp_path / "s.pdf")])
    assert args.func(args) == 0
    figs = seen["figs"]
    assert len(figs) == 2  # models a and b
    assert [ax.get_title() for ax in panels(figs[0])[:2]] == ["query", "intermediate"]


def test_cli_register_does_not_import_plotting():
    code = ("import argparse, sys; from peftbench.analysis import cli; "
            "cli.register(argparse.ArgumentParser().add_subparsers()); "
            "print(sorted(m for m in ('matplotlib', 'scipy', 'pandas') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_plot_needs_its_inputs(tmp_path, capsys):
    # the task kind reads runs, significance and example_significance (vocab.PLOTS) and needs --task
    args = parse(["plot", "task", "--runs", "x.parquet", "--out", str(tmp_path / "t.pdf")])
    with pytest.raises(SystemExit):
        args.func(args)
    assert "plot task needs --significance, --example_significance, --task" in capsys.readouterr().err


def test_cli_plot_missing_file_names_it(tmp_path):
    args = parse(["plot", "curves", "--curves", str(tmp_path / "curves.parquet"), "--out", str(tmp_path / "c.pdf")])
    with pytest.raises(FileNotFoundError, match="curves.parquet.*aggregate"):
        args.func(args)


def test_glue_avg_rows_used_for_glue_panel(runs):
    fig = plots.plot_glue(runs, None, OPTS)[0]
    glue_ax = panels(fig)[-1]
    lora = np.mean([(0.50 + 0.004 * s + 0.70 + 0.004 * s) / 2 for s in range(3)])
    assert f"{100 * lora:.1f}" in [t.get_text() for t in glue_ax.texts]
    assert glue_ax.get_ylabel() == "mean main metric (%)"
    assert GLUE_AVG not in glue_ax.get_title()


# ------------------------------------------------------------------------------------------
# the reviewer figure (task) and in-domain vs OOD (ood)
# ------------------------------------------------------------------------------------------

def make_example_significance(reference="lora"):
    """Example-level rows for cola at the 0.2 budget: adalora's bootstrap n.s., McNemar rejects on
    2 of 3 seeds, ASO ε_min 0.05; full's bootstrap p 0.004, McNemar untested seeds, no ASO value."""
    base = dict(model="m", task="cola", budget="0.2", metric="matthews_correlation", value_column="dev_main",
                reference=reference, eps_min=np.nan)
    rows = [dict(base, method="adalora", test="hier_bootstrap", seed=-1, p_value=0.1, p_holm=0.2),
            *[dict(base, method="adalora", test="mcnemar", seed=s, p_value=p, p_holm=p)
              for s, p in enumerate([0.01, 0.3, 0.04])],
            dict(base, method="adalora", test="aso", seed=-1, p_value=np.nan, p_holm=np.nan, eps_min=0.05),
            dict(base, method="full", test="hier_bootstrap", seed=-1, p_value=0.002, p_holm=0.004),
            dict(base, method="full", test="aso", seed=-1, p_value=np.nan, p_holm=np.nan),
            # a row against another reference is not this figure's
            dict(base, method="adalora", test="hier_bootstrap", seed=-1, p_value=0.5, p_holm=0.5, reference="full")]
    return pd.DataFrame(rows)


def test_reviewer_figure_marks_come_from_both_tables(runs, sig, tmp_path):
    ex = make_example_significance()
    rows = plots.review_mark_rows(sig, ex, "lora")
    assert [label for label, _ in rows] == list(plots.MARK_ROWS.values())
    seed, boot, mcn, aso = (r for _, r in rows)
    k = ("m", "cola", "0.2", "adalora")
    # seed level: significance.parquet's Holm-adjusted t-test
    p = sig[(sig.task == "cola") & (sig.method == "adalora")]["p_ttest_holm"].iloc[0]
    assert p < 0.05 and seed[k] == plots._stars(p)
    p_full = sig[(sig.task == "cola") & (sig.method == "full")]["p_ttest_holm"].iloc[0]
    assert seed[("m", "cola", "0.2", "full")] == (plots._stars(p_full) or "n.s.")
    # example level: example_significance.parquet, vs the figure's reference only
    assert boot[k] == "n.s." and boot[("m", "cola", "0.2", "full")] == "**"
    assert mcn[k] == "2/3" and ("m", "cola", "0.2", "full") not in mcn
    assert aso[k] == "0.05" and aso[("m", "cola", "0.2", "full")] == "–"
    out = tmp_path / "cola.pdf"
    fig = plots.plot_task(runs, "cola", sig, OPTS, out=out, reference="lora", example_significance=ex)[0]
    assert pdf_pages(out) == 1
    check_png(out.with_suffix(".png"))
    drawn = [t.get_text() for t in panels(fig)[0].texts]
    for label in plots.MARK_ROWS.values():
        assert label in drawn
    assert {"n.s.", "**", "2/3", "0.05", seed[k]} <= set(drawn)
    footer = " ".join(t.get_text() for t in fig.texts)
    assert "significance.parquet" in footer and "example_significance.parquet" in footer
    # seed-level row only without the example-level table
    fig = plots.plot_task(runs, "cola", sig, OPTS, reference="lora")[0]
    assert "examples: bootstrap" not in [t.get_text() for t in panels(fig)[0].texts]
    with pytest.raises(ValueError, match=r"example_significance table: missing column\(s\) eps_min"):
        plots.example_marks(ex.drop(columns="eps_min"))


def make_ood_runs():
    """RTE runs (lora, adalora; 3 seeds) scored on ANLI r1/r2, MNLI runs scored on HANS with its
    heuristic breakdown; seed 2 of adalora has no anli_r2 row."""
    rows = []
    for method, shift in (("lora", 0.0), ("adalora", 0.05)):
        rows += run_rows(method, "rte", {s: 0.70 + shift + 0.01 * s for s in range(3)})
        rows += run_rows(method, "mnli", {s: 0.80 + shift + 0.01 * s for s in range(3)})
    runs = pd.DataFrame(rows)
    ood = []
    for r in runs.itertuples(index=False):
        key = dict(model=r.model, task=r.task, method=r.method, budget=str(r.budget), seed=r.seed)
        sets = ["anli_r1", "anli_r2"] if r.task == "rte" else ["hans"]
        for name in sets:
            if (r.method, r.seed, name) == ("adalora", 2, "anli_r2"):
                continue
            acc = r.dev_main - 0.3
            ood.append(dict(key, ood_set=name, breakdown="all", subset="all", gold_class="all", accuracy=acc))
            if name == "hans":
                for h in vocab.HANS_HEURISTICS:
                    for g, a in (("entailment", 0.95), ("non-entailment", 0.1 + 0.01 * r.seed)):
                        ood.append(dict(key, ood_set=name, breakdown="heuristic", subset=h, gold_class=g, accuracy=a))
                ood.append(dict(key, ood_set=name, breakdown="subcase", subset="ln_x", gold_class="entailment",
                                accuracy=0.9))
    return runs, pd.DataFrame(ood)


def test_ood_plot_in_domain_vs_each_set_and_hans_breakdown(tmp_path):
    from peftbench.analysis.significance import compare_ood

    runs, ood = make_ood_runs()
    sig = compare_methods(runs, opts=OPTS)
    osig = compare_ood(runs, ood, opts=OPTS)
    wide, what = plots.ood_columns(runs, ood)
    assert what["ood_anli_r1_accuracy"] == ("anli_r1", "all", "all", "all")
    assert what["hans__heuristic__constituent__non-entailment"] == ("hans", "heuristic", "constituent", "non-entailment")
    r = wide[(wide.task == "rte") & (wide.method == "adalora") & (wide.seed == 1)].iloc[0]
    assert r["ood_anli_r1_accuracy"] == pytest.approx(r["dev_main"] - 0.3)
    assert np.isnan(wide[(wide.task == "rte") & (wide.method == "adalora") & (wide.seed == 2)]["ood_anli_r2_accuracy"]).all()
    out = tmp_path / "ood.pdf"
    figs = plots.plot_ood(runs, ood, sig, osig, OPTS, out=out)
    # GLUE order: mnli (dev + HANS page, then the HANS breakdown page), rte (dev, ANLI R1, ANLI R2)
    assert len(figs) == 3 and pdf_pages(out) == 3
    check_png(out.with_suffix(".png"))
    titles = [[ax.get_title() for ax in panels(f)] for f in figs]
    assert titles[0] == ["MNLI-m dev (in-domain)", "HANS (OOD)"]
    assert titles[1] == [f"HANS {h.replace('_', ' ')}, gold {g}" for g in ("entailment", "non-entailment")
                         for h in vocab.HANS_HEURISTICS]
    assert titles[2] == ["RTE dev (in-domain)", "ANLI R1 (OOD)", "ANLI R2 (OOD)"]
    figs = figs[2:] + figs[:2]  # rte first below
    # the OOD panels' values are the OOD accuracies: adalora's ANLI R1 mean, and n=2 on ANLI R2
    ada = 100 * np.mean([0.75 + 0.01 * s - 0.3 for s in range(3)])
    r1 = panels(figs[0])[1]
    p = osig[(osig.ood_set == "anli_r1") & (osig.method == "adalora")]["p_ttest_holm"].iloc[0]
    assert f"{ada:.1f}{plots._stars(p)}" in [t.get_text() for t in r1.texts]
    assert "adalora (n=2)†" in [t.get_text() for t in panels(figs[0])[2].get_xticklabels()]
    hans_ne = panels(figs[2])[3]  # lexical overlap, gold non-entailment
    assert f"{100 * np.mean([0.1, 0.11, 0.12]):.1f}" in [t.get_text() for t in hans_ne.texts]
    assert len(plots.plot_ood(runs, ood.iloc[:0])) == 1  # placeholder
