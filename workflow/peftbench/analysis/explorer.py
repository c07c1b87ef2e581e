"""``explorer.html``: one self-contained page to explore the results in a browser.

Built from the tidy tables (``runs.parquet``, ``significance.parquet``) by ``peftbench explorer``
(the ``explorer`` rule writes ``results/comparison/explorer.html``). The page needs no network
when it is viewed: plotly.js (the ``plotly`` package's bundled copy) and the data are inlined.
It shows:

- a **Pareto plot**: x is a cost column chosen by the reader (:data:`X_AXES`: trainable
  parameters, adapter parameters, % of backbone, training seconds, peak memory, tuning seconds
  where a ``tuning_s`` column exists), y any metric column (``dev_*``, ``best_dev_*`` and OOD
  columns ``ood_*``; :func:`y_axes`). One point per (model, task, method, budget): the mean over
  the runs that finished, with ±1 SD over seeds as the error bar; one trace (colour) per method,
  one marker symbol per task. The dashed step line is each (model, task)'s Pareto front among the
  points shown: no other point has a smaller or equal x and a larger y. Hovering a point shows
  the run key and every seed's value (failed and missing seeds named).
- **filters** by model, task, budget and method (full fine-tuning, which ignores budgets, belongs
  to every budget, as in the significance tables);
- a **sortable table** (click a column header), per method × budget (mean, SD, runs finished of
  all, and the comparison with the reference method from ``significance.parquet``: mean
  difference, Holm-adjusted seed-paired t-test p and its stars; they refer to the analysis value
  column, named in the header, whatever the y axis shows) or per run (status, values, error and
  the provenance columns of :data:`peftbench.vocab.PROVENANCE`);
- **CSV download** of the table as shown (the rows the filters leave, the view's columns, values
  at display scale, unrounded).

Metric values are stored as fractions and shown ×100 (:class:`peftbench.vocab.Metric` scale).

Testing hook: opened with ``#selftest`` in the URL (optionally ``&uncheck=<filter>:<value>``,
e.g. ``#selftest&uncheck=method:lora``), the page runs its own checks once drawn and writes them
as JSON into ``<pre id="selftest">``: page errors, method traces, rendered points, rows before and
after unchecking that filter box (through its real change handler), sort order and CSV lines.
``tests/test_explorer.py`` reads it from a headless Chromium's ``--dump-dom``.
"""
from __future__ import annotations

import html
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..methods import METHODS
from ..runkey import RUN_PATTERN
from ..vocab import PROVENANCE, metric, order_tasks, task_label

__all__ = ["Axis", "X_AXES", "Y_PREFIXES", "x_axes", "y_axes", "payload", "render_page", "write_explorer"]


@dataclass(frozen=True)
class Axis:
    """One column the reader can put on an axis.

    Attributes:
        column: the ``runs.parquet`` column.
        label: axis title and hover label (with its unit).
        short: table header.
        log: log scale by default.
        scale: shown value = stored value × scale (100 for metrics stored as fractions).
        digits: decimals shown in the table (0: integers with thousands separators).
    """

    column: str
    label: str
    short: str
    log: bool = False
    scale: float = 1.0
    digits: int = 1


#: Cost columns the x axis can show, in menu order (lower is better); each is offered when the
#: runs table has it with at least one finite value.
X_AXES: tuple[Axis, ...] = (
    Axis("trainable_params", "trainable parameters (adapter + head)", "trainable params", log=True, digits=0),
    Axis("adapter_params", "adapter parameters", "adapter params", log=True, digits=0),
    Axis("trainable_pct", "adapter parameters (% of backbone)", "adapter %", log=True, digits=3),
    Axis("train_s", "training time per run (s)", "train s", log=True, digits=1),
    Axis("peak_mem_mib", "peak memory (MiB)", "peak MiB", digits=0),
    Axis("tuning_s", "tuning time (s)", "tuning s", log=True, digits=1),
)

#: Prefixes of the metric columns the y axis can show (higher is better): final epoch, best
#: epoch, out-of-distribution evaluation.
Y_PREFIXES: dict[str, str] = {"best_dev_": "best epoch", "dev_": "final epoch", "ood_": "OOD"}
#: Short forms of :data:`Y_PREFIXES` for table headers.
_Y_SHORT = {"best_dev_": "best", "dev_": "final", "ood_": "OOD"}

#: Key columns of a run, in display order.
_KEYS = ("model", "task", "method", "budget", "seed")


def _finite_numeric(runs: pd.DataFrame, column: str) -> bool:
    if column not in runs.columns:
        return False
    values = pd.to_numeric(runs[column], errors="coerce")
    return bool(np.isfinite(values.to_numpy(dtype=float, na_value=np.nan)).any())


