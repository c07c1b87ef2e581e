"""A finished (or diverged) run's outputs: the ``metrics.parquet`` row and the run's tables.

Every file of :data:`peftbench.vocab.RUN_FILES` is written atomically, ``metrics.parquet`` last:
its presence marks a finished run. Every table carries the run key's columns
(:meth:`peftbench.runkey.RunKey.columns`) so it can be read alone.
"""
from __future__ import annotations

import importlib.metadata
import platform
import resource
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .io import save_tensors, write_table
from .runkey import RunKey
from .vocab import RUN_FILES, TaskSpec

PROTOCOL = "final epoch (dev_*) and best epoch (best_dev_*) on the GLUE dev split; one run per seed"
RANKS_COLUMNS = ["module", "layer", "kind", "rank", "score"]
GRADNORM_COLUMNS = ["step", "group", "layer", "grad_norm"]


def versions() -> dict[str, str]:
    """``{python,torch,transformers,peft,peftbench}_version`` of this process."""
    out = {"python_version": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "peftbench"):
        try:
            out[f"{pkg}_version"] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[f"{pkg}_version"] = "unknown"
    return out


def peak_mem_mib(device: torch.device) -> float:
    """Peak memory in MiB: CUDA max allocated on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def device_name(device: torch.device) -> str:
    """The GPU's name, or ``cpu (<machine>)``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"


def metric_columns(task: TaskSpec, evals: list[dict[str, float]], error: str | None) -> dict[str, Any]:
    """``dev_main``, ``best_dev_main``, ``best_epoch`` and ``dev_<m>`` / ``best_dev_<m>`` per task
    metric, from the per-epoch evaluations (NaN and ``best_epoch = -1`` for a failed run)."""
    if error is not None or not evals:
        row: dict[str, Any] = {"dev_main": float("nan"), "best_dev_main": float("nan"), "best_epoch": -1}
        for k in task.metric_names():
            row[f"dev_{k}"] = row[f"best_dev_{k}"] = float("nan")
        return row
    scores = [e[task.main_metric] for e in evals]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # first best epoch
    row = {"dev_main": evals[-1][task.main_metric], "best_dev_main": evals[best][task.main_metric],
           "best_epoch": best + 1}
    for k in task.metric_names():
        row[f"dev_{k}"] = evals[-1][k]
        row[f"best_dev_{k}"] = evals[best][k]
    return row


def gradnorm_columns(gradrows: list[tuple], phase_boundaries: list[int] | None = None) -> dict[str, float]:
    """Per-run summary of the gradient-norm log, as ``metrics.parquet`` columns.

    Reads the group rows (``layer = −1``: each group of :data:`peftbench.vocab.GRAD_GROUPS` and
    :data:`peftbench.vocab.GRAD_TOTAL`, as :func:`peftbench.train.gradient_norms` writes them) and
    ignores the per-layer rows, which the group rows already hold. Statistics are over the logged
    steps (every ``log_every``-th), in gradient-norm units:

    - ``gradnorm_mean_<group>``, ``gradnorm_max_<group>``: mean and max of the group norm;
    - with ``phase_boundaries`` (phased LoRA: the step at which each phase after the first starts),
      ``gradnorm_mean_<group>_p<k>``: the mean over the logged steps of phase ``k``
      (:func:`peftbench.methods.phased.phase_at`; a phase without a logged step gets NaN).

    Args:
        gradrows: ``(step, group, layer, grad_norm)`` tuples, ``step`` the 0-based index of the step.
        phase_boundaries: see above; ``None`` for methods without phases.

    Returns:
        ``{}`` when nothing was logged. A NaN/inf norm (a diverged step) propagates into its group's
        statistics.
    """
    rows = [(int(s), str(g), float(v)) for s, g, layer, v in gradrows if int(layer) == -1]
    if not rows:
        return {}
    df = pd.DataFrame(rows, columns=["step", "group", "grad_norm"])
    out: dict[str, float] = {}
    for g, sub in df.groupby("group", sort=True):
        vals = sub["grad_norm"].to_numpy()
        out[f"gradnorm_mean_{g}"] = float(vals.mean())
        out[f"gradnorm_max_{g}"] = float(vals.max())
    if phase_boundaries is not None:
        from .methods.phased import phase_at

        bounds = list(phase_boundaries)
        phase = df["step"].map(lambda s: phase_at(s, bounds))
        for g, sub in df.groupby("group", sort=True):
            for k in range(len(bounds) + 1):
                vals = sub.loc[phase[sub.index] == k, "grad_norm"].to_numpy()
                out[f"gradnorm_mean_{g}_p{k}"] = float(vals.mean()) if len(vals) else float("nan")
    return out


def _with_keys(df: pd.DataFrame, key: RunKey) -> pd.DataFrame:
    df = df.copy()
    for i, (k, v) in enumerate(key.columns().items()):
        df.insert(i, k, v)
    return df


def write_run(out_dir: str | Path, key: RunKey, row: dict[str, Any], *, adapter: dict[str, torch.Tensor],
              curve: list[dict], ranks: pd.DataFrame | None, gradrows: list[tuple]) -> None:
    """Write every run file into ``out_dir`` (``metrics.parquet`` last).

    Args:
        row: the ``metrics.parquet`` row without the key columns (they are put first).
        adapter: tensors for ``adapter.safetensors`` (the method's :meth:`state_to_save`).
        curve: ``curve.parquet`` rows. ranks: the method's ``ranks`` table (``None``: zero rows).
        gradrows: ``(step, group, layer, grad_norm)`` tuples for ``gradnorms.parquet``.
    """
    out_dir = Path(out_dir)
    meta = {k: str(v) for k, v in key.columns().items()}
    save_tensors(adapter, out_dir / RUN_FILES["adapter"], metadata=meta)
    write_table(_with_keys(pd.DataFrame(curve), key), out_dir / RUN_FILES["curve"])
    write_table(_with_keys(ranks if ranks is not None else pd.DataFrame(columns=RANKS_COLUMNS), key),
                out_dir / RUN_FILES["ranks"])
    write_table(_with_keys(pd.DataFrame(gradrows, columns=GRADNORM_COLUMNS), key), out_dir / RUN_FILES["gradnorms"])
    write_table(pd.DataFrame([{**key.columns(), **row}]), out_dir / RUN_FILES["metrics"])
