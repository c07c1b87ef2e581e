"""Comparison figures: one function per figure, each returning its Matplotlib figures (one per page).

Every ``plot_*`` function takes DataFrames (not paths), builds ``matplotlib.figure.Figure``
objects on the Agg canvas without pyplot (no global backend switch, no GUI, no figure leaks), and,
when ``out`` is given, writes the pages to ``out`` (a multi-page PDF) and a PNG with the same
stem beside it (:func:`save_figures`; the PNG shows the pages stacked top to bottom, at most
:data:`PNG_MAX_PAGES`). Metric values are stored as fractions and drawn ×100.

Every figure copes with one seed (no interval, no band), a method missing from a family (its
slot says "no runs"), failed and missing runs (``status`` ``failed``/``missing``: counted in the
tick label, never silently dropped) and a single task. Empty optional inputs (ranks, gradient
norms) give a one-page figure saying so.

Names, labels and orders come from the shared vocabulary: task labels and main metrics from
:data:`peftbench.vocab.TASKS`, metric labels from :func:`peftbench.vocab.metric`, module kinds
and gradient groups from :data:`~peftbench.vocab.TARGET_KINDS` / :data:`~peftbench.vocab.GRAD_GROUPS`,
method colours and order from :data:`peftbench.methods.METHODS`; the figure kinds are
:data:`peftbench.vocab.PLOTS`.
"""
from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path
from typing import Iterable, Sequence

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.transforms import blended_transform_factory

from ..methods import METHODS
from ..vocab import GLUE_AVG, GRAD_GROUPS, GRAD_TOTAL, TARGET_KINDS, TASKS, order_tasks, task_label
from ..vocab import metric as metric_info
from .significance import (
    FULL_TOKEN,
    StatsOptions,
    budget_families,
    budget_free_methods,
    budget_label,
    family_runs,
    family_token,
    method_stats,
    order_budgets,
    order_methods,
    parse_family,
)

__all__ = [
    "save_figures",
    "method_colors",
    "significance_marks",
    "example_marks",
    "review_mark_rows",
    "plot_ood",
    "plot_glue",
    "plot_task",
    "plot_pareto",
    "plot_cost",
    "plot_curves",
    "plot_ranks",
    "plot_spectrum",
    "plot_gradnorms",
    "plot_gradheatmap",
]

#: Height of one row of significance marks, as a fraction of the panel's height.
MARK_ROW_H = 0.055
#: The significance threshold of the marks' words ("n.s.", McNemar's seed count).
ALPHA = 0.05

#: At most this many PDF pages are stacked into the PNG preview.
PNG_MAX_PAGES = 8
PNG_DPI = 110
PAGE_W = 11.7  # A4 landscape, inches

_PALETTE = (list(colormaps["tab10"].colors) + list(colormaps["Dark2"].colors)
            + list(colormaps["Set1"].colors))


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def save_figures(figs: Sequence[Figure], out: str | Path) -> tuple[Path, Path]:
    """Write ``figs`` as the pages of the PDF ``out`` and a PNG preview beside it.

    The PNG (``out`` with suffix ``.png``) stacks the first :data:`PNG_MAX_PAGES` pages
    vertically at :data:`PNG_DPI` dpi on a white background.

    Returns:
        ``(pdf_path, png_path)``.

    Raises:
        ValueError: ``figs`` is empty or ``out`` does not end in ``.pdf``.
    """
    out = Path(out)
    if out.suffix.lower() != ".pdf":
        raise ValueError(f"{out}: the output must be a .pdf path (a .png is written beside it)")
    if not figs:
        raise ValueError(f"{out}: no figures to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    with PdfPages(out, metadata={"Creator": "peftbench.analysis.plots"}) as pdf:
        for fig in figs:
            pdf.savefig(fig)
    images = []
    for fig in figs[:PNG_MAX_PAGES]:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=PNG_DPI, facecolor="white")
        buf.seek(0)
        images.append(mpimg.imread(buf, format="png")[..., :3])
    width = max(im.shape[1] for im in images)
    padded = [np.pad(im, ((0, 8), (0, width - im.shape[1]), (0, 0)), constant_values=1.0) for im in images]
    png = out.with_suffix(".png")
    mpimg.imsave(png, np.concatenate(padded, axis=0))
    return out, png


def method_colors(methods: Iterable[str]) -> dict[str, tuple]:
    """A fixed colour per method: methods of the method table (:data:`peftbench.methods.METHODS`,
    in its order) always get the same colour, unknown ones follow alphabetically."""
    known = list(METHODS)
    extra = sorted(set(methods) - set(known))
    idx = {m: i for i, m in enumerate(known + extra)}
    return {m: _PALETTE[idx[m] % len(_PALETTE)] for m in set(methods)}


def _stars(p: float) -> str:
    if p is None or not np.isfinite(p):
        return ""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else ""


def _word(p: float) -> str:
    """A mark row's word for a p-value: stars (:func:`_stars`), ``n.s.``, or ``–`` (no test)."""
    if p is None or not np.isfinite(p):
        return "–"
    return _stars(p) or "n.s."


def significance_marks(significance: pd.DataFrame | None, reference: str | None = None,
                       p_column: str = "p_ttest_holm", words: bool = False) -> dict:
    """Stars per ``(model, task, budget token, method)`` from the rows comparing a method with
    ``reference`` (default: the table's ``reference`` column): ``*`` p < 0.05, ``**`` p < 0.01,
    ``***`` p < 0.001 on ``p_column`` (Holm-adjusted paired t-test by default); with ``words``
    also ``n.s.`` (p ≥ 0.05) and ``–`` (no p-value: fewer than two paired seeds).

    Returns:
        ``{(model, task, budget, method): stars}`` (``budget``: the family token,
        :func:`~peftbench.analysis.significance.family_token`); empty when ``significance`` is None
        or empty.

    Raises:
        ValueError: a needed column is missing from ``significance``.
    """
    if significance is None or significance.empty:
        return {}
    need = ["model", "task", "budget", "method", "baseline", "reference", p_column]
    missing = [c for c in need if c not in significance.columns]
    if missing:
        raise ValueError(f"significance table: missing column(s) {', '.join(missing)}; "
                         "regenerate it with `snakemake results/tables/significance.parquet`")
    base = reference if reference is not None else significance["reference"]
    sig = significance[significance["baseline"] == base]
    mark = _word if words else _stars
    return {(r.model, r.task, family_token(r.budget), r.method): mark(getattr(r, p_column))
            for r in sig.itertuples(index=False)}


#: Row labels of the per-task figure's significance marks: the seed-level test
#: (``significance.parquet``), then the example-level tests (``example_significance.parquet``).
MARK_ROWS: dict[str, str] = {
    "seed": "seeds: t-test",
    "hier_bootstrap": "examples: bootstrap",
    "mcnemar": "examples: McNemar",
    "aso": "seeds: ASO ε_min",
}


def example_marks(example_significance: pd.DataFrame | None, reference: str | None = None) -> dict[str, dict]:
    """Marks of the example-level tests (:mod:`peftbench.analysis.examples`) per test, each
    ``{(model, task, budget token, method): mark}`` for the rows comparing a method with ``reference``
    (default: the table's ``reference`` column):

    * ``hier_bootstrap``: the paired hierarchical bootstrap's Holm-adjusted p (``p_holm``) as stars,
      ``n.s.`` or ``–`` (:func:`_word`);
    * ``mcnemar``: ``k/n``, the number ``k`` of the ``n`` seeds whose McNemar test rejects at
      Holm-adjusted p < :data:`ALPHA` (``–`` without a test: not an accuracy task);
    * ``aso``: ε_min of Almost Stochastic Order, two decimals (< 0.5: the method is almost
      stochastically better; ``–``: not computed, e.g. without ``deepsig``).

    Returns:
        ``{"hier_bootstrap": {...}, "mcnemar": {...}, "aso": {...}}``; empty dicts when the table is
        None or empty.

    Raises:
        ValueError: a needed column is missing from ``example_significance``.
    """
    out: dict[str, dict] = {t: {} for t in ("hier_bootstrap", "mcnemar", "aso")}
    if example_significance is None or example_significance.empty:
        return out
    need = ["model", "task", "budget", "method", "reference", "test", "p_holm", "eps_min"]
    missing = [c for c in need if c not in example_significance.columns]
    if missing:
        raise ValueError(f"example_significance table: missing column(s) {', '.join(missing)}; "
                         "regenerate it with `snakemake results/tables/example_significance.parquet`")
    ex = example_significance
    ex = ex[ex["reference"] == (reference if reference is not None else ex["reference"])]
    ex = ex.assign(mark_key=[(r.model, r.task, family_token(r.budget), r.method) for r in ex.itertuples(index=False)])
    for r in ex[ex["test"] == "hier_bootstrap"].itertuples(index=False):
        out["hier_bootstrap"][r.mark_key] = _word(float(r.p_holm))
    for key, g in ex[ex["test"] == "mcnemar"].groupby("mark_key", sort=False):
        p = g["p_holm"].astype(float).to_numpy()
        p = p[np.isfinite(p)]
        out["mcnemar"][key] = f"{int(np.sum(p < ALPHA))}/{len(p)}" if len(p) else "–"
    for r in ex[ex["test"] == "aso"].itertuples(index=False):
        eps = float(r.eps_min)
        out["aso"][r.mark_key] = f"{eps:.2f}" if np.isfinite(eps) else "–"
    return out


