"""``summary.md``: the results of a benchmark as Markdown tables, generated from the tables.

Sections: a protocol line; per ``(model, budget family)`` the main results table (methods × tasks
plus the GLUE average, mean ± SD over seeds ×100, best mean per column in bold, significance marks
vs the reference), a run outside its budget family (±10 % or capacity-limited; see
:func:`~peftbench.analysis.significance.budget_families`) in a section of its own after its
budget's; per model the parameter counts and costs (with the budget's parameter count and how
many runs match it); the list of failed runs; the provenance of the runs (:func:`provenance_lines`:
which of the columns of :data:`peftbench.vocab.PROVENANCE` — commit, model and data hashes, package
versions, device, host — differ between runs that are compared with each other). Every
number comes from :func:`~peftbench.analysis.significance.method_stats` (the same statistics
as the plots) and ``significance.parquet``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..vocab import GLUE_AVG, PROVENANCE, RUN_STATUSES, metric, order_tasks, task_label
from .plots import significance_marks
from .significance import (
    DEFAULT_REFERENCE,
    FULL_TOKEN,
    StatsOptions,
    budget_families,
    budget_free_methods,
    budget_label,
    budget_match,
    method_stats,
    order_budgets,
    order_methods,
    parse_family,
    validate_runs,
)

__all__ = ["summary_markdown", "write_summary", "provenance_lines"]


def _esc(text: object) -> str:
    """Escape Markdown table/emphasis characters in free text."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*").replace("_", "\\_")


def _stars_md(stars: str) -> str:
    return stars.replace("*", "\\*")


def _cell(r: pd.Series | None, best: bool, stars: str) -> str:
    if r is None:
        return "—"
    if r["n_ok"] == 0:
        return "failed" if r["n_failed"] > 0 else "missing"
    text = f"{100 * r['mean']:.1f}"
    if np.isfinite(r["std"]):
        text += f" ± {100 * r['std']:.1f}"
    if best:
        text = f"**{text}**"
    text += _stars_md(stars)
    total = int(r["n_ok"] + r["n_failed"] + r["n_missing"])
    if r["n_ok"] < total:
        text += f" ({int(r['n_ok'])}/{total})"
    return text


def _fmt_int(x: float) -> str:
    return f"{int(round(x)):,}" if np.isfinite(x) else "n/a"


def _fmt(x: float, spec: str) -> str:
    return format(x, spec) if np.isfinite(x) else "n/a"


def _results_table(st: pd.DataFrame, marks: dict, model: str, budget: str, reference: str | None) -> list[str]:
    tasks = order_tasks(st["task"].unique())
    methods = order_methods(st["method"].unique(), reference)
    header = ["method"]
    for t in tasks:
        if t == GLUE_AVG:
            n = int(st.loc[st["task"] == t, "n_tasks"].iloc[0])
            header.append(f"GLUE avg ({n} task{'' if n == 1 else 's'})")
        else:
            name = st.loc[st["task"] == t, "metric"].iloc[0]
            header.append(f"{task_label(t)} ({metric(name).short})")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * len(tasks)]
    best = {}
    for t in tasks:
        col = st[(st["task"] == t) & (st["n_ok"] > 0)]
        best[t] = col["mean"].max() if len(col) else np.nan
    for m in methods:
        name = f"{m} (reference)" if m == reference else m
        cells = [_esc(name)]
        for t in tasks:
            rr = st[(st["task"] == t) & (st["method"] == m)]
            r = rr.iloc[0] if len(rr) else None
            is_best = r is not None and r["n_ok"] > 0 and np.isclose(r["mean"], best[t], rtol=0, atol=1e-12)
            cells.append(_cell(r, bool(is_best), marks.get((model, t, budget, m), "")))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _cost_table(runs: pd.DataFrame, budget_free: set[str]) -> list[str]:
    effective = "effective_adapter_params" in runs.columns and runs["effective_adapter_params"].notna().any()
    sized = "budget_params" in runs.columns and runs["budget_params"].notna().any()
    match = budget_match(runs, budget_free)
    head = ("| method | budget | " + ("budget params | " if sized else "") + "trainable params | adapter params | "
            + ("effective adapter params | " if effective else "")
            + "% of backbone | in budget family | train time per run (s) | samples/s | peak memory (MiB) | "
            "runs ok / total |")
    lines = [head, "|---|---|" + "---:|" * (9 + int(effective) + int(sized))]
    order = order_methods(runs["method"].unique())
    b_order = order_budgets(runs["budget"].unique())
    for (m, b) in sorted({(r.method, r.budget) for r in runs[["method", "budget"]].itertuples()},
                         key=lambda k: (order.index(k[0]), b_order.index(k[1]))):
        sel = (runs["method"] == m) & (runs["budget"] == b)
        g = runs[sel]
        ok = g[g["status"] == "ok"]

        def mean(col, frame=g):
            return float(frame[col].astype(float).mean()) if col in frame.columns and len(frame) else np.nan

        t = (float(ok.groupby("task")["train_s"].mean().mean())
             if "train_s" in ok.columns and len(ok) else np.nan)
        mem = float(ok["peak_mem_mib"].max()) if "peak_mem_mib" in ok.columns and len(ok) else np.nan
        budget = "— (full)" if m in budget_free and b == FULL_TOKEN else _esc(b)
        bp = f"{_fmt_int(mean('budget_params'))} | " if sized else ""
        eff = ""
        if effective:
            e = mean("effective_adapter_params")
            eff = f"{_fmt_int(e) if np.isfinite(e) else '—'} | "
        fam = "—" if m in budget_free else f"{int(match[sel].sum())} / {len(g)}"
        lines.append(f"| {_esc(m)} | {budget} | {bp}{_fmt_int(mean('trainable_params'))} | "
                     f"{_fmt_int(mean('adapter_params'))} | {eff}{_fmt(mean('trainable_pct'), '.3g')} | {fam} | "
                     f"{_fmt(t, '.0f')} | {_fmt(mean('samples_per_s', ok), '.1f')} | {_fmt(mem, '.0f')} | "
                     f"{len(ok)} / {len(g)} |")
    return lines


