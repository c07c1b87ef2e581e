"""Command-line interface of the analysis stage: ``significance``, ``plot``, ``summary`` and
``explorer`` (:mod:`peftbench.analysis.explorer`).

The package's main CLI calls :func:`register` with its sub-parser collection; each sub-command
sets ``func`` to a function taking the parsed :class:`argparse.Namespace`. For use without the
main CLI, :func:`main` builds a parser with only these sub-commands
(``python -m peftbench.analysis.cli significance --runs ... --out ...``).

Sub-commands (defaults of the statistics options and ``--reference``: the config schema's
``analysis`` section)::

    significance --runs R --out S [--stats-out M] [--reference M] [--all-pairs]
                 [--resamples N] [--confidence C] [--seed S] [--ci-method BCa]
                 [--value dev_main] [--glue-exclude TASK ...]
    plot KIND --out F.pdf [--runs R] [--significance S] [--curves C] [--ranks K]
              [--gradnorms G] [--spectrum P [P ...]] [--task T] [--reference M]
              [statistics options as above]
    summary --runs R --out summary.md [--significance S] [statistics options as above]
    explorer --runs R --out explorer.html [--significance S] [--reference M] [--value dev_main]

The figure kinds, and the tables each reads, are :data:`peftbench.vocab.PLOTS`: ``plot KIND``
needs ``--<input>`` for every input of its kind (plus ``--task`` for a per-task kind).
:func:`plot_inputs` and :func:`plot_argv` turn one figure name (the ``{kind}`` wildcard of the
``plot`` rule: a kind, or a task name for the per-task kind) into its input paths and this
command line, so the Snakemake rule and the CLI read one input map.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..vocab import PLOTS, TABLE_SOURCES, TABLES, TASKS, PlotKind

# Heavy modules (pandas, scipy, matplotlib) are imported inside the commands, so that the package
# CLI can call register() on every start-up without paying for them.

__all__ = ["register", "main", "build_parser", "figure_names", "plot_kind", "plot_inputs", "plot_argv",
           "table_path", "PLOT_INPUTS"]

#: Input key of the svd stage's per-model singular-value spectra (not an aggregated table).
SPECTRUM = "spectrum"

#: Every input a figure kind can read (keys of :data:`~peftbench.vocab.TABLES` or ``spectrum``),
#: in first-use order; each is the ``plot`` option ``--<key>``.
PLOT_INPUTS: tuple[str, ...] = tuple(dict.fromkeys(k for p in PLOTS.values() for k in p.inputs))


def table_path(key: str, models=(), results: str = "results") -> str | list[str]:
    """Where input ``key`` lives: ``results/tables/<TABLES[key]>``, or for ``spectrum`` one
    ``results/svd/<model>/spectrum.parquet`` per model of ``models``."""
    if key == SPECTRUM:
        return [f"{results}/svd/{m}/spectrum.parquet" for m in models]
    return f"{results}/tables/{TABLES[key]}"


def _hint(key: str) -> str:
    """How to (re)create input ``key``, for error messages."""
    if key == SPECTRUM:
        return "it is written by the svd rule: `snakemake results/svd/<model>/spectrum.parquet`"
    rule = ("aggregate" if key in TABLE_SOURCES else "tuning_table" if key == "trials"
            else "aggregate_ood" if key == "ood" else "significance")
    return f"it is written by the {rule} rule: `snakemake {table_path(key)}`"


def _per_task_kind() -> PlotKind | None:
    kinds = [p for p in PLOTS.values() if p.per_task]
    if len(kinds) > 1:  # pragma: no cover - a vocabulary invariant
        raise ValueError(f"more than one per-task plot kind ({', '.join(p.name for p in kinds)}): their "
                         "figures would share the names results/comparison/<task>.pdf")
    return kinds[0] if kinds else None


def figure_names(tasks=TASKS) -> list[str]:
    """Every figure name (``results/comparison/<name>.pdf``): each kind of :data:`PLOTS` that is
    not per task, then the per-task kind's figure for each of ``tasks``."""
    names = [p.name for p in PLOTS.values() if not p.per_task]
    return names + (list(tasks) if _per_task_kind() is not None else [])


def plot_kind(name: str) -> tuple[PlotKind, str | None]:
    """The plot kind and task of figure ``name``: a kind of :data:`PLOTS` that is not per task
    (task None), or a GLUE task name (the per-task kind, that task).

    Raises:
        KeyError: ``name`` is neither; the message lists both.
    """
    if name in PLOTS and not PLOTS[name].per_task:
        return PLOTS[name], None
    per_task = _per_task_kind()
    if name in TASKS and per_task is not None:
        return per_task, name
    raise KeyError(f"unknown figure {name!r}; figures: {', '.join(figure_names())}")


