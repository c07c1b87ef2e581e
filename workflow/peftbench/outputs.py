"""A finished (or diverged) run's outputs: the ``metrics.parquet`` row and the run's tables.

Every file of :data:`peftbench.vocab.RUN_FILES` is written atomically, ``metrics.parquet`` last:
its presence marks a finished run. Every table carries the run key's columns
(:meth:`peftbench.runkey.RunKey.columns`) so it can be read alone.

Provenance (:func:`provenance`, the columns of :data:`peftbench.vocab.PROVENANCE`): every row
says which commit of this checkout (and whether it was dirty), which model weights and which
tokenised data files (sha256), which package versions, host and device produced it, and
:func:`write_run` adds the adapter file's size (``adapter_bytes``). Hashes and the git state are
computed once per process and file.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import platform
import resource
import socket
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .io import atomic_path, save_tensors, write_table
from .runkey import RunKey
from .vocab import PROVENANCE, RUN_FILES, VERSIONED_PACKAGES, TaskSpec

PROTOCOL = "final epoch (dev_*) and best epoch (best_dev_*) on the GLUE dev split; one run per seed"
RANKS_COLUMNS = ["module", "layer", "kind", "rank", "score"]
GRADNORM_COLUMNS = ["step", "group", "layer", "grad_norm"]
#: Columns of ``predictions.parquet`` before the per-class ``logit_<c>`` (STS-B: ``score``) columns.
PREDICTION_COLUMNS = ["epoch", "split", "idx", "label", "prediction"]


def versions() -> dict[str, str]:
    """``python_version``, ``<package>_version`` for every package of
    :data:`peftbench.vocab.VERSIONED_PACKAGES` ("unknown" when not installed) and
    ``cuda_version`` (the CUDA version PyTorch was built with, "none" for a CPU build)."""
    out = {"python_version": platform.python_version()}
    for pkg in VERSIONED_PACKAGES:
        try:
            out[f"{pkg}_version"] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[f"{pkg}_version"] = "unknown"
    out["cuda_version"] = torch.version.cuda or "none"
    return out


#: The checkout this package runs from (``workflow/peftbench/outputs.py`` -> repository root).
CHECKOUT = Path(__file__).resolve().parents[2]

#: File name endings of model weight files (what :func:`model_provenance` hashes).
WEIGHT_SUFFIXES: tuple[str, ...] = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


@functools.lru_cache(maxsize=None)
def git_state(repo: str | Path = CHECKOUT) -> tuple[str, bool | None]:
    """``(commit, dirty)`` of the git checkout at ``repo``, once per process.

    ``commit`` is ``git -C repo rev-parse HEAD``; ``dirty`` is True when ``git status
    --porcelain`` lists anything (modified, staged or untracked files; ignored ones such as
    ``results/`` do not count). Outside a git checkout, without a ``git`` executable or when git
    refuses the directory (e.g. "dubious ownership"), the result is ``("unknown", None)``.
    """
    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout if proc.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    if head is None or not head.strip():
        return "unknown", None
    status = git("status", "--porcelain")
    return head.strip(), (None if status is None else bool(status.strip()))


@functools.lru_cache(maxsize=None)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, computed once per process for a given (path, size, mtime).

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    p = Path(path).resolve()
    st = p.stat()
    return _sha256_cached(str(p), st.st_size, st.st_mtime_ns)


def _combined(named: list[tuple[str, str]]) -> str:
    """One hash of several named hashes: the hash itself for one, else the sha256 of the
    ``"name hash\n"`` lines in the given order."""
    if len(named) == 1:
        return named[0][1]
    return hashlib.sha256("".join(f"{n} {h}\n" for n, h in named).encode()).hexdigest()


def _hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot directory of hub model ``repo_id`` (named after its commit), or None
    when it is not in the Hugging Face cache. Never touches the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on it
        return None
    hit = try_to_load_from_cache(repo_id, "config.json")
    return Path(hit).parent if isinstance(hit, str) else None


@functools.lru_cache(maxsize=None)
def model_provenance(model_spec: str) -> dict[str, str]:
    """``model_revision`` and ``model_sha256`` of a model spec, once per process.

    The spec is resolved as training resolves it (:func:`peftbench.models.resolve_model`): a
    local directory or ``package:NAME`` (revision ``local`` / ``package NAME VERSION``), or a hub
    id whose cached snapshot gives the revision (the hub commit) and the files. The hash covers
    every weight file (:data:`WEIGHT_SUFFIXES`) directly in that directory, sorted by name: the
    file's sha256 for one file, else the sha256 of the ``"name sha256"`` lines. "unknown" where
    the files cannot be found (a hub id missing from the cache).
    """
    from .models import resolve_model

    resolved = resolve_model(model_spec)
    path = Path(resolved)
    if model_spec.startswith("package:"):
        name = model_spec.split(":", 1)[1]
        try:
            version = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            version = "unknown version"
        revision = f"package {name} {version}"
    elif path.is_dir():
        revision = "local"
    else:
        snap = _hub_snapshot(resolved)
        if snap is None:
            return {"model_revision": "unknown", "model_sha256": "unknown"}
        path, revision = snap, snap.name
    files = sorted(f for f in path.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    digest = _combined([(f.name, sha256_file(f)) for f in files]) if files else "unknown"
    return {"model_revision": revision, "model_sha256": digest}


def provenance(model_spec: str, train_path: str | Path, dev_paths: dict[str, str | Path],
               device: torch.device, model_cache: str | Path | None = None) -> dict[str, Any]:
    """The provenance columns (:data:`peftbench.vocab.PROVENANCE`) of one run.

    Args:
        model_spec: what ``models:`` maps the model to.
        model_cache: the model cache the run loaded (:mod:`peftbench.modelcache`): its manifest
            gives ``model_revision`` and ``model_sha256``, computed from the spec when the cache
            was written (the same values, without hashing the weights in every job).
        train_path: the tokenised train Parquet file the run read.
        dev_paths: ``{split: tokenised dev Parquet file}`` in the task's split order.
        device: the training device.

    Returns:
        ``{column: value}`` for every column of :data:`~peftbench.vocab.PROVENANCE` (strings;
        ``git_dirty`` a bool or None).

    Raises:
        FileNotFoundError: a data file does not exist.
    """
    commit, dirty = git_state()
    dev = [(s, sha256_file(p)) for s, p in dev_paths.items()]
    if model_cache is not None:
        from .modelcache import check_cache

        man = check_cache(model_cache, model_spec)
        model = {k: man[k] for k in ("model_revision", "model_sha256")}
    else:
        model = model_provenance(model_spec)
    row = {"git_commit": commit, "git_dirty": dirty, **model,
           "data_train_sha256": sha256_file(train_path),
           "data_dev_sha256": dev[0][1] if len(dev) == 1 else ",".join(f"{s}={h}" for s, h in dev),
           **versions(), "device": device_name(device), "host": socket.gethostname()}
    missing = set(PROVENANCE) - set(row)
    if missing:  # pragma: no cover - a vocabulary invariant
        raise RuntimeError(f"provenance() does not fill {sorted(missing)} of vocab.PROVENANCE")
    return {k: row[k] for k in PROVENANCE}


def peak_mem_mib(device: torch.device) -> float:
    """Peak memory in MiB: CUDA max allocated on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def process_age_s() -> float:
    """Wall-clock seconds since this process started (Linux ``/proc``; NaN elsewhere).

    Resolution: one clock tick (usually 10 ms). The ``import_s`` phase of a run
    (:data:`peftbench.vocab.RUN_PHASES`).
    """
    import os

    try:
        # field 22 of /proc/self/stat: start time in clock ticks after boot (the name may hold spaces)
        start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(uptime - start / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return float("nan")


def device_name(device: torch.device) -> str:
    """The GPU's name, or ``cpu (<machine>)``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"


def metric_columns(task: TaskSpec, evals: list[dict[str, float]], error: str | None) -> dict[str, Any]:
    """``dev_main``, ``best_dev_main``, ``best_epoch`` and ``dev_<m>`` / ``best_dev_<m>`` per task
    metric, from the evaluations in epoch order (NaN and ``best_epoch = -1`` for a failed run).

    ``evals``: one ``{metric: value}`` per evaluated epoch; its ``epoch`` key (1-based) is the
    epoch evaluated (without it, the position in the list: every epoch evaluated), so with
    ``eval_every_epoch: false`` the single evaluation's epoch is the last one."""
    if error is not None or not evals:
        row: dict[str, Any] = {"dev_main": float("nan"), "best_dev_main": float("nan"), "best_epoch": -1}
        for k in task.metric_names():
            row[f"dev_{k}"] = row[f"best_dev_{k}"] = float("nan")
        return row
    scores = [e[task.main_metric] for e in evals]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # first best epoch
    row = {"dev_main": evals[-1][task.main_metric], "best_dev_main": evals[best][task.main_metric],
           "best_epoch": int(evals[best].get("epoch", best + 1))}
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
    - ``gradnorm_ratio_attention_mlp``: mean attention norm / mean mlp norm (seed 003's balance
      of the two blocks; NaN where the mlp mean is 0);
    - with ``phase_boundaries`` (phased LoRA: the step at which each phase after the first starts),
      ``gradnorm_mean_<group>_p<k>`` and ``gradnorm_ratio_attention_mlp_p<k>``: the same over the
      logged steps of phase ``k`` (:func:`peftbench.methods.phased.phase_at`; a phase without a
      logged step gets NaN).

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
    if {"attention", "mlp"} <= set(df["group"]):
        out["gradnorm_ratio_attention_mlp"] = _ratio(df, df.index)
    if phase_boundaries is not None:
        from .methods.phased import phase_at

        bounds = list(phase_boundaries)
        phase = df["step"].map(lambda s: phase_at(s, bounds))
        for g, sub in df.groupby("group", sort=True):
            for k in range(len(bounds) + 1):
                vals = sub.loc[phase[sub.index] == k, "grad_norm"].to_numpy()
                out[f"gradnorm_mean_{g}_p{k}"] = float(vals.mean()) if len(vals) else float("nan")
        if "gradnorm_ratio_attention_mlp" in out:
            for k in range(len(bounds) + 1):
                out[f"gradnorm_ratio_attention_mlp_p{k}"] = _ratio(df, df.index[phase == k])
    return out


def _ratio(df: pd.DataFrame, rows) -> float:
    """Mean attention group norm over mean mlp group norm on ``rows`` of a group-row frame (NaN
    when the mlp mean is 0 — a phase that freezes the MLP — or no step was logged)."""
    sub = df.loc[rows]
    att = sub.loc[sub["group"] == "attention", "grad_norm"]
    mlp = sub.loc[sub["group"] == "mlp", "grad_norm"]
    if att.empty or mlp.empty or float(mlp.mean()) == 0.0:
        return float("nan")
    return float(att.mean() / mlp.mean())


def prediction_frame(task: TaskSpec, splits: dict[str, tuple], epochs: list[tuple[int, dict]]) -> pd.DataFrame:
    """The rows of ``predictions.parquet``: one per (evaluated epoch, dev split, example).

    Columns (compact dtypes): ``epoch`` (int16, 1-based: the final epoch gives the ``dev_*``
    metrics, ``best_epoch`` of the metrics row the ``best_dev_*`` ones), ``split`` (str), ``idx``
    (int64, the GLUE ``idx``), ``label`` (int8 class id; STS-B float32 gold score), ``prediction``
    (int8 argmax class; STS-B float32 score) and the raw outputs: ``logit_0 … logit_{C-1}``
    (float32, ``C = num_labels``) for classification, ``score`` (float32) for STS-B.
    :func:`peftbench.metrics.compute_metrics` on these columns gives the logged metrics exactly.

    Args:
        task: the task (decides regression vs classification, the class count).
        splits: ``{split: (idx (n,), labels (n,))}`` in the order the logits are in.
        epochs: ``[(epoch, {split: (n, C) float32 logits})]``; empty (a failed run): zero rows.

    Raises:
        ValueError: logits whose row count or width does not fit the split / task.
    """
    width = 1 if task.is_regression else task.num_labels
    out_cols = ["score"] if task.is_regression else [f"logit_{c}" for c in range(width)]
    frames = []
    for epoch, logits in epochs:
        for split, (idx, labels) in splits.items():
            z = np.asarray(logits[split], dtype=np.float32).reshape(len(logits[split]), -1)
            if z.shape != (len(idx), width):
                raise ValueError(f"{task.name}/{split}: logits of shape {z.shape}, expected ({len(idx)}, {width})")
            df = pd.DataFrame({"epoch": np.full(len(idx), epoch, dtype=np.int16), "split": split,
                               "idx": np.asarray(idx, dtype=np.int64)})
            if task.is_regression:
                df["label"] = np.asarray(labels, dtype=np.float32)
                df["prediction"] = z[:, 0]
            else:
                df["label"] = np.asarray(labels).astype(np.int8)
                df["prediction"] = z.argmax(axis=1).astype(np.int8)
            for c, name in enumerate(out_cols):
                df[name] = z[:, c]
            frames.append(df)
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(
            PREDICTION_COLUMNS + out_cols,
            ["int16", "object", "int64", "float32" if task.is_regression else "int8",
             "float32" if task.is_regression else "int8"] + ["float32"] * len(out_cols))})
    return pd.concat(frames, ignore_index=True)