def x_axes(runs: pd.DataFrame) -> list[Axis]:
    """The entries of :data:`X_AXES` whose column ``runs`` has, with at least one finite value."""
    return [a for a in X_AXES if _finite_numeric(runs, a.column)]


def _y_axis(column: str) -> Axis | None:
    for prefix, when in Y_PREFIXES.items():
        if column.startswith(prefix):
            stem = column[len(prefix):]
            # dev_main is each task's main metric: every metric of the vocabulary is shown ×100
            m = metric(stem) if stem != "main" else None
            label, short, scale = (m.label, m.short, m.scale) if m else ("main metric of the task", "main", 100.0)
            unit = f" ×{scale:g}" if scale != 1 else ""
            return Axis(column, f"{label}, {when}{unit}", f"{short} ({_Y_SHORT[prefix]}){unit}", scale=scale)
    return None


def y_axes(runs: pd.DataFrame) -> list[Axis]:
    """Every metric column of ``runs`` (a :data:`Y_PREFIXES` prefix, numeric, at least one finite
    value) as an axis: ``dev_main`` and ``best_dev_main`` first, then the others in column order,
    final epoch before best epoch, OOD columns last."""
    axes = [a for c in runs.columns if (a := _y_axis(c)) is not None and _finite_numeric(runs, c)]

    def rank(a: Axis) -> int:
        head = ("dev_main", "best_dev_main")
        if a.column in head:
            return head.index(a.column)
        return 2 if a.column.startswith("dev_") else 3 if a.column.startswith("best_dev_") else 4

    return sorted(axes, key=rank)  # stable: column order within a rank


def _clean(v: Any) -> Any:
    """A JSON-safe scalar: NaN/inf and pandas NA -> None, numpy scalars -> Python."""
    if v is None or v is pd.NA:
        return None
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    return v if isinstance(v, (int, str)) else str(v)


def _significance_rows(sig: pd.DataFrame | None, reference: str) -> list[dict]:
    """The rows of ``significance.parquet`` that compare a method with ``reference``, as
    ``{model, task, budget, method, n, diff, ci_low, ci_high, p, stars, column}`` (GLUE-average
    rows left out: the page shows tasks)."""
    if sig is None or sig.empty:
        return []
    from .plots import significance_marks
    from .significance import family_token

    marks = significance_marks(sig, reference)
    rows = sig[(sig["baseline"] == reference) & (sig["task"].isin(set(sig["task"]) - {"glue_avg"}))]
    out = []
    for r in rows.itertuples(index=False):
        k = (r.model, r.task, family_token(r.budget), r.method)
        out.append({"model": r.model, "task": r.task, "budget": family_token(r.budget), "method": r.method,
                    "n": _clean(getattr(r, "n", None)), "diff": _clean(getattr(r, "mean_diff", None)),
                    "ci_low": _clean(getattr(r, "ci_low", None)), "ci_high": _clean(getattr(r, "ci_high", None)),
                    "p": _clean(getattr(r, "p_ttest_holm", None)), "stars": marks.get(k, ""),
                    "column": str(getattr(r, "value_column", ""))})
    return out


def payload(runs: pd.DataFrame, significance: pd.DataFrame | None = None, reference: str | None = None,
            value: str = "dev_main", sources: dict[str, str] | None = None) -> dict[str, Any]:
    """Everything the page shows, as one JSON-ready dict.

    Args:
        runs: ``runs.parquet`` (validated by :func:`~peftbench.analysis.significance.validate_runs`).
        significance: ``significance.parquet`` or None (no comparison columns).
        reference: the reference method; default the ``reference`` column of ``significance``,
            else the schema's ``analysis.reference_method``.
        value: the analysis value column (the default y axis).
        sources: ``{table: path}`` named on the page.

    Returns:
        ``{"runs": [...], "x_axes": [...], "y_axes": [...], "defaults": {...}, "labels": {...},
        "order": {...}, "significance": [...], "reference": str, "provenance": [...],
        "sources": {...}}``. Each run appears once per budget it is compared in (full
        fine-tuning once per budget of its model: ``budget`` the family, ``run_budget`` its own
        100) with an ``id`` (its run directory under ``results/runs``).

    Raises:
        ValueError: an invalid runs table (see ``validate_runs``) or no metric column to plot.
    """
    from .significance import (DEFAULT_REFERENCE, budget_families, budget_label, family_token, order_budgets,
                               order_methods, validate_runs)

    runs = validate_runs(runs, value=value)
    if reference is None:
        has_ref = significance is not None and not significance.empty and "reference" in significance.columns
        reference = str(significance["reference"].iloc[0]) if has_ref else DEFAULT_REFERENCE
    xs, ys = x_axes(runs), y_axes(runs)
    if not ys:
        raise ValueError("runs table: no metric column (dev_*, best_dev_*, ood_*) has a finite value; nothing to "
                         "plot. Did every run fail? See the status and error columns of runs.parquet")
    fam = budget_families(runs)
    prov = [c for c in PROVENANCE if c in fam.columns]
    cols = list(dict.fromkeys([*_KEYS, "run_budget", "status", "error", *(a.column for a in xs),
                               *(a.column for a in ys), *prov]))
    records = []
    for r in fam[[c for c in cols if c in fam.columns]].to_dict("records"):
        rec = {k: _clean(v) for k, v in r.items()}
        rec["id"] = RUN_PATTERN.format(model=r["model"], task=r["task"], method=r["method"],
                                       budget=family_token(r["run_budget"]), seed=int(r["seed"]))
        records.append(rec)
    methods = order_methods(runs["method"].unique(), reference)
    tasks = order_tasks(runs["task"].unique())
    y_default = value if any(a.column == value for a in ys) else ys[0].column
    x_default = "trainable_params" if any(a.column == "trainable_params" for a in xs) else (xs[0].column if xs else None)
    return {
        "runs": records,
        "x_axes": [asdict(a) for a in xs],
        "y_axes": [asdict(a) for a in ys],
        "defaults": {"x": x_default, "y": y_default},
        "order": {"model": sorted(map(str, runs["model"].unique())), "task": tasks, "method": methods,
                  "budget": order_budgets(fam["budget"].unique())},
        "labels": {"method": {m: METHODS[m].label if m in METHODS else m for m in methods},
                   "task": {t: task_label(t) for t in tasks},
                   "budget": {b: budget_label(b) for b in order_budgets(fam["budget"].unique())}},
        "budget_free": sorted(set(fam.loc[fam["run_budget"] != fam["budget"], "method"])),
        "significance": _significance_rows(significance, reference),
        "reference": reference,
        "value": value,
        "provenance": prov,
        "sources": dict(sources or {}),
    }