def review_mark_rows(significance: pd.DataFrame | None, example_significance: pd.DataFrame | None,
                     reference: str | None = None) -> list[tuple[str, dict]]:
    """The per-task figure's rows of marks: ``[(row label, {(model, task, budget, method): mark})]``.

    First the seed-level Holm-adjusted paired t-test (``significance.parquet``,
    :func:`significance_marks` with words), then the example-level tests of
    ``example_significance.parquet`` (:func:`example_marks`: hierarchical bootstrap, McNemar per
    seed, ASO ε_min); labels from :data:`MARK_ROWS`. A table that is None gives no row.
    """
    rows = []
    if significance is not None:
        rows.append((MARK_ROWS["seed"], significance_marks(significance, reference, words=True)))
    if example_significance is not None:
        ex = example_marks(example_significance, reference)
        rows += [(MARK_ROWS[t], ex[t]) for t in ("hier_bootstrap", "mcnemar", "aso")]
    return rows


def _reference(significance: pd.DataFrame | None, reference: str | None) -> str | None:
    if reference:
        return reference
    if significance is not None and not significance.empty and "reference" in significance.columns:
        return str(significance["reference"].iloc[0])
    return None


def _main_metric(task: str) -> str:
    """The task's main metric name (:data:`peftbench.vocab.TASKS`), ``""`` for unknown tasks."""
    return TASKS[task].main_metric if task in TASKS else ""


def _metric_label(metric: str) -> str:
    """``accuracy`` → ``accuracy (%)``; correlations → ``… (×100)``."""
    if not isinstance(metric, str) or not metric:
        return "main metric (%)"
    if metric.startswith("mean of main metrics"):
        return "mean main metric (%)"
    label = metric_info(metric).label
    name = metric.replace("_", " ") if label == metric else label
    unit = "(×100)" if any(k in metric for k in ("correlation", "pearson", "spearman")) else "(%)"
    return f"{name} {unit}"


def _fmt_value(v: float) -> str:
    """Bar annotation: one decimal below 100, none above."""
    return f"{v:.1f}" if abs(v) < 100 else f"{v:.0f}"


def _n_tasks(n: int) -> str:
    return f"{n} task" if n == 1 else f"{n} tasks"


def _fmt_budget(b) -> str:
    """Panel/page label of a budget or family token: ``"0.5% budget"``, ``"r8 budget (LoRA rank 8)"``,
    ``"full (100%)"``, ``"outside r8: 2.3k adapter params (own family)"``."""
    nominal, size = parse_family(b)
    if size is not None:
        return f"{budget_label(b)} (own family)"
    if nominal.is_full:
        return "full (100%)"
    if nominal.is_pct:
        return f"{nominal.token}% budget"
    return f"{nominal.token} budget (LoRA rank {int(nominal.value)})"


def _footer(fig: Figure, text: str, width: int = 190) -> None:
    fig.text(0.005, 0.004, "\n".join(textwrap.wrap(text, width)), fontsize=7, va="bottom", ha="left",
             color="0.25")


def _figure(**kw) -> Figure:
    """A Figure drawn by the Agg canvas (PDF pages go through matplotlib's PDF backend)."""
    fig = Figure(**kw)
    FigureCanvasAgg(fig)
    return fig


def _page(nrows: int, ncols: int, height_per_row: float = 3.6, footer_lines: int = 2,
          width: float = PAGE_W) -> tuple[Figure, np.ndarray]:
    h = height_per_row * nrows + 1.0 + 0.15 * footer_lines
    fig = _figure(figsize=(width, h), layout="constrained")
    fig.get_layout_engine().set(rect=(0, (0.15 * footer_lines + 0.1) / h, 1, 1 - (0.15 * footer_lines + 0.1) / h))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _grid(n: int, max_cols: int = 5) -> tuple[int, int]:
    ncols = max(1, min(max_cols, n))
    return int(math.ceil(n / ncols)), ncols


def _drop_unused(axes: np.ndarray, used: int) -> list:
    flat = list(axes.flat)
    for ax in flat[used:]:
        ax.remove()
    return flat[:used]


def placeholder_figure(title: str, message: str) -> Figure:
    """A one-page figure that says ``message`` (used when an input table has nothing to draw)."""
    fig = _figure(figsize=(PAGE_W, 4.0))
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.text(0.5, 0.55, message, ha="center", va="center", fontsize=14, wrap=True)
    ax.set_title(title, fontsize=12)
    return fig


def _require(df: pd.DataFrame, cols: Iterable[str], what: str, hint: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: missing column(s) {', '.join(missing)} "
                         f"(has: {', '.join(map(str, df.columns))}); {hint}")


_TABLE_HINT = "regenerate it with `snakemake results/tables/{name}` (rule aggregate)"


# --------------------------------------------------------------------------------------------
# Method comparison panels (glue.pdf, {task}.pdf)
# --------------------------------------------------------------------------------------------

def _comparison_panel(ax, st: pd.DataFrame, seeds: pd.DataFrame, marks: dict, methods: list[str],
                      colors: dict, reference: str | None, title: str, ylabel: str, key: tuple,
                      highlight: bool = False, ncols: int = 5,
                      mark_rows: Sequence[tuple[str, dict]] = ()) -> None:
    """Draw one family: x = methods; mean (point) ± CI (bar), seeds (grey dots), value + stars.

    ``mark_rows``: ``[(row label, {(model, task, budget, method): mark})]`` drawn as labelled rows
    of text across the top of the panel, one per test (the per-task figure: seed-level and
    example-level tests); the mean is then annotated without ``marks``' stars.
    """
    st = st.set_index("method")
    trans = blended_transform_factory(ax.transData, ax.transAxes)
    lows, highs = [], []
    # horizontal labels need about 0.55 inch per method
    rotate = 90 if PAGE_W / max(1, ncols) / max(1, len(methods)) < 0.55 else 0
    for i, m in enumerate(methods):
        if m not in st.index or st.at[m, "n_ok"] == 0:
            why = ("no runs" if m not in st.index else
                   "all runs failed" if st.at[m, "n_failed"] > 0 else "all runs missing")
            ax.text(i, 0.03, why, transform=trans, rotation=90, ha="center", va="bottom",
                    fontsize=7, color="0.35")
            continue
        r = st.loc[m]
        mean = 100 * r["mean"]
        lo, hi = 100 * r["ci_low"], 100 * r["ci_high"]
        vals = 100 * seeds.loc[seeds["method"] == m, "value"].to_numpy(dtype=float)
        k = len(vals)
        offs = 0.25 + (np.linspace(-0.07, 0.07, k) if k > 1 else np.zeros(k))
        ax.scatter(i + offs, vals, s=9, color="0.55", zorder=2, linewidths=0)
        if np.isfinite(lo) and np.isfinite(hi):
            # equal seeds give the interval [v, v], which rounding can put a hair past the mean
            ax.errorbar(i, mean, yerr=[[max(mean - lo, 0.0)], [max(hi - mean, 0.0)]], fmt="o", color=colors[m],
                        ms=6, capsize=3, elinewidth=1.5, zorder=3)
        else:
            ax.plot(i, mean, "o", color=colors[m], ms=6, zorder=3)
        top = np.nanmax([mean, hi, *vals])
        bottom = np.nanmin([mean, lo, *vals])
        lows.append(bottom)
        highs.append(top)
        label = f"{mean:.1f}{'' if mark_rows else marks.get((*key, m), '')}"
        ax.annotate(label, (i, top), xytext=(0, 3), textcoords="offset points", ha="center",
                    va="bottom", fontsize=7, rotation=rotate)
    if reference is not None and reference in st.index and st.at[reference, "n_ok"] > 0:
        ax.axhline(100 * st.at[reference, "mean"], ls="--", lw=0.8, color=colors[reference], zorder=1)
    # the mark rows take the top MARK_ROW_H of the axes each; the data stay below them
    free = 1.0 - MARK_ROW_H * (len(mark_rows) + 0.5) if mark_rows else 1.0
    if lows:
        lo, hi = min(lows), max(highs)
        span = max(hi - lo, 1.0)
        bottom, top = lo - 0.08 * span, hi + (0.45 if rotate else 0.2) * span
        ax.set_ylim(bottom, bottom + (top - bottom) / free)
    else:
        ax.set_ylim(0, 100 / free)
    left = -0.6
    if mark_rows:
        left = -1.4  # a column for the row labels
        for j, (row_label, row) in enumerate(mark_rows):
            y = 1.0 - MARK_ROW_H * (j + 0.75)
            ax.text(left + 0.05, y, row_label, transform=trans, ha="left", va="center", fontsize=6,
                    color="0.3", style="italic")
            for i, m in enumerate(methods):
                mark = row.get((*key, m), "") if m != reference else ("reference" if j == 0 else "")
                ax.text(i, y, mark, transform=trans, ha="center", va="center", fontsize=7,
                        color="0.4" if m == reference else "black")
        ax.axhline(ax.get_ylim()[0] + (ax.get_ylim()[1] - ax.get_ylim()[0]) * free, color="0.8", lw=0.6)
    labels = []
    for m in methods:
        if m in st.index:
            r = st.loc[m]
            dagger = "†" if (r["n_failed"] + r["n_missing"]) > 0 else ""
            labels.append(f"{m} (n={int(r['n_ok'])}){dagger}")
        else:
            labels.append(f"{m} (n=0)")
    ax.set_xticks(np.arange(len(methods)), labels=labels, rotation=45, ha="right", fontsize=7)
    for tick, m in zip(ax.get_xticklabels(), methods):
        tick.set_color(colors[m])
    ax.set_xlim(left, len(methods) - 0.4)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(title, fontsize=9, fontweight="bold" if highlight else "normal")
    ax.grid(axis="y", alpha=0.3)
    if highlight:
        ax.set_facecolor("0.95")