def plot_inputs(name: str, models=(), results: str = "results") -> dict[str, str | list[str]]:
    """``{input key: path(s)}`` that figure ``name`` reads (:data:`PLOTS`, :func:`table_path`)."""
    kind, _ = plot_kind(name)
    return {key: table_path(key, models, results) for key in kind.inputs}


def plot_argv(name: str, inputs) -> list[str]:
    """``peftbench plot`` arguments (after ``plot``) of figure ``name`` reading ``inputs`` (a
    mapping from input key to path(s), as from :func:`plot_inputs` or a Snakemake ``input``):
    ``[kind, (--task T), --<key> PATH..., ...]``, without ``--out`` and the statistics options."""
    kind, task = plot_kind(name)
    argv = [kind.name] + (["--task", task] if task else [])
    for key in kind.inputs:
        paths = inputs[key]
        argv += [f"--{key}", *([str(paths)] if isinstance(paths, (str, Path)) else map(str, paths))]
    return argv


def _add_stats_args(p: argparse.ArgumentParser, defaults: dict) -> None:
    g = p.add_argument_group("statistics (use the same values in significance, plot and summary; "
                             "defaults: the config schema's analysis section)")
    g.add_argument("--resamples", type=int, default=defaults["bootstrap_resamples"],
                   help="bootstrap resamples (default %(default)s)")
    g.add_argument("--confidence", type=float, default=defaults["confidence"],
                   help="confidence level of the bootstrap CI (default %(default)s)")
    g.add_argument("--seed", type=int, default=defaults["bootstrap_seed"],
                   help="bootstrap random seed (default %(default)s)")
    g.add_argument("--ci-method", default=defaults["ci_method"], choices=["BCa", "percentile", "basic"],
                   help="scipy.stats.bootstrap method (default %(default)s)")
    g.add_argument("--value", default=defaults["value"], choices=["dev_main", "best_dev_main"],
                   help="compared value: final epoch (dev_main) or best epoch (best_dev_main); "
                        "default %(default)s")
    g.add_argument("--glue-exclude", nargs="*", default=list(defaults["glue_avg_exclude"]), metavar="TASK",
                   help="tasks left out of the GLUE average (default: %(default)s)")


def _opts(args: argparse.Namespace):
    from .significance import StatsOptions

    return StatsOptions(resamples=args.resamples, confidence=args.confidence, seed=args.seed,
                        ci_method=args.ci_method, value=args.value, glue_exclude=tuple(args.glue_exclude))


def load_runs(path: str | Path, value: str = "dev_main"):
    """Read and validate ``runs.parquet``; errors name the file and how to regenerate it."""
    from .significance import read_table, validate_runs

    df = read_table(path, allow_empty=False, hint=_hint("runs"))
    return validate_runs(df, source=str(path), value=value)


def cmd_significance(args: argparse.Namespace) -> int:
    """``peftbench significance``: write significance.parquet and method_stats.parquet."""
    from .significance import compare_methods, method_stats

    opts = _opts(args)
    runs = load_runs(args.runs, opts.value)
    sig = compare_methods(runs, reference=args.reference, all_pairs=args.all_pairs, opts=opts)
    stats_ = method_stats(runs, opts)
    out = Path(args.out)
    stats_out = Path(args.stats_out) if args.stats_out else out.with_name(TABLES["method_stats"])
    for path, df in ((out, sig), (stats_out, stats_)):
        path.parent.mkdir(parents=True, exist_ok=True)
        df.to_parquet(path, index=False)
    if args.reference not in set(runs["method"]):
        print(f"warning: reference method {args.reference!r} has no runs in {args.runs}; "
              "every comparison has n = 0", file=sys.stderr)
    print(f"wrote {out} ({len(sig)} comparisons) and {stats_out} ({len(stats_)} method rows)")
    if getattr(args, "predictions", None) is not None:
        from .examples import example_significance, read_predictions

        ex_out = Path(args.examples_out) if getattr(args, "examples_out", None) else out.with_name(TABLES["example_significance"])
        ex = example_significance(runs, read_predictions(args.predictions), reference=args.reference, opts=opts)
        ex_out.parent.mkdir(parents=True, exist_ok=True)
        ex.to_parquet(ex_out, index=False)
        print(f"wrote {ex_out} ({len(ex)} example-level tests)")
    if getattr(args, "ood", None) is not None:
        from .significance import compare_ood, read_table

        ood_out = Path(args.ood_out) if getattr(args, "ood_out", None) else out.with_name(TABLES["ood_significance"])
        od = compare_ood(runs, read_table(args.ood, hint=_hint("ood")), reference=args.reference,
                         all_pairs=args.all_pairs, opts=opts)
        ood_out.parent.mkdir(parents=True, exist_ok=True)
        od.to_parquet(ood_out, index=False)
        print(f"wrote {ood_out} ({len(od)} OOD comparisons)")
    return 0