def _script_safe(text: str) -> str:
    """JavaScript that can sit inside an inline ``<script>`` element: ``</script`` (which would
    end it early) written ``<\\/script``, the same text in JS strings, regular expressions and
    comments; ``<!--`` (which changes how the HTML parser reads the element) written ``<\\!--``.
    Nothing else is touched: plotly.js, which holds neither, stays byte for byte as shipped."""
    return re.sub(r"<(/script|!--)", r"<\\\1", text, flags=re.IGNORECASE)


def _json_safe(data: Any) -> str:
    """``data`` as strict JSON (no NaN) that can sit inside an inline ``<script>`` element: every
    ``<``, ``>`` and ``&`` written as a ``\\u`` escape, so no text of a run (an error message)
    can open or close an element."""
    text = json.dumps(data, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_page(data: dict[str, Any], plotly_js: str | None = None) -> str:
    """The HTML page of :func:`payload` ``data``, plotly.js and the page's own script inlined.

    Args:
        data: the :func:`payload` dict.
        plotly_js: plotly.js source; default the copy bundled with the ``plotly`` package.

    Raises:
        ImportError: ``plotly`` is not installed (``pip install plotly``).
    """
    if plotly_js is None:
        from plotly.offline import get_plotlyjs

        plotly_js = get_plotlyjs()
    n_runs = len({r["id"] for r in data["runs"]})
    sources = ", ".join(f"{html.escape(k)}: <code>{html.escape(v)}</code>" for k, v in data["sources"].items())
    return (_PAGE
            .replace("%%TITLE%%", f"peftbench explorer: {n_runs} runs")
            .replace("%%SUBTITLE%%", f"{n_runs} runs · reference method <b>{html.escape(data['reference'])}</b>"
                     + (f" · {sources}" if sources else ""))
            .replace("%%PLOTLY%%", _script_safe(plotly_js))
            .replace("%%DATA%%", _json_safe(data))
            .replace("%%APP%%", _script_safe(_APP_JS)))


def with_ood_columns(runs: pd.DataFrame, ood: pd.DataFrame | None) -> pd.DataFrame:
    """``runs`` with one ``ood_<set>_accuracy`` column per OOD set of ``tables/ood.parquet`` (the
    ``evaluate_ood`` stage: its headline row per run and set), joined on the run key; runs without an OOD
    row get NaN. ``ood`` None or empty: ``runs`` unchanged.

    Raises:
        ValueError: the OOD table lacks the run key, ``ood_set`` or ``accuracy``.
    """
    if ood is None or ood.empty:
        return runs
    from ..ood import headline
    from ..runkey import KEY_COLUMNS

    need = [*KEY_COLUMNS, "ood_set", "accuracy"]
    missing = [c for c in need if c not in ood.columns]
    if missing:
        raise ValueError(f"OOD table: missing column(s) {missing}; it is written by the aggregate_ood rule")
    keys = list(KEY_COLUMNS)
    o = headline(ood).copy()  # whole sets only, not the HANS breakdown rows
    for k in keys:  # the same dtypes as the runs table (budget tokens, int seeds)
        o[k] = o[k].astype(runs[k].dtype) if k in runs.columns else o[k]
    wide = o.pivot_table(index=keys, columns="ood_set", values="accuracy", aggfunc="first")
    wide.columns = [f"ood_{s}_accuracy" for s in wide.columns]
    return runs.merge(wide.reset_index(), on=keys, how="left")


def write_explorer(runs: pd.DataFrame, significance: pd.DataFrame | None, out: str | Path,
                   reference: str | None = None, value: str = "dev_main",
                   sources: dict[str, str] | None = None) -> Path:
    """Write the explorer page for ``runs`` (and ``significance``) to ``out`` atomically (parent
    directories created) and return its path. Arguments as for :func:`payload`."""
    from ..io import atomic_path

    page = render_page(payload(runs, significance, reference, value, sources))
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out


# ------------------------------------------------------------------------------------------------
# The page: HTML and CSS, then the script (plain JavaScript, no framework; plotly.js draws)
# ------------------------------------------------------------------------------------------------

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>%%TITLE%%</title>
<script>
// Page errors, collected before anything else runs (read by the #selftest hook).
window.__pageErrors = [];
window.addEventListener("error", function (e) { window.__pageErrors.push(String(e.message)); });
window.addEventListener("unhandledrejection", function (e) { window.__pageErrors.push(String(e.reason)); });
(function () {
  var original = console.error;
  console.error = function () {
    window.__pageErrors.push(Array.prototype.map.call(arguments, String).join(" "));
    return original.apply(console, arguments);
  };
})();
</script>
<style>
  body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.2em 2em; color: #222; }
  h1 { font-size: 1.4em; margin: 0 0 0.2em 0; }
  .sub { color: #555; margin: 0 0 1em 0; font-size: 0.9em; }
  #controls, #filters { display: flex; flex-wrap: wrap; gap: 0.6em 1em; align-items: flex-start; }
  #controls label { font-size: 0.9em; }
  fieldset { border: 1px solid #ccc; border-radius: 4px; padding: 0.2em 0.7em 0.4em; margin: 0; }
  legend { font-size: 0.85em; color: #444; }
  legend button { font-size: 0.8em; margin-left: 0.4em; }
  fieldset label { margin-right: 0.7em; white-space: nowrap; }
  #plot { width: 100%; height: 560px; }
  .note { color: #555; font-size: 0.85em; margin: 0.2em 0 1em; }
  .bar { display: flex; gap: 1.2em; align-items: center; margin: 0.6em 0; font-size: 0.9em; }
  .scroll { overflow-x: auto; }
  table { border-collapse: collapse; font-size: 0.85em; }
  th, td { padding: 0.25em 0.6em; border-bottom: 1px solid #e3e3e3; text-align: left; white-space: nowrap; }
  th { background: #f3f3f3; cursor: pointer; user-select: none; position: sticky; top: 0; }
  th.num, td.num { text-align: right; font-variant-numeric: tabular-nums; }
  th .arrow { color: #999; }
  tbody tr:nth-child(even) { background: #fafafa; }
  td.stars { font-weight: bold; color: #a40; }
  td.failed, td.missing { color: #b00; }
  code { font-size: 0.95em; }
</style>
<script>%%PLOTLY%%</script>
</head>
<body>
<h1>peftbench results explorer</h1>
<p class="sub">%%SUBTITLE%%</p>
<div id="controls">
  <fieldset><legend>axes</legend>
    <label>x <select id="x"></select></label>
    <label>y <select id="y"></select></label>
    <label><input type="checkbox" id="front" checked> Pareto front</label>
  </fieldset>
  <span id="filters"></span>
</div>
<div id="plot"></div>
<p class="note" id="plot-note"></p>
<div class="bar">
  <span id="row-count"></span>
  <label><input type="radio" name="view" value="groups" checked> per method &times; budget</label>
  <label><input type="radio" name="view" value="runs"> per run</label>
  <button id="csv" type="button">Download CSV</button>
</div>
<div class="scroll"><table id="results"><thead></thead><tbody></tbody></table></div>
<pre id="selftest" hidden></pre>
<script type="application/json" id="payload">%%DATA%%</script>
<script>%%APP%%</script>
</body>
</html>
"""

_APP_JS = r"""
"use strict";
const D = JSON.parse(document.getElementById("payload").textContent);
const FILTERS = ["model", "task", "budget", "method"];
const COLOURS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c",
                 "#ccb974", "#64b5cd"];
const SYMBOLS = ["circle", "square", "diamond", "triangle-up", "cross", "x", "star", "pentagon", "hexagon",
                 "triangle-down"];
const state = {x: D.defaults.x, y: D.defaults.y, view: "groups", front: true, filters: {},
               sort: {groups: {col: null, dir: -1}, runs: {col: null, dir: 1}}, rendered: Promise.resolve()};

// ---------------------------------------------------------------- helpers
const axis = (kind, col) => D[kind + "_axes"].find(a => a.column === col);
const methodLabel = m => D.labels.method[m] || m;
const taskLabel = t => D.labels.task[t] || t;
const fmtBudget = b => D.labels.budget[b] || String(b);
const isNum = v => typeof v === "number" && isFinite(v);
const mean = xs => xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : null;
function sd(xs) {
  if (xs.length < 2) return null;
  const m = mean(xs);
  return Math.sqrt(xs.reduce((a, b) => a + (b - m) * (b - m), 0) / (xs.length - 1));
}
function fmt(v, digits) {
  if (!isNum(v)) return "—";
  if (digits === 0) return Math.round(v).toLocaleString("en-US");
  return v.toFixed(digits);
}
function escapeHtml(s) {
  return String(s).replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
}
const shown = (a, v) => isNum(v) ? v * a.scale : null;   // stored value -> display scale

// ---------------------------------------------------------------- controls
function buildControls() {
  for (const kind of ["x", "y"]) {
    const sel = document.getElementById(kind);
    for (const a of D[kind + "_axes"]) sel.add(new Option(a.label, a.column, false, a.column === state[kind]));
    sel.addEventListener("change", () => { state[kind] = sel.value; render(); });
  }
  document.getElementById("front").addEventListener("change", e => { state.front = e.target.checked; render(); });
  const box = document.getElementById("filters");
  for (const f of FILTERS) {
    const values = D.order[f].map(String);
    state.filters[f] = new Set(values);
    const fs = document.createElement("fieldset");
    const lg = document.createElement("legend");
    lg.textContent = f;
    const all = document.createElement("button");
    all.type = "button";
    all.textContent = "all";
    all.addEventListener("click", () => {
      fs.querySelectorAll("input").forEach(i => { i.checked = true; });
      state.filters[f] = new Set(values);
      render();
    });
    lg.appendChild(all);
    fs.appendChild(lg);
    for (const v of values) {
      const lab = document.createElement("label");
      const inp = document.createElement("input");
      inp.type = "checkbox";
      inp.checked = true;
      inp.value = v;
      inp.dataset.filter = f;
      inp.addEventListener("change", () => {
        if (inp.checked) state.filters[f].add(v); else state.filters[f].delete(v);
        render();
      });
      const text = f === "method" ? methodLabel(v) : f === "task" ? taskLabel(v) : f === "budget" ? fmtBudget(v) : v;
      lab.append(inp, " " + text);
      fs.appendChild(lab);
    }
    box.appendChild(fs);
  }
  document.querySelectorAll('input[name="view"]').forEach(r => r.addEventListener("change", () => {
    state.view = r.value;
    renderTable();
  }));
  document.getElementById("csv").addEventListener("click", downloadCsv);
}

// ---------------------------------------------------------------- data
function visibleRuns() {
  return D.runs.filter(r => FILTERS.every(f => state.filters[f].has(String(r[f]))));
}

function sigFor(g) {
  return D.significance.find(s => s.model === g.model && s.task === g.task && s.method === g.method &&
                                  s.budget === g.budget) || null;
}

// One group per key: its runs, the finished ones' x and y values, and every seed's y value.
function groupRuns(runs, keyOf) {
  const groups = new Map();
  for (const r of runs) {
    const k = keyOf(r);
    if (!groups.has(k)) groups.set(k, {model: r.model, task: r.task, method: r.method, budget: r.budget,
                                       run_budget: r.run_budget, runs: [], ids: new Set()});
    const g = groups.get(k);
    if (g.ids.has(r.id)) continue;   // full fine-tuning appears once per budget: count it once here
    g.ids.add(r.id);
    g.runs.push(r);
  }
  const ax = axis("x", state.x), ay = axis("y", state.y);
  for (const g of groups.values()) {
    const ok = g.runs.filter(r => r.status === "ok");
    const ys = ok.map(r => shown(ay, r[state.y])).filter(isNum);
    const xs = ax ? ok.map(r => shown(ax, r[state.x])).filter(isNum) : [];
    Object.assign(g, {n_ok: ok.length, n: g.runs.length, y: mean(ys), y_sd: sd(ys), x: mean(xs),
                      seeds: g.runs.slice().sort((a, b) => a.seed - b.seed)});
  }
  return [...groups.values()];
}

const orderIndex = (kind, v) => D.order[kind].map(String).indexOf(String(v));

// ---------------------------------------------------------------- plot
function hoverText(g, ax, ay) {
  const seeds = g.seeds.map(r => {
    const v = r.status === "ok" ? fmt(shown(ay, r[state.y]), 1) : r.status;
    return `s${r.seed} ${v}`;
  }).join(" · ");
  return `<b>${escapeHtml(methodLabel(g.method))}</b><br>` +
    `run key: ${escapeHtml(g.model)}/${escapeHtml(g.task)}/${escapeHtml(g.method)}/b${escapeHtml(g.run_budget)}/s*<br>` +
    `${escapeHtml(ay.label)}: ${fmt(g.y, 1)}${isNum(g.y_sd) ? " ± " + fmt(g.y_sd, 1) : ""} ` +
    `(${g.n_ok}/${g.n} seeds finished)<br>` +
    `${escapeHtml(ax.label)}: ${fmt(g.x, ax.digits)}<br>seeds: ${seeds}`;
}

// Points not dominated by another: sort by x ascending (ties: y descending), keep rising y.
function paretoFront(points) {
  const sorted = points.slice().sort((a, b) => a.x - b.x || b.y - a.y);
  const front = [];
  let best = -Infinity;
  for (const p of sorted) if (p.y > best) { front.push(p); best = p.y; }
  return front;
}

function plotTraces(groups) {
  const ax = axis("x", state.x), ay = axis("y", state.y);
  const pts = groups.filter(g => isNum(g.x) && isNum(g.y) && (!ax.log || g.x > 0));
  const traces = [];
  D.order.method.forEach((m, i) => {
    const mine = pts.filter(g => g.method === m);
    if (!mine.length) return;
    traces.push({
      type: "scatter", mode: "markers", name: methodLabel(m), meta: "method", legendgroup: m,
      x: mine.map(g => g.x), y: mine.map(g => g.y),
      error_y: {type: "data", array: mine.map(g => isNum(g.y_sd) ? g.y_sd : 0), visible: true, thickness: 1,
                width: 3},
      marker: {color: COLOURS[i % COLOURS.length], size: 11, line: {width: 1, color: "#fff"},
               symbol: mine.map(g => SYMBOLS[orderIndex("task", g.task) % SYMBOLS.length])},
      text: mine.map(g => hoverText(g, ax, ay)), hovertemplate: "%{text}<extra></extra>",
    });
  });
  if (state.front) {
    const byTable = new Map();
    for (const p of pts) {
      const k = p.model + "\u0000" + p.task;
      if (!byTable.has(k)) byTable.set(k, []);
      byTable.get(k).push(p);
    }
    let first = true;
    for (const ps of byTable.values()) {
      const f = paretoFront(ps);
      const xmax = Math.max(...ps.map(p => p.x));   // the last step runs on to the largest x shown
      const xs = f.map(p => p.x), ys = f.map(p => p.y);
      if (xmax > xs[xs.length - 1]) { xs.push(xmax); ys.push(ys[ys.length - 1]); }
      traces.push({type: "scatter", mode: "lines", name: "Pareto front", meta: "front", legendgroup: "front",
                   showlegend: first, x: xs, y: ys, hoverinfo: "skip",
                   line: {shape: "hv", dash: "dash", color: "#777", width: 1.5}});
      first = false;
    }
  }
  // marker symbols: one legend entry per task shown
  const tasks = [...new Set(pts.map(p => p.task))].sort((a, b) => orderIndex("task", a) - orderIndex("task", b));
  for (const t of tasks) {
    traces.push({type: "scatter", mode: "markers", name: "task " + taskLabel(t), meta: "legend", x: [null],
                 y: [null], hoverinfo: "skip", legendgroup: "task:" + t,
                 marker: {color: "#999", size: 10, symbol: SYMBOLS[orderIndex("task", t) % SYMBOLS.length]}});
  }
  return {traces, n: pts.length, dropped: groups.length - pts.length};
}

function renderPlot(groups) {
  const ax = axis("x", state.x), ay = axis("y", state.y);
  const note = document.getElementById("plot-note");
  if (!ax) {
    note.textContent = "No cost column (trainable_params, train_s, peak_mem_mib, …) in runs.parquet: nothing to plot.";
    return Promise.resolve();
  }
  const {traces, n, dropped} = plotTraces(groups);
  const layout = {
    margin: {l: 70, r: 20, t: 20, b: 60}, hovermode: "closest",
    xaxis: {title: {text: ax.label}, type: ax.log ? "log" : "linear", zeroline: false},
    yaxis: {title: {text: ay.label}, zeroline: false},
    legend: {orientation: "v"},
    annotations: n ? [] : [{text: "no finished run matches the filters", showarrow: false, xref: "paper",
                            yref: "paper", x: 0.5, y: 0.5, font: {size: 16, color: "#888"}}],
  };
  note.textContent = `${n} points: mean over the seeds that finished, bar ±1 SD over seeds; ` +
    "colour: method, marker: task; dashed: Pareto front of each model × task (lower x, higher y)" +
    (dropped ? `; ${dropped} method × budget cells without a finished value (or x ≤ 0 on a log axis) not drawn` : "") + ".";
  return Plotly.react("plot", traces, layout, {displaylogo: false, responsive: true});
}

// ---------------------------------------------------------------- table
function groupColumns() {
  const ax = axis("x", state.x), ay = axis("y", state.y);
  const sigCol = (D.significance[0] && D.significance[0].column) || D.value;
  const vs = `vs ${D.reference} (${sigCol})`;
  const cols = [
    {key: "model", label: "model", get: g => g.model},
    {key: "task", label: "task", get: g => taskLabel(g.task), sortKey: g => orderIndex("task", g.task)},
    {key: "method", label: "method", get: g => methodLabel(g.method), sortKey: g => orderIndex("method", g.method)},
    {key: "budget", label: "budget", get: g => g.budget, fmt: v => fmtBudget(v), sortKey: g => orderIndex("budget", g.budget)},
    {key: "runs", label: "finished / runs", num: true, get: g => g.n_ok, fmt: (v, g) => `${g.n_ok}/${g.n}`},
    {key: "y", label: ay.short + " mean", title: ay.label, num: true, get: g => g.y, fmt: v => fmt(v, 1)},
    {key: "y_sd", label: "SD", title: "standard deviation over the seeds that finished", num: true,
     get: g => g.y_sd, fmt: v => fmt(v, 1)},
    {key: "x", label: ax ? ax.short : "x", title: ax ? ax.label : "", num: true, get: g => g.x,
     fmt: v => fmt(v, ax ? ax.digits : 1)},
  ];
  if (D.significance.length) {
    cols.push(
      {key: "diff", label: `Δ ${vs} ×100`, title: "mean over paired seeds of (method − reference), ×100",
       num: true, get: g => g.sig && isNum(g.sig.diff) ? 100 * g.sig.diff : null, fmt: v => fmt(v, 2)},
      {key: "p", label: "p (Holm)", title: "Holm-adjusted seed-paired t-test p value (significance.parquet)",
       num: true, get: g => g.sig ? g.sig.p : null, fmt: v => isNum(v) ? v.toPrecision(2) : "—"},
      {key: "stars", label: "sig.", title: "* p < 0.05, ** p < 0.01, *** p < 0.001 (Holm-adjusted)",
       get: g => g.sig ? g.sig.stars : "", cls: "stars"});
  }
  return cols;
}

function runColumns() {
  const ax = axis("x", state.x), ay = axis("y", state.y);
  const cols = [
    {key: "id", label: "run", get: r => r.id},
    {key: "status", label: "status", get: r => r.status, cls: r => r.status},
    {key: "seed", label: "seed", num: true, get: r => r.seed, fmt: v => String(v)},
    {key: "y", label: ay.short, title: ay.label, num: true, get: r => shown(ay, r[state.y]), fmt: v => fmt(v, 1)},
    {key: "x", label: ax ? ax.short : "x", title: ax ? ax.label : "", num: true, get: r => ax ? shown(ax, r[state.x]) : null,
     fmt: v => fmt(v, ax ? ax.digits : 1)},
  ];
  for (const c of D.provenance) {
    const short = c === "git_commit" || c.endsWith("sha256");
    cols.push({key: c, label: c, get: r => r[c], fmt: v => v === null || v === undefined ? "—" :
               short ? String(v).slice(0, 12) : String(v)});
  }
  cols.push({key: "error", label: "error", get: r => r.error || ""});
  return cols;
}

function tableRows() {
  const runs = visibleRuns();
  if (state.view === "runs") {
    const seen = new Set();
    return {cols: runColumns(), rows: runs.filter(r => !seen.has(r.id) && seen.add(r.id))};
  }
  const groups = groupRuns(runs, r => [r.model, r.task, r.method, r.budget].join("\u0000"));
  for (const g of groups) g.sig = sigFor(g);
  return {cols: groupColumns(), rows: groups};
}

function sortRows(rows, cols) {
  const s = state.sort[state.view];
  const col = cols.find(c => c.key === s.col);
  const key = col ? (col.sortKey || col.get) : null;
  const defaultOrder = (a, b) => a.model.localeCompare(b.model) || orderIndex("task", a.task) - orderIndex("task", b.task)
    || orderIndex("budget", a.budget) - orderIndex("budget", b.budget) || orderIndex("method", a.method) - orderIndex("method", b.method) || (a.seed || 0) - (b.seed || 0);
  return rows.slice().sort((a, b) => {
    if (!key) return defaultOrder(a, b);
    const va = key(a), vb = key(b);
    const na = va === null || va === undefined || va === "" || (typeof va === "number" && !isFinite(va));
    const nb = vb === null || vb === undefined || vb === "" || (typeof vb === "number" && !isFinite(vb));
    if (na || nb) return na - nb;   // empty cells last in either direction
    const c = typeof va === "number" && typeof vb === "number" ? va - vb : String(va).localeCompare(String(vb));
    return s.dir * c || defaultOrder(a, b);
  });
}

function renderTable() {
  const {cols, rows} = tableRows();
  const sorted = sortRows(rows, cols);
  state.table = {cols, rows: sorted};
  const s = state.sort[state.view];
  const thead = document.querySelector("#results thead"), tbody = document.querySelector("#results tbody");
  thead.innerHTML = "<tr>" + cols.map(c => `<th data-col="${c.key}" class="${c.num ? "num" : ""}" ` +
    `title="${escapeHtml(c.title || c.label)} (click to sort)">` +
    `${escapeHtml(c.label)} <span class="arrow">${s.col === c.key ? (s.dir > 0 ? "▲" : "▼") : ""}</span></th>`).join("") + "</tr>";
  thead.querySelectorAll("th").forEach(th => th.addEventListener("click", () => sortBy(th.dataset.col)));
  tbody.innerHTML = sorted.map(r => "<tr>" + cols.map(c => {
    const v = c.get(r);
    const text = c.fmt ? c.fmt(v, r) : (v === null || v === undefined ? "—" : String(v));
    const cls = [c.num ? "num" : "", typeof c.cls === "function" ? c.cls(r) : (c.cls || "")].join(" ").trim();
    return `<td class="${cls}">${escapeHtml(text)}</td>`;
  }).join("") + "</tr>").join("");
  const total = state.view === "runs" ? new Set(D.runs.map(r => r.id)).size
    : new Set(D.runs.map(r => [r.model, r.task, r.method, r.budget].join("\u0000"))).size;
  const free = D.budget_free.map(methodLabel).join(", ");
  document.getElementById("row-count").textContent = `${sorted.length} of ${total} rows` +
    (free && state.view === "groups" ? ` (${free}, which ignores budgets, is listed under every budget)` : "");
}

function sortBy(col) {
  const s = state.sort[state.view];
  if (s.col === col) s.dir = -s.dir; else { s.col = col; s.dir = -1; }
  renderTable();
}

// ---------------------------------------------------------------- CSV
function csvText() {
  const {cols, rows} = state.table;
  const cell = v => {
    const t = v === null || v === undefined ? "" : String(v);
    return /[",\n]/.test(t) ? '"' + t.replace(/"/g, '""') + '"' : t;
  };
  const lines = [cols.map(c => cell(c.label)).join(",")];
  for (const r of rows) lines.push(cols.map(c => cell(c.key === "runs" ? `${r.n_ok}/${r.n}` : c.get(r))).join(","));
  return lines.join("\n") + "\n";
}

function downloadCsv() {
  const url = URL.createObjectURL(new Blob([csvText()], {type: "text/csv"}));
  const a = document.createElement("a");
  a.href = url;
  a.download = `peftbench-${state.view}.csv`;
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

// ---------------------------------------------------------------- render + self-test
function render() {
  const groups = groupRuns(visibleRuns(), r => [r.model, r.task, r.method, r.run_budget].join("\u0000"));
  state.rendered = renderPlot(groups);
  renderTable();
  return state.rendered;
}

async function selfTest() {
  const params = new URLSearchParams(location.hash.slice(1));
  const gd = document.getElementById("plot");
  const count = meta => (gd.data || []).filter(t => t.meta === meta).length;
  const rows = () => document.querySelectorAll("#results tbody tr").length;
  await state.rendered;
  const out = {plotly: Plotly.version, methods: D.order.method.length, method_traces: count("method"),
               front_traces: count("front"), points: document.querySelectorAll("#plot .scatterlayer .point").length,
               rows_before: rows()};
  const uncheck = params.get("uncheck");
  if (uncheck) {
    const [f, v] = uncheck.split(":");
    const box = document.querySelector(`#filters input[data-filter="${f}"][value="${v}"]`);
    out.unchecked = box ? uncheck : null;
    if (box) {
      box.checked = false;
      box.dispatchEvent(new Event("change"));
      await state.rendered;
      out.rows_after = rows();
      out.method_traces_after = count("method");
    }
  }
  sortBy("y");   // descending
  const ys = state.table.rows.map(r => state.table.cols.find(c => c.key === "y").get(r)).filter(isNum);
  out.sorted_desc = ys.every((v, i) => i === 0 || ys[i - 1] >= v);
  out.csv_lines = csvText().trim().split("\n").length;
  await new Promise(resolve => setTimeout(resolve, 200));   // let pending timers and handlers run
  out.errors = window.__pageErrors.slice();
  const pre = document.getElementById("selftest");
  pre.textContent = JSON.stringify(out);
  pre.dataset.done = "1";
}

buildControls();
render();
if (location.hash.includes("selftest")) selfTest().catch(e => window.__pageErrors.push("selftest: " + e));
"""