def _comparison_legend(fig: Figure, reference: str | None, colors: dict) -> None:
    handles = [Line2D([], [], marker="o", color="0.2", ls="-", ms=6, label="mean ± CI"),
               Line2D([], [], marker="o", color="0.55", ls="", ms=3, label="one seed")]
    if reference is not None and reference in colors:
        handles.append(Line2D([], [], color=colors[reference], ls="--", lw=0.8, label=f"{reference} mean (reference)"))
    fig.legend(handles=handles, loc="outside upper right", ncols=len(handles), fontsize=8, frameon=False)


def _comparison_footer(fig: Figure, opts: StatsOptions, reference: str | None, have_sig: bool) -> None:
    text = (f"Points: mean over seeds of the final-epoch main metric (×100); bars: {opts.confidence:.0%} "
            f"bootstrap CI of the mean ({opts.ci_method}, {opts.resamples:,} resamples, seed {opts.seed}); "
            "no bar with one seed. Grey dots: single seeds. (n=k): seeds that finished; †: some seeds "
            "failed or are missing.")
    if have_sig and reference:
        text += (f" * / ** / ***: Holm-adjusted paired t-test p < 0.05 / 0.01 / 0.001 vs {reference} "
                 "(significance.parquet).")
    else:
        text += " No significance marks (no significance table given)."
    _footer(fig, text)


def _review_footer(fig: Figure, opts: StatsOptions, reference: str | None, have_seed: bool,
                   have_examples: bool) -> None:
    """The per-task figure's footer: what the points are and where each row of marks comes from."""
    text = (f"Points: mean over seeds of the final-epoch main metric (×100); bars: {opts.confidence:.0%} "
            f"bootstrap CI of the mean ({opts.ci_method}, {opts.resamples:,} resamples); grey dots: single seeds; "
            "(n=k): seeds that finished; †: some seeds failed or are missing.")
    vs = f" vs {reference}" if reference else ""
    if have_seed:
        text += (f" Row '{MARK_ROWS['seed']}' (significance.parquet): Holm-adjusted seed-paired t-test{vs}, "
                 "* / ** / *** p < 0.05 / 0.01 / 0.001, n.s. otherwise, – untested (< 2 paired seeds).")
    if have_examples:
        text += (f" Example-level rows (example_significance.parquet){vs}: '{MARK_ROWS['hier_bootstrap']}': "
                 "paired hierarchical bootstrap over seeds and dev examples, Holm-adjusted p as above; "
                 f"'{MARK_ROWS['mcnemar']}': seeds whose McNemar test has Holm-adjusted p < {ALPHA:g} / seeds "
                 f"tested (accuracy tasks); '{MARK_ROWS['aso']}': Almost Stochastic Order ε_min of the "
                 "method over the reference on the seed scores (< 0.5: almost stochastically better).")
    if not (have_seed or have_examples):
        text += " No significance marks (no significance table given)."
    _footer(fig, text)


def _family_methods(st: pd.DataFrame, budget: str, reference: str | None) -> list[str]:
    """The methods one family's panel shows (``st``: one model's :func:`method_stats` rows).

    A budget family shows every method of the model (a method that never ran there says "no
    runs"), except those whose runs at this budget are all outside it (they have a family, and a
    panel, of their own); an off-family shows only its own methods.
    """
    if parse_family(budget)[1] is not None:
        return order_methods(st.loc[st["budget"] == budget, "method"].unique(), reference)
    here = set(st.loc[st["budget"] == budget, "method"])
    moved = set(st.loc[(st["nominal_budget"] == budget) & (st["budget"] != budget), "method"]) - here
    return order_methods([m for m in st["method"].unique() if m not in moved], reference)


def _prepare(runs: pd.DataFrame, opts: StatsOptions) -> tuple[pd.DataFrame, pd.DataFrame]:
    stats_ = method_stats(runs, opts)
    fam = family_runs(runs, opts)
    seeds = fam[fam["status"] == "ok"].rename(columns={opts.value: "value"})
    return stats_, seeds[["model", "task", "budget", "method", "seed", "value"]]


def plot_glue(runs: pd.DataFrame, significance: pd.DataFrame | None = None,
              opts: StatsOptions = StatsOptions(), out: str | Path | None = None,
              reference: str | None = None) -> list[Figure]:
    """Methods × tasks comparison with a GLUE-average panel; one page per ``(model, budget)``.

    Each panel is one task (plus "GLUE avg", shaded): x = methods, point = mean over seeds of
    ``opts.value`` ×100 with its bootstrap CI (:func:`~peftbench.analysis.significance.method_stats`),
    grey dots = seeds, the mean annotated with stars from ``significance`` (Holm-adjusted paired
    t-test vs the reference), dashed line = reference mean. ``full`` appears on every budget page.

    Args:
        runs: ``runs.parquet`` (see :func:`~peftbench.analysis.significance.validate_runs`).
        significance: ``significance.parquet`` or None (no marks).
        opts: bootstrap settings (use the ones the significance rule used).
        out: PDF path to write (and a PNG beside it), or None.
        reference: reference method; default: the ``reference`` column of ``significance``.

    Returns:
        One figure per page.

    Raises:
        ValueError: invalid run table or significance table (missing columns, no rows).
    """
    reference = _reference(significance, reference)
    marks = significance_marks(significance, reference)
    stats_, seeds = _prepare(runs, opts)
    colors = method_colors(stats_["method"].unique())
    figs = []
    for (model, budget), sb in stats_.groupby(["model", "budget"], sort=False):
        methods = _family_methods(stats_[stats_["model"] == model], budget, reference)
        tasks = order_tasks(sb["task"].unique())
        nrows, ncols = _grid(len(tasks))
        fig, axes = _page(nrows, ncols)
        for ax, task in zip(_drop_unused(axes, len(tasks)), tasks):
            st = sb[sb["task"] == task]
            sd = seeds[(seeds["model"] == model) & (seeds["budget"] == budget) & (seeds["task"] == task)]
            metric = st["metric"].iloc[0]
            title = (f"GLUE average ({_n_tasks(int(st['n_tasks'].iloc[0]))})" if task == GLUE_AVG
                     else task_label(task))
            _comparison_panel(ax, st, sd, marks, methods, colors, reference, title,
                              _metric_label(metric), (model, task, budget), task == GLUE_AVG, ncols)
        fig.suptitle(f"{model}: GLUE dev, {_fmt_budget(budget)}", fontsize=11, x=0.01, ha="left")
        _comparison_legend(fig, reference, colors)
        _comparison_footer(fig, opts, reference, bool(marks))
        figs.append(fig)
    if out is not None:
        save_figures(figs, out)
    return figs


def plot_task(runs: pd.DataFrame, task: str, significance: pd.DataFrame | None = None,
              opts: StatsOptions = StatsOptions(), out: str | Path | None = None,
              reference: str | None = None, example_significance: pd.DataFrame | None = None) -> list[Figure]:
    """One task's comparison, the figure a reviewer reads at a glance: one page per model, one
    panel per budget; per method its seeds (grey dots), mean and bootstrap CI (as in
    :func:`plot_glue`), and above them labelled rows of significance marks vs the reference
    (:func:`review_mark_rows`): the seed-level Holm-adjusted paired t-test (``significance``), and
    the example-level tests (``example_significance``: paired hierarchical bootstrap over seeds
    and dev examples, Bouthillier et al. 2021, arXiv:2103.03098; McNemar per seed, as "k/n seeds";
    ASO ε_min, Dror et al. 2019). The footer says which table each row comes from.

    Raises:
        ValueError: ``task`` has no rows in ``runs`` (the message lists the tasks it has), or the
            tables are invalid.
    """
    if "task" in runs.columns and task not in set(runs["task"]):
        raise ValueError(f"runs table has no rows for task {task!r}; tasks present: "
                         f"{', '.join(order_tasks(runs['task'].unique())) or 'none'}")
    reference = _reference(significance, reference)
    marks = significance_marks(significance, reference)
    rows = review_mark_rows(significance, example_significance, reference)
    stats_, seeds = _prepare(runs, opts)
    stats_ = stats_[stats_["task"] == task]
    seeds = seeds[seeds["task"] == task]
    colors = method_colors(stats_["method"].unique())
    figs = []
    for model, sm in stats_.groupby("model", sort=False):
        budgets = order_budgets(sm["budget"].unique())
        nrows, ncols = _grid(len(budgets), 3)
        fig, axes = _page(nrows, ncols, height_per_row=4.2, footer_lines=6 if rows else 2)
        for ax, b in zip(_drop_unused(axes, len(budgets)), budgets):
            st = sm[sm["budget"] == b]
            sd = seeds[(seeds["model"] == model) & (seeds["budget"] == b)]
            _comparison_panel(ax, st, sd, marks, _family_methods(sm, b, reference), colors, reference,
                              _fmt_budget(b), _metric_label(st["metric"].iloc[0]), (model, task, b), ncols=ncols,
                              mark_rows=rows)
        fig.suptitle(f"{model}: {task_label(task)} dev, per trainable-parameter budget", fontsize=11, x=0.01,
                     ha="left")
        _comparison_legend(fig, reference, colors)
        _review_footer(fig, opts, reference, significance is not None, example_significance is not None)
        figs.append(fig)
    if out is not None:
        save_figures(figs, out)
    return figs


# --------------------------------------------------------------------------------------------
# In-domain vs out-of-distribution (ood.pdf)
# --------------------------------------------------------------------------------------------