def _tuning_table(runs: pd.DataFrame) -> list[str]:
    """The tuning cost per method and budget (``tuning_trials``, ``tuning_s`` of tuned runs: one
    study per task, shared by the seeds), or nothing when no run was tuned."""
    if "tuning_s" not in runs.columns or runs["tuning_s"].isna().all():
        return []
    tuned = runs[runs["tuning_s"].notna()]
    per_study = tuned.groupby(["method", "budget", "task"])[["tuning_trials", "tuning_s"]].first()
    cost = per_study.groupby(["method", "budget"]).agg(trials=("tuning_trials", "sum"), s=("tuning_s", "sum"),
                                                       tasks=("tuning_s", "size"))
    order = order_methods(cost.index.get_level_values(0).unique())
    b_order = order_budgets(cost.index.get_level_values(1).unique())
    lines = ["### Tuning cost", "", "| method | budget | tasks tuned | trials (all tasks) | tuning time (s, all tasks) |",
             "|---|---|---:|---:|---:|"]
    for (m, b), r in sorted(cost.iterrows(), key=lambda kv: (order.index(kv[0][0]), b_order.index(kv[0][1]))):
        lines.append(f"| {_esc(m)} | {_esc(b)} | {int(r['tasks'])} | {_fmt_int(r['trials'])} | {_fmt(r['s'], '.0f')} |")
    return lines + ["", "One Optuna study per (task, method, budget), shared by the seeds (peftbench.tuning): "
                    "trials finished and the wall time of all its trials, summed over tasks.", ""]


def _section_label(runs: pd.DataFrame, budget: str, methods: set[str], budget_free: set[str]) -> str:
    """Heading of one budget family's results table."""
    if methods <= budget_free:
        return "full fine-tuning only"
    nominal, size = parse_family(budget)
    if size is not None:
        return (f"{budget_label(budget)} — planned at budget {nominal.token}, outside it (±10 % or "
                f"capacity-limited): own family, not compared with the {nominal.token} family")
    if nominal.is_pct:
        den = runs.loc[runs["budget"] == budget, "budget_denominator"].dropna().unique() \
            if "budget_denominator" in runs.columns else []
        return f"budget {nominal.token}% of {_esc(', '.join(map(str, den))) if len(den) else 'backbone'} parameters"
    return f"budget {nominal.token} (the parameter count of LoRA rank {int(nominal.value)} on every adapted matrix)"


#: Characters of a hash or commit shown in the provenance section.
_SHORT = 12


def _prov_value(column: str, v: object) -> str:
    """One provenance value as shown: hashes and commits shortened to :data:`_SHORT` characters,
    the dirty flag in words, missing values as ``not recorded``."""
    if v is None or v is pd.NA or (isinstance(v, float) and not np.isfinite(v)):
        return "not recorded"
    if column == "git_dirty":
        return "dirty" if bool(v) else "clean"
    text = str(v)
    if column == "git_commit" or column.endswith("sha256"):
        parts = [p.partition("=") for p in text.split(",")]
        return ",".join(f"{name}={h[:_SHORT]}" if sep else name[:_SHORT] for name, sep, h in parts)
    return text


def _code(text: object) -> str:
    """``text`` as inline code in a Markdown table cell."""
    return "`" + str(text).replace("`", "'").replace("|", "\\|") + "`"


