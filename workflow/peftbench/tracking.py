"""Optional experiment tracking: mirror each finished run into an experiment tracker.

Off by default (``tracking: {backend: none}`` in the config). With ``backend: mlflow`` every train
job, once its outputs are written, logs its run as one MLflow run in experiment
``tracking.experiment`` of the store ``tracking.uri`` (default ``results/mlruns``, a local file
store):

- **run name** the run key (``minilm/cola/lora b0.6 s1``); **status** ``FINISHED``, or ``FAILED``
  for a run stopped by a NaN/inf loss;
- **params** the key columns (model, task, method, budget, seed) and the tracked recipe
  (:class:`peftbench.recipe.Recipe`; method options as ``method_options.<name>``);
- **metrics** the learning curve against the optimizer step (``train/loss``, ``train/lr`` and the
  method's logged values ``train/<name>`` at every logged step; ``eval/dev_<metric>`` at every
  epoch's evaluation) and, at the last step, every finite numeric column of the
  ``metrics.parquet`` row (``dev_*``, ``best_dev_*``, ``train_s``, ``samples_per_s``,
  ``peak_mem_mib``, parameter counts, ``adapter_bytes`` …);
- **tags** ``status``, ``error``, ``peftbench.run_key``, ``peftbench.run_dir`` and the provenance
  columns (:data:`peftbench.vocab.PROVENANCE`: commit, model and data hashes, versions, host).

Why MLflow, and ``mlflow-skinny``: it installs from PyPI here, runs without a server or a network
and keeps the store in plain files beside the results; ``mlflow-skinny`` is the tracking client
alone (the full ``mlflow`` adds the UI server and SQL stores, and some 40 more packages).
MLflow 3 keeps the file store in maintenance mode and refuses it unless
``MLFLOW_ALLOW_FILE_STORE=true``; this module sets that variable (unless it is already set) for
its own process when ``uri`` is a local path. Reading the store therefore needs it too::

    MLFLOW_ALLOW_FILE_STORE=true python -c "from mlflow import MlflowClient; \\
        print(MlflowClient('results/mlruns').search_experiments())"
    MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri results/mlruns   # full mlflow only

A rerun of a run logs a new MLflow run under the same name (tag ``peftbench.run_key``); the
newest is the one whose files are in ``results/runs``.

Tracking is a runtime option (:class:`peftbench.recipe.Tracking`, part of
:class:`~peftbench.recipe.Runtime`): turning it on or off reruns nothing. Torch-free; MLflow is
imported only when a run is mirrored.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import time
from typing import TYPE_CHECKING, Any, Iterable

from .vocab import PROVENANCE

if TYPE_CHECKING:  # pragma: no cover
    from .recipe import Recipe, Tracking
    from .runkey import RunKey

log = logging.getLogger(__name__)

#: Tracking backends (the schema's ``tracking.backend`` enum; tests check the two agree) and the
#: importable module each needs (None: nothing).
BACKENDS: dict[str, str | None] = {"none": None, "mlflow": "mlflow"}

#: What to install for a backend's module.
_INSTALL = {"mlflow": 'pip install mlflow-skinny (or pip install -e ".[tracking]")'}

#: MLflow's limits per ``log_batch`` request.
_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS = 1000, 100, 100
_MAX_TAG_CHARS = 5000


class TrackingError(RuntimeError):
    """The tracker refused or failed to record a run."""


def check_backend(backend: str) -> None:
    """Check that ``backend`` is one of :data:`BACKENDS` and that its package is importable.

    Raises:
        ValueError: an unknown backend (the message lists the allowed ones) or a missing package
            (the message says what to install, or to set ``tracking.backend: none``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"config key tracking.backend: {backend!r} is not a tracking backend; allowed: "
                         f"{', '.join(BACKENDS)}")
    module = BACKENDS[backend]
    if module is not None and importlib.util.find_spec(module) is None:
        raise ValueError(f"config key tracking.backend: {backend} needs the Python package {module!r}, which is "
                         f"not installed. Fix: {_INSTALL[backend]}, or set tracking.backend: none")


def is_local_store(uri: str) -> bool:
    """True when ``uri`` names a local directory (a path or ``file:`` URI), i.e. a file store."""
    return uri.startswith("file:") or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", uri) is None


def mlflow_client(uri: str):
    """An ``mlflow.MlflowClient`` for tracking URI ``uri`` (a local path opens a file store: sets
    ``MLFLOW_ALLOW_FILE_STORE=true`` in this process unless the variable is already set)."""
    if is_local_store(uri):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _metric_name(name: str) -> str:
    """``name`` with the characters MLflow rejects in a key replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)


def _finite(v: Any) -> float | None:
    """``v`` as a float when it is a finite real number (not a bool), else None."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def curve_metrics(curve: Iterable[dict]) -> list[tuple[str, float, int]]:
    """``(name, value, step)`` of every finite value of a run's ``curve.parquet`` rows.

    Train rows give ``train/<column>`` (loss, lr and the method's logged values), eval rows
    ``eval/<column>`` (``dev_main``, ``dev_<metric>``, lr); ``step`` is the optimizer step.
    """
    out = []
    for r in curve:
        kind = r.get("kind", "train")
        for k, v in r.items():
            if k in ("step", "epoch", "kind"):
                continue
            f = _finite(v)
            if f is not None:
                out.append((_metric_name(f"{kind}/{k}"), f, int(r["step"])))
    return out