#: Columns of a causal-LM run's ``predictions.parquet`` (:func:`generation_frame`).
GENERATION_COLUMNS = ["epoch", "split", "idx", "label", "prediction", "generated", "reference"]


def generation_frame(task: TaskSpec, splits: dict[str, tuple], epochs: list[tuple[int, dict]]) -> pd.DataFrame:
    """The rows of a causal-LM run's ``predictions.parquet``: one per (evaluated epoch, dev split,
    example), as :func:`prediction_frame` (final epoch, and the first best one when it differs).

    Columns: ``epoch`` (int16), ``split``, ``idx`` (int64), ``label`` (int8 gold class id of a
    verbaliser task, -1 for text tasks), ``prediction`` (int8: the class the generation names,
    :func:`peftbench.generation.verbalise`, -1 when none or a text task), ``generated`` (the decoded
    generation), ``reference`` (the references joined by ``" ||| "``).
    :func:`peftbench.metrics.compute_generation_metrics` on ``generated`` gives the logged metrics.

    Args:
        splits: ``{split: (idx (n,), labels (n,), references [n lists])}``.
        epochs: ``[(epoch, {split: [n generated texts]})]``; empty (a failed run): zero rows.

    Raises:
        ValueError: a split with another number of generations than examples.
    """
    from .generation import verbalise

    frames = []
    for epoch, texts in epochs:
        for split, (idx, labels, refs) in splits.items():
            gen = list(texts[split])
            if len(gen) != len(idx):
                raise ValueError(f"{task.name}/{split}: {len(gen)} generations for {len(idx)} examples")
            pred = [verbalise(t, task.verbaliser) if task.verbaliser else -1 for t in gen]
            frames.append(pd.DataFrame({
                "epoch": np.full(len(idx), epoch, dtype=np.int16), "split": split,
                "idx": np.asarray(idx, dtype=np.int64), "label": np.asarray(labels).astype(np.int8),
                "prediction": np.asarray(pred, dtype=np.int8), "generated": gen,
                "reference": [" ||| ".join(r) for r in refs]}))
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(
            GENERATION_COLUMNS, ["int16", "object", "int64", "int8", "int8", "object", "object"])})
    return pd.concat(frames, ignore_index=True)


