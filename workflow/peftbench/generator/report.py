"""The generator's summary table and figures (rule ``generator_report``).

:func:`summary_table` joins every split's ``evaluation.parquet`` and ``reconstruction.parquet``
into one row per (split, task): the generated adapters' reconstruction errors (mean over prompts
and seeds) and the checkpoint mean's, and the main dev metric of each variant (mean over seeds,
and for ``generated`` over prompts too). The in-task rows and the zero-shot (leave-one-task-out)
rows are reported apart (``zero_shot``). Figures (:data:`peftbench.vocab.GENERATOR_PLOTS`):
``generator_curves`` (training and validation loss and validation relative error per epoch and
split), ``generator_metric`` (main dev metric of each variant per task, in-task and zero-shot
panels), ``generator_errors`` (relative error of the generated factors per layer and matrix kind,
in-task split).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..io import write_table
from ..vocab import GENERATOR_PLOTS, GENERATOR_SUMMARY, order_tasks, task_label
from .evaluate import VARIANTS

#: Summary columns after (split, zero_shot, task, metric).
SUMMARY_VALUES = ["prompts", "mae", "rmse", "rel_error", "rel_error_checkpoint_mean",
                  *[f"dev_{v}" for v in VARIANTS]]


def summary_table(eval_files: list[str | Path], recon_files: list[str | Path]) -> pd.DataFrame:
    """One row per (split, task); see the module docstring."""
    ev = pd.concat([pd.read_parquet(f) for f in eval_files], ignore_index=True)
    rc = pd.concat([pd.read_parquet(f) for f in recon_files], ignore_index=True)
    rows = []
    for (split, task), g in ev.groupby(["split", "task"], sort=False):
        r = rc[(rc.split == split) & (rc.task == task)]
        gen, cm = r[r.variant == "generated"], r[r.variant == "checkpoint_mean"]
        row = {"split": split, "zero_shot": bool(g.zero_shot.iloc[0]), "task": task, "metric": g.metric.iloc[0],
               "prompts": int(g[g.variant == "generated"].prompt_id.nunique()),
               "mae": gen.mae.mean(), "rmse": gen.rmse.mean(), "rel_error": gen.rel_error.mean(),
               "rel_error_checkpoint_mean": cm.rel_error.mean()}
        for v in VARIANTS:
            row[f"dev_{v}"] = g[g.variant == v].dev_main.mean()
        rows.append(row)
    df = pd.DataFrame(rows)
    rank = {t: i for i, t in enumerate(order_tasks(df.task))}
    return df.sort_values(["zero_shot", "task"], key=lambda c: c.map(rank) if c.name == "task" else c) \
        .reset_index(drop=True)


def summary_markdown(df: pd.DataFrame, name: str) -> str:
    """The summary as Markdown: reconstruction and dev metric per task, in-task and zero-shot apart."""
    lines = [f"# Parameter generator `{name}` (seed 004)", "",
             "Dev metric: the task's main metric (×100), mean over seeds (generated: and over held-out prompts). "
             "Every variant uses the trained run's task head; head only = adapter removed (lora_B = 0); "
             "checkpoint mean = element-wise mean of the split's training checkpoints of the task (zero-shot: of "
             "all its training checkpoints). Relative error = ‖Ŵ − W‖_F / ‖W‖_F of the tokenised LoRA "
             "parameters against the run's final checkpoint.", ""]
    for zs, title in ((False, "In-task (held-out prompts)"), (True, "Zero-shot (leave-one-task-out)")):
        part = df[df.zero_shot == zs]
        if part.empty:
            continue
        lines += [f"## {title}", "",
                  "| task | metric | prompts | rel. error | rel. error (ckpt mean) | RMSE | generated | trained LoRA | "
                  "checkpoint mean | head only |", "|---|---|---|---|---|---|---|---|---|---|"]
        for _, r in part.iterrows():
            lines.append(f"| {task_label(r.task)} | {r.metric} | {r.prompts} | {r.rel_error:.3f} | "
                         f"{r.rel_error_checkpoint_mean:.3f} | {r.rmse:.2e} | " +
                         " | ".join(f"{100 * r[f'dev_{v}']:.1f}" for v in VARIANTS) + " |")
        lines.append("")
    return "\n".join(lines)


def write_summary(eval_files, recon_files, out_table: str | Path, out_md: str | Path, name: str) -> pd.DataFrame:
    """Write :func:`summary_table` (Parquet) and :func:`summary_markdown`."""
    df = summary_table(eval_files, recon_files)
    write_table(df, out_table)
    Path(out_md).write_text(summary_markdown(df, name), encoding="utf-8")
    return df


def write_report(*, name: str, evaluation: list, reconstruction: list, curve: list, errors_by_matrix: list,
                 out_dir: str | Path) -> pd.DataFrame:
    """The ``generator_report`` rule: :func:`write_summary` and every figure of
    :data:`peftbench.vocab.GENERATOR_PLOTS` (``<kind>.pdf`` and ``.png``) into ``out_dir``."""
    out_dir = Path(out_dir)
    df = write_summary(evaluation, reconstruction, out_dir / GENERATOR_SUMMARY["table"],
                       out_dir / GENERATOR_SUMMARY["markdown"], name)
    sources = {"summary": df, "curve": curve, "errors_by_matrix": errors_by_matrix}
    for kind, src in GENERATOR_PLOTS.items():
        data = sources[src]
        data = data if isinstance(data, pd.DataFrame) else pd.concat([pd.read_parquet(f) for f in data], ignore_index=True)
        plot(kind, data, out_dir / f"{kind}.pdf", out_dir / f"{kind}.png")
    return df


def plot(kind: str, df: pd.DataFrame, out_pdf: str | Path, out_png: str | Path) -> None:
    """Draw one figure of :data:`peftbench.vocab.GENERATOR_PLOTS` from its table (every split's rows).

    Raises:
        ValueError: an unknown kind.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if kind == "generator_curves":
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for split, g in df.groupby("split"):
            for role, style in (("train", "--"), ("validation", "-")):
                h = g[g.role == role]
                axes[0].plot(h.epoch, h.total, style, label=f"{split} ({role})")
            h = g[g.role == "validation"]
            axes[1].plot(h.epoch, h.rel_error, label=split)
        axes[0].set(xlabel="epoch", ylabel="loss (MSE + L1, normalised)", yscale="log")
        axes[1].set(xlabel="epoch", ylabel="validation relative error ‖Ŵ−W‖/‖W‖")
        axes[0].legend(fontsize=7)
        axes[1].legend(fontsize=7)
    elif kind == "generator_metric":
        parts = [(zs, df[df.zero_shot == zs]) for zs in (False, True) if (df.zero_shot == zs).any()]
        fig, axes = plt.subplots(1, len(parts), figsize=(5 * len(parts), 3.6), squeeze=False)
        for ax, (zs, part) in zip(axes[0], parts):
            tasks = order_tasks(part.task)
            width = 0.8 / len(VARIANTS)
            for i, v in enumerate(VARIANTS):
                vals = [100 * part[part.task == t][f"dev_{v}"].mean() for t in tasks]
                ax.bar([j + i * width for j in range(len(tasks))], vals, width, label=v.replace("_", " "))
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], [task_label(t) for t in tasks])
            ax.set(ylabel="dev main metric (×100)", title="zero-shot (leave-one-task-out)" if zs else "in-task")
            ax.legend(fontsize=7)
    elif kind == "generator_errors":
        part = df[~df.zero_shot] if (~df.zero_shot).any() else df
        piv = part.groupby(["layer", "kind", "factor"]).rel_error.mean().unstack(["kind", "factor"])
        fig, ax = plt.subplots(figsize=(1.0 + 0.7 * piv.shape[1], 0.5 + 0.45 * piv.shape[0]))
        im = ax.imshow(piv.to_numpy(), aspect="auto", cmap="viridis")
        ax.set_xticks(range(piv.shape[1]), [f"{k} {f}" for k, f in piv.columns], rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(piv.shape[0]), [f"layer {i}" for i in piv.index], fontsize=7)
        fig.colorbar(im, ax=ax, label="relative error of the generated factor")
    else:
        raise ValueError(f"unknown generator plot {kind!r}")
    fig.tight_layout()
    Path(out_pdf).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_pdf)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