def ood_columns(runs: pd.DataFrame, ood: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, tuple]]:
    """``runs`` (validated) with one accuracy column per OOD quantity of ``ood`` (``tables/ood.parquet``),
    joined on the run key: ``ood_<set>_accuracy`` for a whole set (its headline row), and
    ``ood_<set>__<breakdown>__<subset>__<gold class>`` for each breakdown row (HANS heuristic ×
    gold label, subcase).

    Returns:
        ``(wide runs, {column: (ood_set, breakdown, subset, gold_class)})``; a breakdown of ``all``
        marks a whole set.

    Raises:
        ValueError: ``ood`` lacks the run key, ``ood_set`` or ``accuracy``; see
            :func:`~peftbench.analysis.significance.validate_runs`.
    """
    from ..budget import Budget
    from ..runkey import KEY_COLUMNS
    from ..vocab import OOD_ALL
    from .significance import ood_value_column, validate_runs

    _require(ood, [*KEY_COLUMNS, "ood_set", "accuracy"], "OOD table", "it is written by the aggregate_ood rule")
    runs = validate_runs(runs)
    o = ood.copy()
    for c in ("breakdown", "subset", "gold_class"):
        o[c] = o[c].astype(str) if c in o.columns else OOD_ALL
    o["budget"] = o["budget"].map(lambda b: Budget.parse(b).token).astype(object)
    o["seed"] = o["seed"].astype(int)
    whole = o["breakdown"] == OOD_ALL
    o["ood_column"] = np.where(whole, [ood_value_column(x) for x in o["ood_set"]],
                         o["ood_set"] + "__" + o["breakdown"] + "__" + o["subset"] + "__" + o["gold_class"])
    what = {r.ood_column: (r.ood_set, r.breakdown, r.subset, r.gold_class)
            for r in o.drop_duplicates("ood_column").itertuples(index=False)}
    keys = list(KEY_COLUMNS)
    wide = o.pivot_table(index=keys, columns="ood_column", values="accuracy", aggfunc="first").reset_index()
    wide.columns.name = None
    return runs.merge(wide, on=keys, how="left"), what


def _value_stats(wide: pd.DataFrame, task: str, column: str, opts: StatsOptions) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`_prepare` (method statistics and seed values) of ``column`` for ``task``'s runs; an
    ok run without a value for it (no OOD row) counts as missing."""
    from dataclasses import replace

    sub = wide[wide["task"] == task].copy()
    if column != opts.value:
        sub.loc[(sub["status"] == "ok") & sub[column].isna(), "status"] = "missing"
    st, sd = _prepare(sub, replace(opts, value=column))
    return st[st["task"] == task], sd[sd["task"] == task]


def plot_ood(runs: pd.DataFrame, ood: pd.DataFrame, significance: pd.DataFrame | None = None,
             ood_significance: pd.DataFrame | None = None, opts: StatsOptions = StatsOptions(),
             out: str | Path | None = None, reference: str | None = None) -> list[Figure]:
    """In-domain vs out-of-distribution accuracy per method.

    One page per ``(model, training task, budget)`` family that has OOD rows: the first panel is
    the task's dev main metric (``opts.value``), then one panel per OOD set (its accuracy over the
    whole set, in the scored classes of :data:`peftbench.vocab.OOD_MAPS`), each with per-seed
    points, the mean and its bootstrap CI (:func:`~peftbench.analysis.significance.method_stats`)
    and stars vs the reference: Holm-adjusted paired t-test from ``significance`` (dev panel) and
    ``ood_significance`` (OOD panels, :func:`~peftbench.analysis.significance.compare_ood`).
    Where HANS breakdown rows exist (McCoy et al. 2019, arXiv:1902.01007), a further page per
    family shows each heuristic (lexical overlap, subsequence, constituent) × gold label
    (entailment, non-entailment), same encoding, no tests.

    Raises:
        ValueError: the OOD table lacks the run key, ``ood_set`` or ``accuracy``; invalid runs table.
    """
    from ..vocab import HANS_HEURISTICS, OOD_SETS

    if ood is None or ood.empty:
        return [placeholder_figure("In-domain vs OOD", "no OOD rows (ood.sets names no set for a task of the grid)")]
    reference = _reference(significance, reference)
    wide, what = ood_columns(runs, ood)
    dev_marks = significance_marks(significance, reference)
    ood_marks = {}
    if ood_significance is not None and not ood_significance.empty:
        for name, g in ood_significance.groupby("ood_set", sort=False):
            ood_marks[name] = significance_marks(g, reference)
    rank = {n: i for i, n in enumerate(OOD_SETS)}
    colors = method_colors(wide["method"].unique())
    figs = []
    tasks = order_tasks(ood["task"].unique())
    for task in tasks:
        dev_st, dev_sd = _value_stats(wide, task, opts.value, opts)
        sets = sorted({w[0] for c, w in what.items() if w[1] == "all"} & set(ood.loc[ood["task"] == task, "ood_set"]),
                      key=lambda n: (rank.get(n, len(rank)), n))
        per_set = {n: _value_stats(wide, task, f"ood_{n}_accuracy", opts) for n in sets}
        hans = [c for c, w in what.items() if w[0] == "hans" and w[1] == "heuristic"] if "hans" in sets else []
        hans_st = {c: _value_stats(wide, task, c, opts) for c in hans}
        for (model, budget), st_b in dev_st.groupby(["model", "budget"], sort=False):
            methods = _family_methods(dev_st[dev_st["model"] == model], budget, reference)
            key = (model, task, budget)
            n = 1 + len(sets)
            nrows, ncols = _grid(n, 4)
            fig, axes = _page(nrows, ncols, height_per_row=4.0)
            axs = _drop_unused(axes, n)
            sd = dev_sd[(dev_sd["model"] == model) & (dev_sd["budget"] == budget)]
            _comparison_panel(axs[0], st_b, sd, dev_marks, methods, colors, reference,
                              f"{task_label(task)} dev (in-domain)", _metric_label(st_b["metric"].iloc[0]), key,
                              highlight=True, ncols=ncols)
            for ax, name in zip(axs[1:], sets):
                st, sd = per_set[name]
                sel = (st["model"] == model) & (st["budget"] == budget)
                sd = sd[(sd["model"] == model) & (sd["budget"] == budget)]
                _comparison_panel(ax, st[sel], sd, ood_marks.get(name, {}), methods, colors, reference,
                                  f"{OOD_SETS[name].label if name in OOD_SETS else name} (OOD)", "accuracy (%)",
                                  key, ncols=ncols)
            fig.suptitle(f"{model}: trained on {task_label(task)}, {_fmt_budget(budget)}: in-domain vs "
                         "out-of-distribution", fontsize=11, x=0.01, ha="left")
            _comparison_legend(fig, reference, colors)
            _footer(fig, f"Points: mean over seeds (×100); bars: {opts.confidence:.0%} bootstrap CI of the mean "
                         f"({opts.ci_method}, {opts.resamples:,} resamples); grey dots: single seeds. First panel: "
                         f"the dev main metric; OOD panels: accuracy in the scored classes of the (task, set) label "
                         f"map (RTE on ANLI: neutral and contradiction scored as not_entailment, a proxy). Stars: "
                         f"Holm-adjusted seed-paired t-test p < 0.05 / 0.01 / 0.001 vs {reference} "
                         f"(significance.parquet for dev, ood_significance.parquet for OOD sets).")
            figs.append(fig)
            if hans:
                cells = [(h, g) for g in OOD_SETS["hans"].classes for h in HANS_HEURISTICS]
                fig, axes = _page(2, 3, height_per_row=3.8)
                for ax, (h, g) in zip(axes.flat, cells):
                    col = f"hans__heuristic__{h}__{g}"
                    if col not in hans_st:
                        ax.set_axis_off()
                        ax.set_title(f"{h.replace('_', ' ')}, {g}: no examples", fontsize=9)
                        continue
                    st, sd = hans_st[col]
                    sel = (st["model"] == model) & (st["budget"] == budget)
                    sd = sd[(sd["model"] == model) & (sd["budget"] == budget)]
                    _comparison_panel(ax, st[sel], sd, {}, methods, colors, reference,
                                      f"HANS {h.replace('_', ' ')}, gold {g}", "accuracy (%)", key, ncols=3)
                    ax.set_ylim(0, 108)  # one scale for the six cells: entailed vs not is the contrast
                    ax.axhline(50, color="0.6", lw=0.6, ls=":")
                fig.suptitle(f"{model}: trained on {task_label(task)}, {_fmt_budget(budget)}: HANS by heuristic "
                             "and gold label", fontsize=11, x=0.01, ha="left")
                _comparison_legend(fig, reference, colors)
                _footer(fig, "HANS (McCoy et al. 2019): each heuristic's examples where it predicts right "
                             "(gold entailment) and wrong (gold non-entailment; a model relying on the heuristic "
                             "fails there). Points: mean over seeds (×100), bars: bootstrap CI, grey dots: seeds; "
                             "dotted line: 50 %; no significance tests on subsets.")
                figs.append(fig)
    if not figs:
        figs = [placeholder_figure("In-domain vs OOD", "no run with OOD rows has a dev result")]
    if out is not None:
        save_figures(figs, out)
    return figs


# --------------------------------------------------------------------------------------------
# Pareto and cost
# --------------------------------------------------------------------------------------------

def _param_pcts(runs: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Per run: ``(effective %, allocated %)`` of backbone parameters.

    Allocated: ``adapter_params`` (the trained tensors; AdaLoRA's ``init_r`` allocation);
    effective: ``effective_adapter_params`` where the method reports it (AdaLoRA after pruning,
    gates left open …), else ``adapter_params``. Without parameter counts, ``trainable_pct`` for
    both.

    Raises:
        ValueError: none of those columns.
    """
    if {"adapter_params", "backbone_params"} <= set(runs.columns):
        backbone = pd.to_numeric(runs["backbone_params"], errors="coerce").astype(float)
        alloc = pd.to_numeric(runs["adapter_params"], errors="coerce").astype(float)
        eff = alloc
        if "effective_adapter_params" in runs.columns:
            e = pd.to_numeric(runs["effective_adapter_params"], errors="coerce").astype(float)
            eff = e.where(np.isfinite(e), alloc)
        return 100.0 * eff / backbone, 100.0 * alloc / backbone
    if "trainable_pct" in runs.columns:
        pct = pd.to_numeric(runs["trainable_pct"], errors="coerce").astype(float)
        return pct, pct
    raise ValueError("runs table: needs columns adapter_params and backbone_params (or trainable_pct) "
                     "for the Pareto plot; " + _TABLE_HINT.format(name="runs.parquet"))