def _with_keys(df: pd.DataFrame, key: RunKey) -> pd.DataFrame:
    df = df.copy()
    for i, (k, v) in enumerate(key.columns().items()):
        df.insert(i, k, v)
    return df


def write_run(out_dir: str | Path, key: RunKey, row: dict[str, Any], *, adapter: dict[str, torch.Tensor],
              curve: list[dict], ranks: pd.DataFrame | None, gradrows: list[tuple],
              predictions: pd.DataFrame | None = None, method_state: dict[str, Any] | None = None,
              write_started: float | None = None) -> dict[str, Any]:
    """Write every run file into ``out_dir`` (``metrics.parquet`` last).

    Args:
        row: the ``metrics.parquet`` row without the key columns (they are put first).
        adapter: tensors for ``adapter.safetensors`` (the method's :meth:`state_to_save`).
        curve: ``curve.parquet`` rows. ranks: the method's ``ranks`` table (``None``: zero rows).
        gradrows: ``(step, group, layer, grad_norm)`` tuples for ``gradnorms.parquet``.
        predictions: ``predictions.parquet`` rows (:func:`prediction_frame`; ``None``: zero rows).
        method_state: the method's :meth:`~peftbench.methods.base.Method.checkpoint_state` at the
            end of training, for ``method_state.pt`` (``None``: an empty dict); a reload restores it
            before loading the adapter (:func:`peftbench.checkpoint.load_trained`).
        write_started: ``time.perf_counter()`` when the caller began its outputs; the row then gets
            ``write_s``, the seconds from then until ``metrics.parquet`` is written (the
            ``write_s`` phase of :data:`peftbench.vocab.RUN_PHASES`). ``None``: no ``write_s``.

    Returns:
        The row as written, without the key columns: ``row`` plus ``adapter_bytes`` (size of
        ``adapter.safetensors`` in bytes) and, with ``write_started``, ``write_s``.
    """
    import time

    out_dir = Path(out_dir)
    meta = {k: str(v) for k, v in key.columns().items()}
    save_tensors(adapter, out_dir / RUN_FILES["adapter"], metadata=meta)
    row = {**row, "adapter_bytes": (out_dir / RUN_FILES["adapter"]).stat().st_size}
    with atomic_path(out_dir / RUN_FILES["method_state"]) as tmp:
        torch.save(method_state or {}, tmp)
    write_table(_with_keys(pd.DataFrame(curve), key), out_dir / RUN_FILES["curve"])
    write_table(_with_keys(ranks if ranks is not None else pd.DataFrame(columns=RANKS_COLUMNS), key),
                out_dir / RUN_FILES["ranks"])
    write_table(_with_keys(pd.DataFrame(gradrows, columns=GRADNORM_COLUMNS), key), out_dir / RUN_FILES["gradnorms"])
    write_table(_with_keys(predictions if predictions is not None else pd.DataFrame(columns=PREDICTION_COLUMNS), key),
                out_dir / RUN_FILES["predictions"])
    if write_started is not None:
        row["write_s"] = time.perf_counter() - write_started
    write_table(pd.DataFrame([{**key.columns(), **row}]), out_dir / RUN_FILES["metrics"])
    return row