def final_metrics(row: dict[str, Any], skip: Iterable[str] = ()) -> dict[str, float]:
    """Every finite numeric column of a ``metrics.parquet`` row (bools, strings, NaN and the
    columns of ``skip`` left out)."""
    skip = set(skip)
    return {_metric_name(k): f for k, v in row.items() if k not in skip and (f := _finite(v)) is not None}


def run_params(key: "RunKey", recipe: "Recipe") -> dict[str, str]:
    """MLflow params of a run: its key columns and its tracked recipe (method options flattened
    as ``method_options.<name>``), as strings."""
    import dataclasses

    params = {k: str(v) for k, v in key.columns().items()}
    for k, v in dataclasses.asdict(recipe).items():
        if k == "method_options":
            params.update({f"method_options.{o}": str(x) for o, x in (v or {}).items()})
        else:
            params[k] = str(v)
    return params


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _experiment_id(client, name: str) -> str:
    """The id of experiment ``name``, created when missing (another job creating it at the same
    moment is fine)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # a concurrent job created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def mirror(tracking: "Tracking", key: "RunKey", recipe: "Recipe", row: dict[str, Any], curve: list[dict],
           run_dir: str) -> str | None:
    """Log one finished run to the tracker of ``tracking`` (see the module docstring).

    Args:
        tracking: the runtime's tracking options.
        key: the run; recipe: its tracked recipe.
        row: the ``metrics.parquet`` row without the key columns (as :func:`peftbench.outputs.write_run`
            returns it).
        curve: the ``curve.parquet`` rows.
        run_dir: the run directory (a tag).

    Returns:
        The tracker's run id, or None when ``tracking.backend`` is ``none``.

    Raises:
        TrackingError: the tracker failed (the message names the store and the cause).
    """
    if tracking.backend == "none":
        return None
    try:
        from mlflow.entities import Metric, Param, RunTag

        client = mlflow_client(tracking.uri)
        exp = _experiment_id(client, tracking.experiment)
        tags = {"peftbench.run_key": str(key), "peftbench.run_dir": str(run_dir), "status": str(row.get("status")),
                **{k: str(row[k]) for k in PROVENANCE if k in row}}
        if row.get("error"):
            tags["error"] = str(row["error"])[:_MAX_TAG_CHARS]
        run = client.create_run(exp, run_name=str(key))
        rid = run.info.run_id
        now = int(time.time() * 1000)
        last = int(row.get("steps") or 0)
        metrics = [Metric(n, v, now, s) for n, v, s in curve_metrics(curve)]
        metrics += [Metric(n, v, now, last) for n, v in final_metrics(row, key.columns()).items()]
        params = [Param(k, v) for k, v in run_params(key, recipe).items()]
        run_tags = [RunTag(k, v) for k, v in tags.items()]
        for batch in _chunks(params, _MAX_PARAMS):
            client.log_batch(rid, params=batch)
        for batch in _chunks(run_tags, _MAX_TAGS):
            client.log_batch(rid, tags=batch)
        for batch in _chunks(metrics, _MAX_METRICS):
            client.log_batch(rid, metrics=batch)
        client.set_terminated(rid, status="FINISHED" if row.get("status") == "ok" else "FAILED")
    except Exception as exc:
        raise TrackingError(f"could not log run {key} to {tracking.backend} at {tracking.uri!r} "
                            f"(experiment {tracking.experiment!r}): {type(exc).__name__}: {exc}") from exc
    log.info("logged %s to %s run %s (%s, experiment %s)", key, tracking.backend, rid, tracking.uri,
             tracking.experiment)
    return rid


def mirror_finished_run(tracking: "Tracking", key: "RunKey", recipe: "Recipe", row: dict[str, Any],
                        curve: list[dict], run_dir: str) -> str | None:
    """:func:`mirror`, logging a :class:`TrackingError` instead of raising it.

    Called after the run's outputs are complete: a failing job would make Snakemake delete them,
    and tracking is a mirror, not the record (``results/runs`` is). The error is logged at ERROR
    level with the store and the cause.
    """
    try:
        return mirror(tracking, key, recipe, row, curve, run_dir)
    except TrackingError as exc:
        log.error("%s; the run's outputs in %s are complete, only the mirror is missing", exc, run_dir)
        return None