def _read_input(key: str, paths, opts):
    """Read plot input ``key`` from ``paths`` (validated like the significance stage's input)."""
    from .significance import read_table

    if key == "runs":
        return load_runs(paths, opts.value)
    if key in ("significance", "ood_significance"):
        return read_table(paths, ("model", "task", "budget", "method", "baseline", "reference"),
                          hint=_hint(key))
    if key == SPECTRUM:
        import pandas as pd

        return pd.concat([read_table(p, hint=_hint(key)) for p in paths], ignore_index=True)
    return read_table(paths, hint=_hint(key))


def _draw(kind: str, t: dict, task: str | None, opts, reference: str | None) -> list:
    """The figures of ``kind`` from the read inputs ``t`` (one call per kind of :data:`PLOTS`)."""
    from . import plots

    draw = {
        "glue": lambda: plots.plot_glue(t["runs"], t["significance"], opts, reference=reference),
        "task": lambda: plots.plot_task(t["runs"], task, t["significance"], opts, reference=reference,
                                        example_significance=t["example_significance"]),
        "pareto": lambda: plots.plot_pareto(t["runs"], opts),
        "cost": lambda: plots.plot_cost(t["runs"]),
        "curves": lambda: plots.plot_curves(t["curves"], reference=reference),
        "ranks": lambda: plots.plot_ranks(t["ranks"]),
        "spectrum": lambda: plots.plot_spectrum(t["spectrum"]),
        "gradnorms": lambda: plots.plot_gradnorms(t["gradnorms"]),
        "gradheatmap": lambda: plots.plot_gradheatmap(t["gradnorms"]),
        "evp": lambda: plots.plot_evp(t["trials"]),
        "ood": lambda: plots.plot_ood(t["runs"], t["ood"], t["significance"], t["ood_significance"], opts,
                                      reference=reference),
    }
    if set(draw) != set(PLOTS):  # pragma: no cover - a vocabulary invariant
        raise RuntimeError(f"plot kinds of vocab.PLOTS ({', '.join(PLOTS)}) and of analysis.cli "
                           f"({', '.join(draw)}) differ")
    return draw[kind]()


