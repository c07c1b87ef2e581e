"""Command-line interface of the analysis stage: ``significance``, ``plot`` and ``summary``.

The package's main CLI calls :func:`register` with its sub-parser collection; each sub-command
sets ``func`` to a function taking the parsed :class:`argparse.Namespace`. For use without the
main CLI, :func:`main` builds a parser with only these sub-commands
(``python -m peftbench.analysis.cli significance --runs ... --out ...``).

Sub-commands::

    significance --runs R --out S [--stats-out M] [--reference lora] [--all-pairs]
                 [--resamples 10000] [--confidence 0.95] [--seed 0] [--ci-method BCa]
                 [--value dev_main] [--glue-exclude TASK ...]
    plot KIND --out F.pdf [--runs R] [--significance S] [--curves C] [--ranks K]
              [--gradnorms G] [--spectrum P [P ...]] [--task T] [--reference M]
              [statistics options as above]
    summary --runs R --out summary.md [--significance S] [statistics options as above]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Heavy modules (pandas, scipy, matplotlib) are imported inside the commands, so that the package
# CLI can call register() on every start-up without paying for them.

__all__ = ["register", "main", "build_parser", "PLOT_KINDS"]

#: The figure kinds of ``peftbench plot`` (same as ``plots.PLOT_KINDS``).
PLOT_KINDS = ("glue", "task", "pareto", "cost", "curves", "ranks", "spectrum", "gradnorms")

_HINTS = {
    "runs": "it is written by the aggregate rule: `snakemake results/tables/runs.parquet`",
    "significance": "it is written by the significance rule: `snakemake results/tables/significance.parquet`",
    "curves": "it is written by the aggregate rule: `snakemake results/tables/curves.parquet`",
    "ranks": "it is written by the aggregate rule: `snakemake results/tables/ranks.parquet`",
    "gradnorms": "it is written by the aggregate rule: `snakemake results/tables/gradnorms.parquet`",
    "spectrum": "it is written by the svd rule: `snakemake results/svd/<model>/spectrum.parquet`",
}

#: Which inputs each plot kind needs (besides --out).
PLOT_INPUTS = {"glue": ("runs",), "task": ("runs", "task"), "pareto": ("runs",), "cost": ("runs",),
               "curves": ("curves",), "ranks": ("ranks",), "spectrum": ("spectrum",),
               "gradnorms": ("gradnorms",)}


def _add_stats_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("statistics (use the same values in significance, plot and summary)")
    g.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    g.add_argument("--confidence", type=float, default=0.95, help="confidence level of the bootstrap CI (default 0.95)")
    g.add_argument("--seed", type=int, default=0, help="bootstrap random seed (default 0)")
    g.add_argument("--ci-method", default="BCa", choices=["BCa", "percentile", "basic"],
                   help="scipy.stats.bootstrap method (default BCa)")
    g.add_argument("--value", default="dev_main", choices=["dev_main", "best_dev_main"],
                   help="compared value: final epoch (dev_main, default) or best epoch (best_dev_main)")
    g.add_argument("--glue-exclude", nargs="*", default=[], metavar="TASK",
                   help="tasks left out of the GLUE average (default: none)")


def _opts(args: argparse.Namespace):
    from .significance import StatsOptions

    return StatsOptions(resamples=args.resamples, confidence=args.confidence, seed=args.seed,
                        ci_method=args.ci_method, value=args.value, glue_exclude=tuple(args.glue_exclude))


def load_runs(path: str | Path, value: str = "dev_main"):
    """Read and validate ``runs.parquet``; errors name the file and how to regenerate it."""
    from .significance import RUNS_REQUIRED, read_table, validate_runs

    df = read_table(path, (*RUNS_REQUIRED, value), allow_empty=False, hint=_HINTS["runs"])
    return validate_runs(df, source=str(path), value=value)


def cmd_significance(args: argparse.Namespace) -> int:
    """``peftbench significance``: write significance.parquet and method_stats.parquet."""
    from .significance import compare_methods, method_stats

    opts = _opts(args)
    runs = load_runs(args.runs, opts.value)
    sig = compare_methods(runs, reference=args.reference, all_pairs=args.all_pairs, opts=opts)
    stats_ = method_stats(runs, opts)
    out = Path(args.out)
    stats_out = Path(args.stats_out) if args.stats_out else out.with_name("method_stats.parquet")
    for path, df in ((out, sig), (stats_out, stats_)):
        path.parent.mkdir(parents=True, exist_ok=True)
        df.to_parquet(path, index=False)
    if args.reference not in set(runs["method"]):
        print(f"warning: reference method {args.reference!r} has no runs in {args.runs}; "
              "every comparison has n = 0", file=sys.stderr)
    print(f"wrote {out} ({len(sig)} comparisons) and {stats_out} ({len(stats_)} method rows)")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """``peftbench plot KIND``: write one figure as PDF plus a PNG beside it."""
    missing = [f"--{need}" for need in PLOT_INPUTS[args.kind] if not getattr(args, need)]
    if missing:
        args._plot_parser.error(f"plot {args.kind} needs {' and '.join(missing)}")
    import pandas as pd

    from .plots import (plot_cost, plot_curves, plot_glue, plot_gradnorms, plot_pareto, plot_ranks,
                        plot_spectrum, plot_task)
    from .significance import read_table

    opts = _opts(args)
    sig = (read_table(args.significance, ("model", "task", "budget", "method", "baseline", "reference"),
                      hint=_HINTS["significance"]) if args.significance else None)
    k = args.kind
    if k in ("glue", "task", "pareto", "cost"):
        runs = load_runs(args.runs, opts.value)
    if k == "glue":
        figs = plot_glue(runs, sig, opts, reference=args.reference)
    elif k == "task":
        figs = plot_task(runs, args.task, sig, opts, reference=args.reference)
    elif k == "pareto":
        figs = plot_pareto(runs, opts)
    elif k == "cost":
        figs = plot_cost(runs)
    elif k == "curves":
        figs = plot_curves(read_table(args.curves, hint=_HINTS["curves"]), reference=args.reference)
    elif k == "ranks":
        figs = plot_ranks(read_table(args.ranks, hint=_HINTS["ranks"]))
    elif k == "spectrum":
        spec = pd.concat([read_table(p, hint=_HINTS["spectrum"]) for p in args.spectrum], ignore_index=True)
        figs = plot_spectrum(spec)
    elif k == "gradnorms":
        figs = plot_gradnorms(read_table(args.gradnorms, hint=_HINTS["gradnorms"]))
    else:  # pragma: no cover - argparse restricts kind
        raise ValueError(f"unknown plot kind {k!r}")
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
                      hint=_HINTS["significance"]) if args.significance else None)
    out = write_summary(runs, sig, args.out, opts, reference=args.reference)
    print(f"wrote {out}")
    return 0


def _save_figures():
    """plots.save_figures, looked up at call time (tests replace it to skip rendering)."""
    from . import plots

    return plots.save_figures


def register(subparsers) -> None:
    """Add the ``significance``, ``plot`` and ``summary`` sub-commands to ``subparsers``
    (the object returned by ``ArgumentParser.add_subparsers``). Each sets ``func``."""
    p = subparsers.add_parser(
        "significance", help="seed-paired tests of every method vs the reference (and GLUE average)",
        description="Write significance.parquet (paired bootstrap CI, t-test, Wilcoxon, Cohen's d, "
                    "Holm-adjusted p per model x task x budget, plus task == glue_avg rows) and "
                    "method_stats.parquet (per-method mean, SD, bootstrap CI; glue_avg rows = GLUE average).")
    p.add_argument("--runs", required=True, type=Path, help="results/tables/runs.parquet")
    p.add_argument("--out", required=True, type=Path, help="output significance.parquet")
    p.add_argument("--stats-out", type=Path, default=None,
                   help="output per-method statistics (default: method_stats.parquet beside --out)")
    p.add_argument("--reference", default="lora", help="reference method (default lora)")
    p.add_argument("--all-pairs", action="store_true", help="also compare every pair of methods")
    _add_stats_args(p)
    p.set_defaults(func=cmd_significance)

    p = subparsers.add_parser("plot", help="draw one comparison figure (PDF + PNG beside it)",
                              description="Draw one figure; the PNG is written beside --out with the same stem.")
    p.add_argument("kind", choices=PLOT_KINDS, help="which figure")
    p.add_argument("--runs", type=Path, help="runs.parquet (glue, task, pareto, cost)")
    p.add_argument("--significance", type=Path, help="significance.parquet (glue, task: significance marks)")
    p.add_argument("--curves", type=Path, help="curves.parquet (curves)")
    p.add_argument("--ranks", type=Path, help="ranks.parquet (ranks)")
    p.add_argument("--gradnorms", type=Path, help="gradnorms.parquet (gradnorms)")
    p.add_argument("--spectrum", type=Path, nargs="+", help="one or more spectrum.parquet (spectrum)")
    p.add_argument("--task", help="GLUE task (task)")
    p.add_argument("--reference", default=None,
                   help="reference method for the dashed line (default: from --significance)")
    p.add_argument("--out", required=True, type=Path, help="output PDF")
    _add_stats_args(p)
    p.set_defaults(func=cmd_plot, _plot_parser=p)

    p = subparsers.add_parser("summary", help="write summary.md from the tables")
    p.add_argument("--runs", required=True, type=Path, help="runs.parquet")
    p.add_argument("--significance", type=Path, default=None, help="significance.parquet (marks)")
    p.add_argument("--reference", default=None, help="reference method (default: from --significance)")
    p.add_argument("--out", required=True, type=Path, help="output Markdown file")
    _add_stats_args(p)
    p.set_defaults(func=cmd_summary)


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