def provenance_lines(runs: pd.DataFrame) -> list[str]:
    """The ``## Provenance`` section of summary.md: what differs between runs that are compared.

    Runs are compared within a comparison table, one per ``(model, task, budget)``
    (:func:`~peftbench.analysis.significance.budget_families`: full fine-tuning belongs to every
    budget). For every column of :data:`peftbench.vocab.PROVENANCE`, over the runs that wrote a
    row (status ``ok`` or ``failed``): a column with more than one value inside some table is
    listed with its values, their run counts and how many tables mix them (a difference a method
    comparison would silently absorb); a column with one value inside every table is listed once,
    with its value, or the number of values it takes across tables (the data hashes differ
    between tasks by design). Missing values count as the value ``not recorded``.

    Returns:
        Markdown lines (heading included).
    """
    out = ["## Provenance", ""]
    done = runs[runs["status"] != "missing"]
    cols = [c for c in PROVENANCE if c in done.columns]
    if done.empty or not cols:
        return out + ["Not recorded: no run row has provenance columns (runs written before they existed).", ""]
    fam = budget_families(done)
    keys = ["model", "task", "budget"]
    n_tables = int(fam.groupby(keys).ngroups)
    mixed, same = [], []
    for c in cols:
        shown = fam[c].map(lambda v, c=c: _prov_value(c, v))
        n_mixed = int((shown.groupby([fam[k] for k in keys]).nunique() > 1).sum())
        values = done[c].map(lambda v, c=c: _prov_value(c, v)).value_counts()
        if n_mixed:
            vals = ", ".join(f"{_code(v)} ({n})" for v, n in values.items())
            mixed.append(f"| `{c}` | {vals} | {n_mixed} of {n_tables} |")
        elif len(values) == 1:
            same.append(f"`{c}` {_esc(values.index[0])}")
        else:
            same.append(f"`{c}` one value per table ({len(values)} distinct)")
    missing = [c for c in PROVENANCE if c not in done.columns]
    if mixed:
        out += [f"**Differs between compared runs** ({n_tables} comparison tables of model × task × budget): "
                "differences between methods in these tables may partly be differences of code, data, "
                "software or machine.", "",
                "| column | values (runs) | tables mixing them |", "|---|---|---:|", *mixed, ""]
    else:
        out += [f"No recorded provenance column differs within a comparison table (model × task × budget, "
                f"{n_tables} in all).", ""]
    out += ["**Same within every table:** " + ("; ".join(same) if same else "none") + "."
            + (f" Not recorded in any run: {', '.join(f'`{c}`' for c in missing)}." if missing else ""), ""]
    return out


def _eval_cadence(runs: pd.DataFrame) -> str:
    """``"; dev splits evaluated after the last epoch only in k of n runs ..."`` where runs were
    trained with ``eval_every_epoch: false`` (column ``eval_every_epoch``), else ``""``."""
    if "eval_every_epoch" not in runs.columns:
        return ""
    flags = runs["eval_every_epoch"].dropna().astype(bool)
    last = int((~flags).sum())
    if not last:
        return ""
    which = "every run" if last == len(flags) else f"{last} of {len(flags)} runs"
    return f"; dev splits evaluated after the last epoch only in {which}, whose best epoch is the last"