def cmd_plot(args: argparse.Namespace) -> int:
    """``peftbench plot KIND``: write one figure as PDF plus a PNG beside it."""
    kind = PLOTS[args.kind]
    need = [*kind.inputs, *(["task"] if kind.per_task else [])]
    missing = [f"--{key}" for key in need if not getattr(args, key)]
    if missing:
        args._plot_parser.error(f"plot {args.kind} needs {', '.join(missing)}")
    opts = _opts(args)
    tables = {key: _read_input(key, getattr(args, key), opts) for key in kind.inputs}
    figs = _draw(kind.name, tables, args.task if kind.per_task else None, opts, args.reference)
    pdf, png = _save_figures()(figs, args.out)
    print(f"wrote {pdf} ({len(figs)} page(s)) and {png}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    """``peftbench summary``: write summary.md."""
    from .significance import read_table
    from .summary import write_summary

    opts = _opts(args)
    runs = load_runs(args.runs, opts.value)
    sig = (read_table(args.significance, ("model", "task", "budget", "method", "baseline", "reference"),
                      hint=_hint("significance")) if args.significance else None)
    out = write_summary(runs, sig, args.out, opts, reference=args.reference)
    print(f"wrote {out}")
    return 0


def cmd_explorer(args: argparse.Namespace) -> int:
    """``peftbench explorer``: write explorer.html (see :mod:`peftbench.analysis.explorer`)."""
    from .explorer import write_explorer
    from .significance import read_table

    runs = load_runs(args.runs, args.value)
    sig = (read_table(args.significance, ("model", "task", "budget", "method", "baseline", "reference"),
                      hint=_hint("significance")) if args.significance else None)
    sources = {"runs": str(args.runs), **({"significance": str(args.significance)} if args.significance else {})}
    if args.ood:
        from .explorer import with_ood_columns

        runs = with_ood_columns(runs, read_table(args.ood, hint=_hint("ood")))
        sources["ood"] = str(args.ood)
    out = write_explorer(runs, sig, args.out, args.reference, args.value, sources)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {len(runs)} runs)")
    return 0


def _save_figures():
    """plots.save_figures, looked up at call time (tests replace it to skip rendering)."""
    from . import plots

    return plots.save_figures


def _used_by(key: str) -> str:
    return ", ".join(p.name for p in PLOTS.values() if key in p.inputs)


def register(subparsers) -> None:
    """Add the ``significance``, ``plot``, ``summary`` and ``explorer`` sub-commands to ``subparsers``
    (the object returned by ``ArgumentParser.add_subparsers``). Each sets ``func``."""
    from ..config import schema_defaults

    defaults = schema_defaults("analysis")
    p = subparsers.add_parser(
        "significance", help="seed-paired tests of every method vs the reference (and GLUE average)",
        description="Write significance.parquet (paired bootstrap CI, t-test, Wilcoxon, Cohen's d, "
                    "Holm-adjusted p per model x task x budget, plus task == glue_avg rows) and "
                    "method_stats.parquet (per-method mean, SD, bootstrap CI; glue_avg rows = GLUE average).")
    p.add_argument("--runs", required=True, type=Path, help=table_path("runs"))
    p.add_argument("--out", required=True, type=Path, help=f"output {TABLES['significance']}")
    p.add_argument("--stats-out", type=Path, default=None,
                   help=f"output per-method statistics (default: {TABLES['method_stats']} beside --out)")
    p.add_argument("--predictions", type=Path, default=None,
                   help=f"{table_path('predictions')}: also write the example-level tests "
                        f"(hierarchical bootstrap, McNemar, ASO; peftbench.analysis.examples)")
    p.add_argument("--examples-out", type=Path, default=None,
                   help=f"output example-level tests (default: {TABLES['example_significance']} beside --out)")
    p.add_argument("--ood", type=Path, default=None,
                   help=f"{table_path('ood')}: also test each OOD set's accuracy like the dev metric")
    p.add_argument("--ood-out", type=Path, default=None,
                   help=f"output OOD tests (default: {TABLES['ood_significance']} beside --out)")
    p.add_argument("--reference", default=defaults["reference_method"],
                   help="reference method (default %(default)s)")
    p.add_argument("--all-pairs", action=argparse.BooleanOptionalAction, default=defaults["all_pairs"],
                   help="also compare every pair of methods (default %(default)s)")
    _add_stats_args(p, defaults)
    p.set_defaults(func=cmd_significance)

    p = subparsers.add_parser("plot", help="draw one comparison figure (PDF + PNG beside it)",
                              description="Draw one figure; the PNG is written beside --out with the same stem.")
    p.add_argument("kind", choices=list(PLOTS), help="which figure")
    for key in PLOT_INPUTS:
        if key == SPECTRUM:
            p.add_argument(f"--{key}", type=Path, nargs="+",
                           help=f"one or more spectrum.parquet, one per model ({_used_by(key)})")
        else:
            p.add_argument(f"--{key}", type=Path, help=f"{TABLES[key]} ({_used_by(key)})")
    per_task = ", ".join(k.name for k in PLOTS.values() if k.per_task)
    p.add_argument("--task", choices=list(TASKS), help=f"GLUE task ({per_task})")
    p.add_argument("--reference", default=None,
                   help="reference method for the dashed line (default: from --significance)")
    p.add_argument("--out", required=True, type=Path, help="output PDF")
    _add_stats_args(p, defaults)
    p.set_defaults(func=cmd_plot, _plot_parser=p)

    p = subparsers.add_parser("summary", help="write summary.md from the tables")
    p.add_argument("--runs", required=True, type=Path, help=TABLES["runs"])
    p.add_argument("--significance", type=Path, default=None, help=f"{TABLES['significance']} (marks)")
    p.add_argument("--reference", default=None, help="reference method (default: from --significance)")
    p.add_argument("--out", required=True, type=Path, help="output Markdown file")
    _add_stats_args(p, defaults)
    p.set_defaults(func=cmd_summary)

    p = subparsers.add_parser("explorer", help="write the interactive comparison page (one self-contained HTML)",
                              description="Write explorer.html: a Pareto plot with chosen axes, filters, a "
                                          "sortable table with significance marks and CSV download; plotly.js "
                                          "and the data inlined (no network when viewed).")
    p.add_argument("--runs", required=True, type=Path, help=TABLES["runs"])
    p.add_argument("--significance", type=Path, default=None,
                   help=f"{TABLES['significance']} (comparison with the reference; omit: no comparison columns)")
    p.add_argument("--reference", default=None, help="reference method (default: from --significance)")
    p.add_argument("--ood", type=Path, default=None,
                   help=f"{TABLES['ood']} (the evaluate_ood stage): OOD accuracies become y axes ood_<set>_accuracy")
    p.add_argument("--value", default=defaults["value"], choices=["dev_main", "best_dev_main"],
                   help="the analysis value column: the default y axis (default %(default)s)")
    p.add_argument("--out", required=True, type=Path, help="output HTML file")
    p.set_defaults(func=cmd_explorer)


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser with only the analysis sub-commands."""
    parser = argparse.ArgumentParser(prog="peftbench-analysis", description=__doc__.splitlines()[0])
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` with :func:`build_parser` and run the chosen sub-command."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