def _finite_mean(v: pd.Series) -> float:
    x = v.to_numpy(dtype=float)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else math.nan


def _short_budget(b) -> str:
    """Point label of a budget or family token: ``0.2%``, ``r8``, ``r8, own family``."""
    nominal, size = parse_family(b)
    if size is not None:
        return f"{nominal.token}, own family"
    return f"{nominal.token}%" if nominal.is_pct else nominal.token


def pareto_front(x: Sequence[float], y: Sequence[float]) -> np.ndarray:
    """Indices of the points not dominated by another (smaller-or-equal x and larger y), by x."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    order = np.lexsort((-y, x))
    front, best = [], -np.inf
    for i in order:
        if y[i] > best:
            front.append(i)
            best = y[i]
    return np.asarray(front, dtype=int)


def plot_pareto(runs: pd.DataFrame, opts: StatsOptions = StatsOptions(), out: str | Path | None = None) -> list[Figure]:
    """Final effective adapter parameters (% of backbone, log x) vs GLUE average (%), one point per
    method and budget family, one page per model.

    x: mean over the method's runs in the family of the **final effective** adapter parameters as %
    of backbone parameters (``effective_adapter_params`` where the method reports it — AdaLoRA
    after pruning to its target rank —, else ``adapter_params``); the **allocated** count
    (``adapter_params``: the tensors trained, AdaLoRA's initial rank, 1.35–1.8× its budget) is a
    hollow second marker joined to the point by a dotted line, drawn where it differs from the
    effective count by more than 1 %. y: GLUE-average mean over seeds ×100 with its bootstrap CI
    (:func:`~peftbench.analysis.significance.method_stats`, ``task == "glue_avg"``). Points of one
    method are joined across budgets; runs outside their budget family
    (:func:`~peftbench.analysis.significance.budget_families`) are drawn at their real size with a
    diamond and labelled "own family"; the dashed step line is the Pareto front over the effective
    counts. Method/family pairs whose GLUE average is undefined (a task failed or is missing for
    every seed) are listed in the footer instead of drawn.

    Raises:
        ValueError: invalid run table, or no parameter-count columns.
    """
    stats_ = method_stats(runs, opts)
    fam = family_runs(runs, opts)
    fam = fam[fam["task"] != GLUE_AVG]
    eff, alloc = _param_pcts(fam)
    fam = fam.assign(_eff=eff, _alloc=alloc)
    colors = method_colors(stats_["method"].unique())
    glue = stats_[stats_["task"] == GLUE_AVG]
    full_like = budget_free_methods(fam)
    figs = []
    for model, rm in fam.groupby("model", sort=False):
        fig, axes = _page(1, 1, height_per_row=6.0)
        ax = axes[0, 0]
        pts, skipped = [], []
        # budget-free methods are copied into every budget family with identical statistics: once
        free = rm["method"].isin(full_like)
        if free.any():
            rm = rm[~free | (rm["budget"] == order_budgets(rm.loc[free, "budget"].unique())[0])]
        for (method, b), g in rm.groupby(["method", "budget"], sort=False):
            row = glue[(glue["model"] == model) & (glue["method"] == method) & (glue["budget"] == b)]
            x, xa = _finite_mean(g["_eff"]), _finite_mean(g["_alloc"])
            label = "" if method in full_like else _short_budget(b)
            if row.empty or row["n_ok"].iloc[0] == 0 or not np.isfinite(x):
                skipped.append(f"{method} {label}".strip())
                continue
            r = row.iloc[0]
            pts.append(dict(method=method, budget=b, label=label, x=x, alloc=xa, y=100 * r["mean"],
                            lo=100 * r["ci_low"], hi=100 * r["ci_high"], n=int(r["n_ok"]),
                            match=bool(r["budget_match"])))
        p = pd.DataFrame(pts, columns=["method", "budget", "label", "x", "alloc", "y", "lo", "hi", "n", "match"])
        any_alloc = any_off = False
        for method in order_methods(p["method"].unique()):
            q = p[p["method"] == method].sort_values("x")
            c = colors[method]
            yerr = np.vstack([q["y"] - q["lo"], q["hi"] - q["y"]])
            # rounding can put a degenerate interval [v, v] a hair past the mean: clip at 0
            yerr = np.clip(np.where(np.isfinite(yerr), yerr, 0.0), 0.0, None)
            ax.errorbar(q["x"], q["y"], yerr=yerr, fmt="o-", color=c, ms=7, capsize=3, lw=1.2,
                        label=method)
            for r in q.itertuples():
                if not r.match:
                    any_off = True
                    ax.plot([r.x], [r.y], "D", color=c, ms=9, mfc="none", mew=1.4, zorder=4, gid=f"off:{method}")
                if np.isfinite(r.alloc) and abs(r.alloc - r.x) > 0.01 * r.x:
                    any_alloc = True
                    ax.plot([r.x, r.alloc], [r.y, r.y], ":", color=c, lw=1.0, zorder=2)
                    ax.plot([r.alloc], [r.y], "o", color=c, ms=7, mfc="white", mew=1.4, zorder=3,
                            gid=f"allocated:{method}")
                ax.annotate(f"{r.y:.1f} ({r.label})" if r.label else f"{r.y:.1f}",
                            (r.x, r.y), xytext=(5, 4), textcoords="offset points", fontsize=7, color=c)
        if len(p):
            f = p.iloc[pareto_front(p["x"], p["y"])]
            ax.step(f["x"], f["y"], where="post", ls="--", color="0.3", lw=0.9, label="Pareto front", zorder=0)
            ax.set_xscale("log")
            ax.margins(x=0.15, y=0.15)
        else:
            ax.text(0.5, 0.5, "no method has a complete GLUE average", transform=ax.transAxes,
                    ha="center", va="center", fontsize=12)
        ax.set_xlabel("final effective adapter parameters (% of backbone parameters, log scale)")
        tasks = glue.loc[glue["model"] == model, "tasks"]
        ax.set_ylabel("GLUE average of main metrics (%)")
        ax.grid(True, which="both", alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        if any_alloc:
            handles.append(Line2D([], [], marker="o", color="0.3", mfc="white", ls=":", ms=7,
                                  label="allocated parameters (e.g. AdaLoRA's initial rank)"))
        if any_off:
            handles.append(Line2D([], [], marker="D", color="0.3", mfc="none", ls="", ms=8,
                                  label="outside its budget family (own size)"))
        ax.legend(handles=handles, fontsize=8, loc="best")
        fig.suptitle(f"{model}: accuracy vs trainable parameters", fontsize=11, x=0.01, ha="left")
        text = (f"Points: GLUE average (mean over seeds of the per-seed mean main metric over tasks: "
                f"{tasks.iloc[0] if len(tasks) else '-'}), bars: {opts.confidence:.0%} bootstrap CI, at the final "
                "effective adapter parameters (effective_adapter_params where the method reports it, else all "
                "adapter parameters). Hollow circles joined by a dotted line: the parameters allocated (trained "
                "tensors) where they differ. Diamonds: runs outside ±10 % of their budget or capacity-limited, "
                "in a family of their own size. Labels: value (budget).")
        if skipped:
            text += " Not drawn (GLUE average undefined, a task failed or is missing): " + ", ".join(skipped) + "."
        _footer(fig, text)
        figs.append(fig)
    if out is not None:
        save_figures(figs, out)
    return figs


def plot_cost(runs: pd.DataFrame, out: str | Path | None = None) -> list[Figure]:
    """Training cost per method and budget: one page per model with two panels.

    Left: training wall time per run (s), the mean over tasks of the per-task mean over seeds of
    ``train_s`` (ok runs). Right: peak memory (MiB), the maximum ``peak_mem_mib`` over ok runs.
    Bars are grouped by method, one bar per budget (``full`` once), values annotated; the footer
    counts the failed and missing runs left out.

    Raises:
        ValueError: missing ``train_s``/``peak_mem_mib`` columns, or no ok runs.
    """
    _require(runs, ["model", "task", "method", "budget", "status", "train_s", "peak_mem_mib"],
             "runs table", _TABLE_HINT.format(name="runs.parquet"))
    ok = runs[runs["status"] == "ok"]
    if ok.empty:
        raise ValueError("runs table: no run with status 'ok', nothing to plot in cost.pdf")
    ok = ok.assign(budget=ok["budget"].map(family_token))
    figs = []
    for model, rm in ok.groupby("model", sort=False):
        colors_b = {}
        per_task = rm.groupby(["method", "budget", "task"])["train_s"].mean()
        t = per_task.groupby(["method", "budget"]).mean()
        mem = rm.groupby(["method", "budget"])["peak_mem_mib"].max()
        ntask = per_task.groupby(["method", "budget"]).size()
        methods = order_methods(rm["method"].unique())
        budgets = [b for b in order_budgets(rm["budget"].unique()) if b != FULL_TOKEN]
        budgets_all = budgets + ([FULL_TOKEN] if (rm["budget"] == FULL_TOKEN).any() else [])
        cmap = colormaps["viridis"]
        for i, b in enumerate(budgets):
            colors_b[b] = cmap(0.15 + 0.7 * i / max(1, len(budgets) - 1))
        colors_b[FULL_TOKEN] = "0.45"
        fig, axes = _page(1, 2, height_per_row=5.0)
        width = 0.8 / max(1, len(budgets))
        for ax, series, ylabel, fmt in ((axes[0, 0], t, "training time per run (s)", _fmt_value),
                                        (axes[0, 1], mem, "peak memory (MiB)", _fmt_value)):
            for i, m in enumerate(methods):
                bs = [b for b in budgets_all if (m, b) in series.index and np.isfinite(series.loc[(m, b)])]
                for j, b in enumerate(bs):
                    x = i + (j - (len(bs) - 1) / 2) * width
                    v = float(series.loc[(m, b)])
                    ax.bar(x, v, width=width * 0.95, color=colors_b[b])
                    ax.annotate(fmt(v), (x, v), xytext=(0, 2), textcoords="offset points",
                                ha="center", va="bottom", fontsize=6.5, rotation=90)
            ax.set_xticks(np.arange(len(methods)), labels=methods, rotation=45, ha="right", fontsize=8)
            ax.set_ylabel(ylabel)
            ax.margins(y=0.18)
            ax.grid(axis="y", alpha=0.3)
            ax.legend(handles=[Patch(color=colors_b[b], label=_fmt_budget(b)) for b in budgets_all],
                      fontsize=7, title="budget", title_fontsize=7)
        axes[0, 0].set_title("training wall time (mean over tasks of the mean over seeds)", fontsize=9)
        axes[0, 1].set_title("peak memory (max over runs)", fontsize=9)
        fig.suptitle(f"{model}: training cost per method", fontsize=11, x=0.01, ha="left")
        nt = ", ".join(f"{m} {_short_budget(b)}: {n}" for (m, b), n in ntask.items() if n != ntask.max())
        dev = ", ".join(sorted(map(str, rm["device"].unique()))) if "device" in rm.columns else "?"
        rest = runs.loc[(runs["model"] == model) & (runs["status"] != "ok"), "status"].value_counts()
        left_out = (" Not counted: " + ", ".join(f"{n} {st} run{'' if n == 1 else 's'}" for st, n in rest.items())
                    + "." if len(rest) else "")
        _footer(fig, f"Only runs with status ok.{left_out} Device: {dev}. Tasks averaged per bar: "
                f"{int(ntask.max())}" + (f" (fewer for {nt})." if nt else "."))
        figs.append(fig)
    if out is not None:
        save_figures(figs, out)
    return figs


# --------------------------------------------------------------------------------------------
# Learning curves, ranks, spectra, gradient norms
# --------------------------------------------------------------------------------------------

def plot_curves(curves: pd.DataFrame, out: str | Path | None = None, reference: str | None = None) -> list[Figure]:
    """Dev main metric (×100) and training loss vs training step, mean over seeds with a ±1 SD
    band, per task.

    One page per ``(model, budget)`` (``full``, budget 100, appears on every budget page), one
    panel per task for the dev metric (the ``kind == "eval"`` rows with a finite ``dev_main``) and,
    below it, one for the training loss (the ``kind == "train"`` rows with a finite ``loss``: each
    logged interval's mean loss; no loss row when no run logged one), one line per method; with
    one seed there is no band. Runs evaluated after their last epoch only (``eval_every_epoch:
    false``) give one dev point each, which the footer says.

    Raises:
        ValueError: missing columns, or no eval rows with a finite ``dev_main``.
    """
    _require(curves, ["model", "task", "method", "budget", "seed", "step", "kind", "dev_main"],
             "curves table", _TABLE_HINT.format(name="curves.parquet"))
    ev = curves[(curves["kind"] == "eval") & np.isfinite(curves["dev_main"].astype(float))]
    if ev.empty:
        raise ValueError("curves table: no eval rows with a finite dev_main; were the runs evaluated?")
    tr = (curves[(curves["kind"] == "train") & np.isfinite(curves["loss"].astype(float))]
          if "loss" in curves.columns else curves.iloc[:0])
    both = budget_families(pd.concat([ev, tr], ignore_index=True))
    ev, tr = both[both["kind"] == "eval"], both[both["kind"] == "train"]
    colors = method_colors(ev["method"].unique())
    figs = []
    models, budgets = list(ev["model"].unique()), order_budgets(ev["budget"].unique())
    pages = ev.groupby(["model", "budget"], sort=False)
    for model, budget in sorted(pages.groups, key=lambda k: (models.index(k[0]), budgets.index(k[1]))):
        g = pages.get_group((model, budget))
        gl = tr[(tr["model"] == model) & (tr["budget"] == budget)]
        tasks = order_tasks(g["task"].unique())
        nrows, ncols = _grid(len(tasks), 3)
        fig, axes = _page(2 * nrows if len(gl) else nrows, ncols, height_per_row=3.3)
        dev_axes = _drop_unused(axes[0::2] if len(gl) else axes, len(tasks))
        loss_axes = _drop_unused(axes[1::2], len(tasks)) if len(gl) else [None] * len(tasks)
        for ax, lax, task in zip(dev_axes, loss_axes, tasks):
            gt = g[g["task"] == task]
            for m in order_methods(gt["method"].unique(), reference):
                n = int(gt.loc[gt["method"] == m, "seed"].nunique())
                _mean_line(ax, gt[gt["method"] == m], "dev_main", 100.0, colors[m], f"{m} (n={n})",
                           annotate=True)
                if lax is not None:
                    _mean_line(lax, gl[(gl["task"] == task) & (gl["method"] == m)], "loss", 1.0, colors[m],
                               f"{m} (n={n})", annotate=False)
            ax.set_ylabel("dev " + _metric_label(_main_metric(task)), fontsize=8)
            ax.set_title(task_label(task), fontsize=9)
            for a in (ax, lax):
                if a is None:
                    continue
                a.margins(x=0.08)
                a.set_xlabel("training step", fontsize=8)
                a.tick_params(labelsize=7)
                a.grid(alpha=0.3)
                a.legend(fontsize=6.5, loc="lower right" if a is ax else "upper right")
            if lax is not None:
                lax.set_ylabel("training loss", fontsize=8)
                lax.set_title(f"{task_label(task)}: training loss", fontsize=9)
        one_eval = bool((g.groupby(["task", "method", "seed"])["step"].nunique() == 1).all())
        fig.suptitle(f"{model}: learning curves, {_fmt_budget(budget)}", fontsize=11, x=0.01, ha="left")
        _footer(fig, "Lines: mean over seeds of the dev main metric at each evaluation (×100, last value "
                     "annotated)" + (" and of the training loss of each logged interval" if len(gl) else "")
                + "; band: ±1 standard deviation over seeds (none with one seed); n: seeds."
                + (" One evaluation per run, after its last epoch (eval_every_epoch: false)." if one_eval else ""))
        figs.append(fig)
    figs += _open_gate_pages(curves, reference)
    if out is not None:
        save_figures(figs, out)
    return figs


def _mean_line(ax, rows: pd.DataFrame, column: str, scale: float, color, label: str, *, annotate: bool,
               markers: bool = True) -> None:
    """Draw ``scale`` × the mean over seeds of ``column`` per step, with a ±1 SD band where at
    least two seeds share a step (with ``markers``, a marker per point below 30 points; the last
    value annotated with ``annotate``)."""
    a = rows.groupby("step")[column].agg(["mean", "std", "count"]).sort_index()
    x, y = a.index.to_numpy(), scale * a["mean"].to_numpy(dtype=float)
    ax.plot(x, y, "-", marker="." if markers and len(x) < 30 else None, color=color, lw=1.3, label=label)
    if annotate:
        ax.annotate(f"{y[-1]:.1f}", (x[-1], y[-1]), xytext=(3, 0), textcoords="offset points",
                    fontsize=6.5, color=color, va="center")
    sd = scale * a["std"].to_numpy(dtype=float)
    band = (a["count"].to_numpy() >= 2) & np.isfinite(sd)
    if band.any():
        ax.fill_between(x, y - np.where(band, sd, 0), y + np.where(band, sd, 0),
                        color=color, alpha=0.18, lw=0, where=band)


def _open_gate_pages(curves: pd.DataFrame, reference: str | None) -> list[Figure]:
    """Pages of ⟨k⟩ (``mean_k``: open gates per matrix under the inference mask, logged by the
    gated spectral methods at every logged training step) vs training step: one page per
    ``(model, budget)``, one panel per task, one line per method (mean over seeds, ±1 SD band).
    No page when no run logged ``mean_k``."""
    if "mean_k" not in curves.columns:
        return []
    tr = curves[(curves["kind"] == "train") & np.isfinite(pd.to_numeric(curves["mean_k"], errors="coerce"))]
    if tr.empty:
        return []
    colors = method_colors(curves["method"].unique())
    figs = []
    for (model, budget), g in tr.groupby(["model", "budget"], sort=False):
        tasks = order_tasks(g["task"].unique())
        nrows, ncols = _grid(len(tasks), 3)
        fig, axes = _page(nrows, ncols, height_per_row=3.3)
        for ax, task in zip(_drop_unused(axes, len(tasks)), tasks):
            gt = g[g["task"] == task]
            for m in order_methods(gt["method"].unique(), reference):
                n = int(gt.loc[gt["method"] == m, "seed"].nunique())
                _mean_line(ax, gt[gt["method"] == m], "mean_k", 1.0, colors[m], f"{m} (n={n})",
                           annotate=False, markers=False)
            ax.set_title(task_label(task), fontsize=9)
            ax.set_xlabel("training step", fontsize=8)
            ax.set_ylabel("⟨k⟩ open gates per matrix", fontsize=8)
            ax.set_ylim(bottom=0)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6.5, loc="upper right")
        fig.suptitle(f"{model}: open spectral gates during training, {_fmt_budget(budget)}", fontsize=11,
                     x=0.01, ha="left")
        _footer(fig, "⟨k⟩: mean number of open gates per adapted matrix under the deterministic inference mask "
                     "(1[logit > 0]), at each logged training step; mean over seeds, band ±1 SD; n: seeds.")
        figs.append(fig)
    return figs


def allocating_methods(ranks: pd.DataFrame) -> list[str]:
    """Methods whose rank (or active-gate count) differs between modules within at least one run."""
    if ranks.empty:
        return []
    per_run = ranks.groupby(["model", "task", "method", "budget", "seed"])["rank"].nunique()
    return order_methods({k[2] for k, v in per_run.items() if v > 1})


def _kinds(values: Iterable[str]) -> list[str]:
    vs = list(dict.fromkeys(values))
    return [k for k in TARGET_KINDS if k in vs] + sorted(k for k in vs if k not in TARGET_KINDS)


def plot_ranks(ranks: pd.DataFrame, out: str | Path | None = None) -> list[Figure]:
    """Heatmaps of the mean rank / active gates per layer × module kind, for allocating methods.

    One page per ``(model, method, budget)`` of every method of :func:`allocating_methods`, one
    panel per task; cell = mean over seeds (and over modules sharing a layer and kind) of
    ``rank``, annotated. A table without an allocating method gives one page saying
    "no method allocates ranks in this run".

    Raises:
        ValueError: missing columns in a non-empty table.
    """
    if not ranks.empty:  # an empty table may come without the value columns
        _require(ranks, ["model", "task", "method", "budget", "seed", "layer", "kind", "rank"],
                 "ranks table", _TABLE_HINT.format(name="ranks.parquet"))
    methods = allocating_methods(ranks)
    if not methods:
        fig = placeholder_figure("Per-module rank allocation", "no method allocates ranks in this run")
        figs = [fig]
    else:
        figs = []
        sub = ranks[ranks["method"].isin(methods)]
        for (model, method, budget), g in sub.groupby(["model", "method", "budget"], sort=False):
            tasks = order_tasks(g["task"].unique())
            kinds = _kinds(g["kind"])
            layers = sorted(g["layer"].unique())
            nrows, ncols = _grid(len(tasks), 3)
            fig, axes = _page(nrows, ncols, height_per_row=max(3.0, 0.28 * len(layers) + 1.2))
            vmax = float(g["rank"].max()) if np.isfinite(g["rank"].max()) else 1.0
            im = None
            for ax, task in zip(_drop_unused(axes, len(tasks)), tasks):
                gt = g[g["task"] == task]
                mat = (gt.groupby(["layer", "kind"])["rank"].mean().unstack("kind")
                       .reindex(index=layers, columns=kinds))
                im = ax.imshow(mat.to_numpy(dtype=float), aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
                for (i, j), v in np.ndenumerate(mat.to_numpy(dtype=float)):
                    if np.isfinite(v):
                        ax.text(j, i, f"{v:.1f}" if v != round(v) else f"{v:.0f}", ha="center",
                                va="center", fontsize=6.5, color="white" if v < 0.6 * vmax else "black")
                ax.set_xticks(range(len(kinds)), labels=kinds, rotation=35, ha="right", fontsize=7)
                ax.set_yticks(range(len(layers)), labels=[str(x) for x in layers], fontsize=7)
                ax.set_xlabel("module kind", fontsize=8)
                ax.set_ylabel("layer", fontsize=8)
                ax.set_title(f"{task_label(task)} (n={gt['seed'].nunique()} seeds)", fontsize=9)
            fig.colorbar(im, ax=list(axes.flat[:len(tasks)]), label="rank / active gates (mean over seeds)",
                         shrink=0.9)
            fig.suptitle(f"{model}: {method} rank allocation, {_fmt_budget(budget)}", fontsize=11, x=0.01, ha="left")
            _footer(fig, "Cell: mean over seeds of the final rank (or number of active gates) of the "
                         "module at that layer and kind; blank: module not adapted.")
            figs.append(fig)
    if out is not None:
        save_figures(figs, out)
    return figs


def plot_spectrum(spectrum: pd.DataFrame, out: str | Path | None = None) -> list[Figure]:
    """Singular-value spectra and cumulative energy of the pretrained weights, per module kind.

    One page per model: top row ``sigma`` vs singular-value index (1-based, log y), bottom row
    cumulative energy (% of the squared singular values within the stored top-k) vs index; one
    line per layer, coloured by layer (colour bar).

    Raises:
        ValueError: missing columns or an empty table.
    """
    _require(spectrum, ["model", "module", "layer", "kind", "index", "sigma", "energy"],
             "spectrum table", "regenerate it with `snakemake results/svd/<model>/spectrum.parquet` (rule svd)")
    if spectrum.empty:
        raise ValueError("spectrum table: no rows; rerun the svd rule")
    figs = []
    for model, g in spectrum.groupby("model", sort=False):
        kinds = _kinds(g["kind"])
        fig, axes = _page(2, len(kinds), height_per_row=3.2, width=max(PAGE_W, 2.4 * len(kinds)))
        layers = sorted(g["layer"].unique())
        cmap = colormaps["viridis"]
        norm = Normalize(vmin=min(layers), vmax=max(max(layers), min(layers) + 1))
        for j, kind in enumerate(kinds):
            gk = g[g["kind"] == kind]
            top, bot = axes[0, j], axes[1, j]
            for module, gm in gk.groupby("module", sort=False):
                gm = gm.sort_values("index")
                c = cmap(norm(gm["layer"].iloc[0]))
                top.plot(gm["index"] + 1, gm["sigma"], color=c, lw=1)
                bot.plot(gm["index"] + 1, 100 * gm["energy"], color=c, lw=1)
            top.set_yscale("log")
            top.set_title(kind, fontsize=9)
            top.set_ylabel("singular value σ", fontsize=8)
            bot.axhline(90, ls=":", color="0.3", lw=0.8)
            bot.set_ylabel("cumulative energy (%)", fontsize=8)
            bot.set_xlabel("singular value index", fontsize=8)
            bot.set_ylim(0, 101)
            for ax in (top, bot):
                ax.tick_params(labelsize=7)
                ax.grid(alpha=0.3)
        sm = ScalarMappable(norm=norm, cmap=cmap)
        fig.colorbar(sm, ax=list(axes.flat), label="layer", shrink=0.8)
        fig.legend(handles=[Line2D([], [], ls=":", color="0.3", label="90% energy")],
                   loc="outside upper right", fontsize=8, frameon=False)
        fig.suptitle(f"{model}: singular-value spectra of the pretrained weights", fontsize=11, x=0.01, ha="left")
        _footer(fig, "Energy: cumulative sum of σ² up to the index over the sum within the stored top-k "
                     "singular values (spectrum.parquet). One line per module (layer).")
        figs.append(fig)
    if out is not None:
        save_figures(figs, out)
    return figs


def _group_norms(gradnorms: pd.DataFrame) -> pd.DataFrame:
    """One norm per ``(model, task, method, budget, seed, step, group)`` from a gradnorms table.

    :func:`peftbench.train.gradient_norms` logs per-layer rows (``layer`` ≥ 0) *and* the group's
    own row (``layer`` −1, the norm over all its layers; also the only row of head, embeddings,
    other and :data:`~peftbench.vocab.GRAD_TOTAL`). The group row is used where it exists; only a
    group logged without one (tables from older runs) gets ``sqrt(Σ_layers grad_norm²)``, exact for
    Frobenius norms of disjoint parameter sets. Summing both kinds would count every layer twice
    (a norm √2 too large).

    Returns:
        the key columns plus ``norm``.
    """
    keys = ["model", "task", "method", "budget", "seed", "step", "group"]
    layer = gradnorms["layer"].astype(int)
    whole = gradnorms[layer < 0].groupby(keys)["grad_norm"].first().astype(float).rename("norm")
    per_layer = (gradnorms[layer >= 0].assign(sq=lambda d: d["grad_norm"].astype(float) ** 2)
                 .groupby(keys)["sq"].sum().pow(0.5).rename("norm"))
    per_layer = per_layer[~per_layer.index.isin(whole.index)]
    return pd.concat([whole, per_layer]).reset_index()


def plot_gradnorms(gradnorms: pd.DataFrame, out: str | Path | None = None) -> list[Figure]:
    """Per-group gradient norm vs training step; one page per ``(model, task, budget)``, one panel
    per method, one line per group (:data:`~peftbench.vocab.GRAD_GROUPS`, then
    :data:`~peftbench.vocab.GRAD_TOTAL`).

    The group norm at a step comes from :func:`_group_norms` (the logged group row, never added to its
    per-layer rows); lines show its mean over seeds and the band ±1 SD (none with one seed); log y.
    An empty table gives one page saying no gradient norms were logged.

    Raises:
        ValueError: missing columns in a non-empty table.
    """
    if not gradnorms.empty:  # an empty table may come without the value columns
        _require(gradnorms, ["model", "task", "method", "budget", "seed", "step", "group", "layer", "grad_norm"],
                 "gradnorms table", _TABLE_HINT.format(name="gradnorms.parquet"))
    if gradnorms.empty:
        figs = [placeholder_figure("Per-group gradient norms",
                                   "no gradient norms were logged in this run (gradnorms.parquet is empty)")]
    else:
        figs = []
        known = GRAD_GROUPS + (GRAD_TOTAL,)
        present = set(gradnorms["group"])
        groups_all = [g for g in known if g in present] + sorted(present - set(known))
        gcolors = {g: _PALETTE[i % len(_PALETTE)] for i, g in enumerate(groups_all)}
        g2 = _group_norms(gradnorms)
        for (model, task, budget), g in g2.groupby(["model", "task", "budget"], sort=False):
            methods = order_methods(g["method"].unique())
            nrows, ncols = _grid(len(methods), 3)
            fig, axes = _page(nrows, ncols, height_per_row=3.3)
            for ax, m in zip(_drop_unused(axes, len(methods)), methods):
                gm = g[g["method"] == m]
                for grp in [x for x in groups_all if x in set(gm["group"])]:
                    a = gm[gm["group"] == grp].groupby("step")["norm"].agg(["mean", "std", "count"]).sort_index()
                    x, y = a.index.to_numpy(), a["mean"].to_numpy()
                    ax.plot(x, y, color=gcolors[grp], lw=1.2, label=grp)
                    band = (a["count"].to_numpy() >= 2) & np.isfinite(a["std"].to_numpy())
                    if band.any():
                        sd = np.where(band, a["std"].to_numpy(), 0.0)
                        ax.fill_between(x, np.clip(y - sd, 1e-12, None), y + sd, color=gcolors[grp],
                                        alpha=0.18, lw=0, where=band)
                ax.set_yscale("log")
                ax.set_title(f"{m} (n={gm['seed'].nunique()} seeds)", fontsize=9)
                ax.set_xlabel("training step", fontsize=8)
                ax.set_ylabel("gradient L2 norm", fontsize=8)
                ax.tick_params(labelsize=7)
                ax.grid(alpha=0.3, which="both")
                ax.legend(fontsize=7, title="parameter group", title_fontsize=7)
            fig.suptitle(f"{model}: {task_label(task)} gradient norms per parameter group, "
                         f"{_fmt_budget(budget)}", fontsize=11, x=0.01, ha="left")
            _footer(fig, "Group norm: the group's logged norm over all its parameters (total: every trainable "
                         "parameter); line: mean over seeds, band: ±1 SD over seeds (none with one seed).")
            figs.append(fig)
    if out is not None:
        save_figures(figs, out)
    return figs


#: Blocks of the layer × step heatmap (the per-layer groups of the gradient-norm log).
HEATMAP_BLOCKS = ("attention", "mlp")


def layer_step_grid(gradnorms: pd.DataFrame, block: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The per-layer norms of ``block`` as a ``(layers, steps)`` grid, mean over the seeds.

    Args:
        gradnorms: rows of one method (any seeds) with ``step``, ``group``, ``layer`` (≥ 0 rows
            are used), ``grad_norm``.
        block: ``attention`` or ``mlp``.

    Returns:
        ``(layers, steps, grid)``: sorted layer indices ``(L,)``, sorted logged steps ``(S,)`` and
        ``(L, S)`` float64 mean norms (NaN where a cell was not logged; 0 where the block was frozen).
    """
    sub = gradnorms[(gradnorms["group"] == block) & (gradnorms["layer"].astype(int) >= 0)]
    piv = sub.pivot_table(index="layer", columns="step", values="grad_norm", aggfunc="mean").sort_index()
    piv = piv.reindex(sorted(piv.columns), axis=1)
    return piv.index.to_numpy(), piv.columns.to_numpy(), piv.to_numpy(dtype=np.float64)


def plot_gradheatmap(gradnorms: pd.DataFrame, out: str | Path | None = None) -> list[Figure]:
    """Seed 003's layer × step heatmap of gradient norms: one page per ``(model, task, budget)``,
    one row of panels per method, one panel per block (attention, mlp; :func:`layer_step_grid`):
    colour = log10 of the per-layer gradient L2 norm (mean over seeds), x = training step, y = layer.
    Frozen cells (norm exactly 0, e.g. a phase that trains the other block) are drawn grey. An
    empty table, or one without per-layer rows, gives one page saying so.

    Raises:
        ValueError: missing columns in a non-empty table.
    """
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import MaxNLocator

    if not gradnorms.empty:
        _require(gradnorms, ["model", "task", "method", "budget", "seed", "step", "group", "layer", "grad_norm"],
                 "gradnorms table", _TABLE_HINT.format(name="gradnorms.parquet"))
    per_layer = gradnorms[gradnorms["layer"].astype(int) >= 0] if not gradnorms.empty else gradnorms
    if per_layer.empty:
        figs = [placeholder_figure("Gradient norms per layer and step",
                                   "no per-layer gradient norms were logged in this run")]
    else:
        figs = []
        for (model, task, budget), g in per_layer.groupby(["model", "task", "budget"], sort=False):
            methods = order_methods(g["method"].unique())
            fig, axes = _page(len(methods), len(HEATMAP_BLOCKS), height_per_row=2.6)
            vals = g["grad_norm"].astype(float)
            pos = vals[vals > 0]
            norm = LogNorm(vmin=float(pos.min()), vmax=float(pos.max())) if len(pos) else None
            image = None
            for row, m in zip(axes, methods):
                gm = g[g["method"] == m]
                for ax, block in zip(row, HEATMAP_BLOCKS):
                    layers, steps, grid = layer_step_grid(gm, block)
                    ax.set_title(f"{m}: {block} (n={gm['seed'].nunique()} seeds)", fontsize=9)
                    if grid.size == 0:
                        ax.text(0.5, 0.5, f"no {block} adapter", ha="center", va="center", fontsize=9,
                                transform=ax.transAxes)
                        ax.set_xticks([])
                        ax.set_yticks([])
                        continue
                    ax.set_facecolor("0.85")  # frozen (0) and unlogged cells
                    masked = np.ma.masked_where(~(grid > 0), grid)
                    image = ax.pcolormesh(_edges(steps), _edges(layers), masked, norm=norm, cmap="viridis",
                                          shading="flat")
                    ax.set_xlabel("training step", fontsize=8)
                    ax.set_ylabel("layer", fontsize=8)
                    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
                    ax.tick_params(labelsize=7)
            if image is not None:
                fig.colorbar(image, ax=axes, shrink=0.8, label="gradient L2 norm (log scale)")
            fig.suptitle(f"{model}: {task_label(task)} gradient norm per layer and step, {_fmt_budget(budget)}",
                         fontsize=11, x=0.01, ha="left")
            _footer(fig, "Cell: the L2 norm of the gradient of one layer's attention or MLP parameters at a logged "
                         "step, mean over seeds (gradnorms.parquet, layer ≥ 0). Grey: frozen (norm 0) or not logged.")
            figs.append(fig)
    if out is not None:
        save_figures(figs, out)
    return figs


def _edges(centres: np.ndarray) -> np.ndarray:
    """Cell edges around sorted cell centres (midpoints; half a step beyond each end)."""
    c = np.asarray(centres, dtype=np.float64)
    if len(c) == 1:
        return np.array([c[0] - 0.5, c[0] + 0.5])
    mid = (c[1:] + c[:-1]) / 2
    return np.concatenate([[c[0] - (mid[0] - c[0])], mid, [c[-1] + (c[-1] - mid[-1])]])


# --------------------------------------------------------------------------------------------
# Tuning
# --------------------------------------------------------------------------------------------

def plot_evp(trials: pd.DataFrame, out: str | Path | None = None) -> list[Figure]:
    """Expected validation performance (Dodge et al. 2019, arXiv:1909.03004): the expected best
    held-out score (×100) as a function of the number of tuning trials ``n = 1 … N``, one line per
    method, one panel per task, one page per model and budget.

    Reads ``trials.parquet`` (:func:`peftbench.tuning.collect_trials`); the curve of a study is
    :func:`peftbench.tuning.expected_max` of its complete trials (pruned and diverged trials have
    no final held-out score and are left out; the footer counts them). An empty table (tuning
    off) gives one placeholder page.

    Raises:
        ValueError: the table lacks the model, task, method, budget, state or value column.
    """
    from ..tuning import expected_max

    _require(trials, ["model", "task", "method", "budget", "state", "value"], "trials table",
             "it is written by the tuning_table rule: `snakemake results/tables/trials.parquet`")
    done = trials[(trials["state"] == "COMPLETE") & np.isfinite(trials["value"].astype(float))]
    if done.empty:
        figs = [placeholder_figure("expected validation performance",
                                   "no complete tuning trial (tuning.enabled: false, or every trial was "
                                   "pruned or diverged)")]
    else:
        figs = []
        colors = method_colors(done["method"].unique())
        for (model, budget), g in done.groupby(["model", "budget"], sort=False):
            tasks = order_tasks(g["task"].unique())
            fig, axes = _page(*_grid(len(tasks)))
            flat = axes.ravel()
            for ax, task in zip(flat, tasks):
                gt = g[g["task"] == task]
                for m in order_methods(gt["method"].unique()):
                    v = gt.loc[gt["method"] == m, "value"].astype(float).to_numpy()
                    n = np.arange(1, len(v) + 1)
                    ax.plot(n, 100 * expected_max(v, n), marker="o", ms=3, color=colors[m], label=m)
                ax.set_title(task_label(task), fontsize=9)
                ax.set_xlabel("tuning trials n", fontsize=8)
                ax.set_ylabel(f"expected best held-out {_metric_label(_main_metric(task))}", fontsize=8)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
            _drop_unused(axes, len(tasks))
            left = trials[(trials["model"] == model) & (trials["budget"] == budget) & (trials["state"] != "COMPLETE")]
            fig.suptitle(f"{model}, {_fmt_budget(budget)}: expected validation performance", fontsize=11,
                         x=0.01, ha="left")
            _footer(fig, "Dodge et al. 2019 (arXiv:1909.03004): expected maximum of n trials drawn from the "
                    "study's complete trials, scored on the held-out part of the training split (never the "
                    f"GLUE dev set). Trials without a final score left out: {len(left)}.")
            figs.append(fig)
    if out is not None:
        save_figures(figs, out)
    return figs