def summary_markdown(runs: pd.DataFrame, significance: pd.DataFrame | None = None,
                     opts: StatsOptions = StatsOptions(), reference: str | None = None) -> str:
    """Render the benchmark summary as Markdown.

    Args:
        runs: ``runs.parquet`` (see :func:`~peftbench.analysis.significance.validate_runs`).
        significance: ``significance.parquet`` (marks vs the reference) or None (no marks).
        opts: statistics settings; must match the significance rule's for consistent numbers.
        reference: reference method; default: the ``reference`` column of ``significance``, else
            the config schema's ``analysis.reference_method``.

    Returns:
        The Markdown text. Main tables show mean ± SD (ddof=1) over seeds of ``opts.value`` ×100
        (no ± with one seed); the best mean per column is bold (ties: all bold); ``\\*``/``\\*\\*``/
        ``\\*\\*\\*`` mark Holm-adjusted paired t-test p < 0.05/0.01/0.001 vs the reference;
        ``(k/n)`` means only k of n seeds finished; ``failed`` that none did (a run failed);
        ``missing`` that none did (the runs are missing: no ``metrics.parquet``); ``—`` no run.
        Cost columns: trainable/adapter parameters and % of backbone are means over the method's
        runs; train time is the mean over tasks of the mean over seeds; samples/s the mean over ok
        runs; peak memory the maximum over ok runs.

    Raises:
        ValueError: invalid run table (see ``validate_runs``) or significance table.
    """
    runs = validate_runs(runs, value=opts.value)
    if reference is None:
        if significance is not None and not significance.empty and "reference" in significance.columns:
            reference = str(significance["reference"].iloc[0])
        else:
            reference = DEFAULT_REFERENCE
    marks = significance_marks(significance, reference)
    st = method_stats(runs, opts)
    n_failed = int((runs["status"] == "failed").sum())
    n_missing = int((runs["status"] == "missing").sum())
    budget_free = budget_free_methods(runs)
    protocol = "; ".join(sorted(map(str, runs["protocol"].dropna().unique()))) if "protocol" in runs else "not recorded"
    devices = ", ".join(sorted(map(str, runs["device"].dropna().unique()))) if "device" in runs else "not recorded"
    seeds = ", ".join(str(s) for s in sorted(runs["seed"].unique()))
    value = "final-epoch" if opts.value == "dev_main" else opts.value
    out = ["# peftbench results", "",
           f"**Protocol:** {_esc(protocol or 'not recorded')} (values: {value} dev main metric, `{opts.value}`"
           f"{_eval_cadence(runs)}); "
           f"seeds {seeds}; device {_esc(devices or 'not recorded')}; {len(runs)} runs, {n_failed} failed, "
           f"{n_missing} missing. "
           f"Significance: seed-paired t-test vs `{reference}`, Holm–Bonferroni within each model × task × "
           f"budget; GLUE average = per-seed mean of the tasks' main metrics"
           + (f" (excluding {', '.join(opts.glue_exclude)})" if opts.glue_exclude else "") + ".", ""]
    for model in st["model"].unique():
        sm = st[st["model"] == model]
        for budget in order_budgets(sm["budget"].unique()):
            label = _section_label(runs[runs["model"] == model], budget,
                                   set(sm.loc[sm["budget"] == budget, "method"]), budget_free)
            out += [f"## {_esc(model)}: {label}", ""]
            out += _results_table(sm[sm["budget"] == budget], marks, model, budget, reference)
            out.append("")
        out += [f"Mean ± SD over seeds (×100) of the dev main metric; **bold**: best mean in the column; "
                f"\\* / \\*\\* / \\*\\*\\*: Holm-adjusted paired t-test p < 0.05 / 0.01 / 0.001 vs "
                f"`{reference}`" + ("" if marks else " (no significance table given: no marks)") +
                "; (k/n): only k of n seeds finished; failed: no seed finished, a run failed; missing: "
                "no seed finished, the runs are missing (no metrics.parquet); —: not run. "
                + (", ".join(f"`{m}`" for m in order_methods(budget_free))
                   + (" ignores" if len(budget_free) == 1 else " ignore")
                   + " budgets and is repeated in every budget table." if budget_free else ""), ""]
        out += [f"## {_esc(model)}: parameters and cost", ""]
        out += _cost_table(runs[runs["model"] == model], budget_free)
        out += ["", "Trainable params = adapter + classification head (mean over tasks); % of backbone = "
                "adapter params / backbone params × 100; in budget family: runs whose count against the budget "
                "is within ±10 % of the budget's parameter count and not capacity-limited (the others are "
                "compared in a family of their own size)"
                + ("; effective adapter params: parameters left after rank pruning or gating, where the "
                   "method reports them (—: not reported)" if "effective_adapter_params" in runs.columns
                   and runs["effective_adapter_params"].notna().any() else "")
                + ". Train time: mean over tasks of the mean over seeds (ok runs); peak memory: maximum "
                "over ok runs.", ""]
        out += _tuning_table(runs[runs["model"] == model])
    failed = runs[runs["status"] != "ok"]
    out += ["## Failed runs", ""]
    if failed.empty:
        out += ["None.", ""]
    else:
        out += ["| model | task | method | budget | seed | status | error |", "|---|---|---|---:|---:|---|---|"]
        for r in failed.itertuples():
            err = str(r.error) if r.error is not None and r.error == r.error else ""
            err = err.strip().splitlines()[-1] if err.strip() else "(no message)"
            out.append(f"| {_esc(r.model)} | {_esc(r.task)} | {_esc(r.method)} | {_esc(r.budget)} | {r.seed} "
                       f"| {_esc(r.status)} | {_esc(err[:160])} |")
        out += ["", "Status: " + "; ".join(f"{_esc(st)}: {_esc(RUN_STATUSES[st])}" for st in RUN_STATUSES
                                          if st != "ok" and (failed["status"] == st).any()) + ".", ""]
    out += provenance_lines(runs)
    return "\n".join(out)


def write_summary(runs: pd.DataFrame, significance: pd.DataFrame | None, out: str | Path,
                  opts: StatsOptions = StatsOptions(), reference: str | None = None) -> Path:
    """Write :func:`summary_markdown` to ``out`` (parent directories are created) and return the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(summary_markdown(runs, significance, opts, reference), encoding="utf-8")
    return out
