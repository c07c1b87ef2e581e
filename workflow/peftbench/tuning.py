"""Fair hyperparameter tuning (issue 13): one Optuna study per (model, task, method, budget).

Every method gets the same number of trials (``tuning.trials``) over its own search space: the
learning rate ``lr`` and any of its typed options (``method_options.<method>``). A trial trains
with the one training loop (:func:`peftbench.train.run`) on the training split minus a held-out
part and is scored on that held-out part (:func:`holdout_rows`), so the GLUE dev split that is
reported is never seen while tuning. The final runs then read the best trial's ``lr`` and options
from ``best.yaml`` (:func:`apply_best`).

Search spaces are config data (``tuning.spaces``, defaults ``tuning.default_spaces`` in the
schema) and are checked when the DAG is planned (:func:`check_tuning`, called by
:func:`peftbench.config.check`): an unknown parameter, an empty or inverted range, a log range
that reaches 0 or a value the method's options reject fails with the config key named.

A study lives in an Optuna journal file (``optuna.storages.JournalStorage`` over a
``optuna.storages.journal.JournalFileBackend``), so its trials can run as several jobs and a
killed job resumes: :func:`tune` runs trials until the study holds ``tuning.trials`` finished ones
(at most ``tuning.trials_per_job`` per call) and writes ``trials.parquet`` (every trial) and,
once complete, ``best.yaml``.

Sampler: Optuna's TPE (Bergstra et al. 2011) or random search, seeded by ``tuning.seed`` plus the
number of trials already in the study (so a resumed job draws new points, not the first job's
again). Pruner: Optuna's median stopping rule on the per-epoch held-out score, or none.

Torch-free at import (optuna and the training loop are imported where they are used).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

log = logging.getLogger(__name__)

#: The search-space parameter every method has; every other parameter is one of its options.
LR = "lr"
#: ``tuning.spaces`` / ``tuning.default_spaces`` key whose space applies to every adapter method.
ADAPTERS = "adapters"
#: Trial states (Optuna's names) that count as a finished trial of a study. A trial that diverged
#: (NaN loss) is told as FAIL with the user attribute ``outcome = diverged`` and counts too; a trial
#: left RUNNING by a killed job is told FAIL with ``outcome = killed`` and does not count.
FINISHED = ("COMPLETE", "PRUNED")
DIVERGED, KILLED = "diverged", "killed"


class TuningError(ValueError):
    """A ``tuning:`` config value that is not allowed; the message names key, value and fix."""


@dataclass(frozen=True)
class Param:
    """One search-space dimension.

    Attributes:
        name: ``lr`` or an option name of the method.
        low, high: inclusive range (``low < high``) of a numeric parameter; ``None`` for choices.
        log: sample ``log(value)`` uniformly (``low > 0``).
        integer: the option is an ``int`` (``trial.suggest_int``), else a float.
        choices: the categorical values (``trial.suggest_categorical``); ``None`` for a range.
    """

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple | None = None

    def suggest(self, trial) -> Any:
        """The trial's value of this parameter (an ``optuna.trial.Trial``)."""
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)

    def values(self) -> list:
        """The values to check against the method's options: the choices, or both ends."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]

    def to_dict(self) -> dict[str, Any]:
        """The config form (``{low, high, log}`` or ``{choices}``)."""
        if self.choices is not None:
            return {"choices": list(self.choices)}
        return {"low": self.low, "high": self.high, "log": self.log}


def _option_type(options_cls, name: str) -> Any:
    return typing.get_type_hints(options_cls)[name]


def _is_int_option(hint) -> bool:
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return all(a is int for a in args)


def space_for(cfg: dict, method: str) -> dict[str, Param]:
    """The search space of ``method``: ``tuning.default_spaces`` (``adapters`` for an adapter
    method, then the method's entry), overlaid with ``tuning.spaces`` (``adapters``, then the
    method's entry); a parameter set to ``null`` is dropped. Parameters in config order.

    Raises:
        TuningError: a parameter that is not ``lr`` nor an option of the method, an empty or
            inverted range (``low >= high``), a log range with ``low <= 0``, a non-integer bound of
            an integer option, or a value the method's options reject (the key is named).
    """
    from .methods import get_method, method_info

    tun = cfg.get("tuning") or {}
    adapter = method_info(method).is_adapter
    merged: dict[str, tuple[str, Any]] = {}
    for section in ("default_spaces", "spaces"):
        layers = tun.get(section) or {}
        for layer in ([ADAPTERS] if adapter else []) + [method]:
            for name, spec in (layers.get(layer) or {}).items():
                merged[name] = (f"tuning.{section}.{layer}.{name}", spec)
    options_cls = get_method(method).options_cls
    option_names = [f.name for f in dataclasses.fields(options_cls)]
    base = dict((cfg.get("method_options") or {}).get(method) or {})
    space: dict[str, Param] = {}
    for name, (key, spec) in merged.items():
        if spec is None:
            continue
        if name != LR and name not in option_names:
            raise TuningError(f"config key {key}: unknown parameter {name!r} for method {method}; allowed: "
                              f"{[LR, *option_names]} (lr or an option of method_options.{method})")
        integer = name != LR and _is_int_option(_option_type(options_cls, name))
        if "choices" in spec:
            choices = tuple(spec["choices"])
            if not choices:
                raise TuningError(f"config key {key}.choices: empty; give at least one value")
            p = Param(name, choices=choices)
        else:
            low, high, lg = spec["low"], spec["high"], bool(spec.get("log", False))
            if not low < high:
                raise TuningError(f"config key {key}: range [{low}, {high}] is empty or inverted; "
                                  f"give low < high")
            if lg and low <= 0:
                raise TuningError(f"config key {key}: log range needs low > 0, got low = {low}; "
                                  f"raise low or set log: false")
            if integer and not (float(low).is_integer() and float(high).is_integer()):
                raise TuningError(f"config key {key}: option {name} of {method} is an integer; give integer "
                                  f"bounds, got [{low}, {high}]")
            p = Param(name, low=low, high=high, log=lg, integer=integer)
        for v in p.values():
            if name == LR:
                if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
                    raise TuningError(f"config key {key}: learning rate {v!r} is not a number > 0")
                continue
            from .methods.options import OptionsError

            try:
                options_cls.from_dict({**base, name: v}, where=key.rsplit(".", 1)[0])
            except OptionsError as exc:
                raise TuningError(f"{exc} (a value of the search space {key})") from None
        space[name] = p
    return space


def check_tuning(cfg: dict) -> None:
    """Check the ``tuning:`` section when the DAG is planned (the schema checked its types).

    Every key of ``tuning.spaces`` and ``tuning.default_spaces`` must be a method or ``adapters``;
    every grid method's space is built (:func:`space_for`) and must not be empty when tuning is
    enabled.

    Raises:
        TuningError: the first problem, with its config key.
    """
    from .methods import METHODS

    tun = cfg.get("tuning") or {}
    for section in ("default_spaces", "spaces"):
        for layer in tun.get(section) or {}:
            if layer != ADAPTERS and layer not in METHODS:
                raise TuningError(f"config key tuning.{section}.{layer}: unknown method {layer!r}; allowed: "
                                  f"{[ADAPTERS, *METHODS]}")
    for m in METHODS:
        space = space_for(cfg, m)
        if tun.get("enabled") and m in cfg["grid"]["methods"] and not space:
            raise TuningError(f"config key tuning.spaces.{m}: method {m} has an empty search space; "
                              f"give at least lr: {{low, high, log}}")


def space_json(space: dict[str, Param]) -> str:
    """The space in its config form as canonical JSON (a tracked rule param)."""
    return json.dumps({n: p.to_dict() for n, p in space.items()}, sort_keys=True)


def space_from_json(text: str, options_cls) -> dict[str, Param]:
    """Inverse of :func:`space_json` (integer flags from ``options_cls``'s field types)."""
    out = {}
    for name, spec in json.loads(text).items():
        if "choices" in spec:
            out[name] = Param(name, choices=tuple(spec["choices"]))
        else:
            integer = name != LR and _is_int_option(_option_type(options_cls, name))
            out[name] = Param(name, low=spec["low"], high=spec["high"], log=bool(spec.get("log")), integer=integer)
    return out


# ------------------------------------------------------------------------------------------------
# The held-out split
# ------------------------------------------------------------------------------------------------

def capped_rows(n: int, max_samples: int | None) -> np.ndarray:
    """Rows of a split of ``n`` examples that a run with cap ``max_samples`` trains on: all, or the
    fixed subset :class:`peftbench.batches.TokenizedSplit` takes (seed 0, sorted)."""
    if max_samples is not None and max_samples < n:
        return np.sort(np.random.default_rng(0).permutation(n)[:max_samples])
    return np.arange(n)


def holdout_rows(n: int, fraction: float, seed: int, max_samples: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split the (capped) training rows into ``(fit, holdout)`` row indices of the split file.

    The holdout is ``ceil(fraction · m)`` of the ``m`` capped rows, drawn by ``seed`` (fixed per
    study, so every trial of every method sees the same split); ``fit`` is the rest. Both sorted,
    disjoint, and their union is the capped rows.

    Raises:
        ValueError: ``fraction`` not in (0, 1), or fewer than one row left on either side.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"tuning.holdout_fraction: {fraction} — must be in (0, 1)")
    rows = capped_rows(n, max_samples)
    k = math.ceil(fraction * len(rows))
    if k >= len(rows):
        raise ValueError(f"tuning.holdout_fraction {fraction} of {len(rows)} training rows leaves none to train on; "
                         f"lower it or raise data.max_train_samples")
    perm = np.random.default_rng(seed).permutation(len(rows))
    return np.sort(rows[perm[k:]]), np.sort(rows[perm[:k]])


def write_holdout(train_path: str | Path, out_dir: str | Path, fraction: float, seed: int,
                  max_samples: int | None) -> tuple[Path, Path]:
    """Write ``fit.parquet`` and ``holdout.parquet`` (rows of the tokenised training cache, its
    metadata kept) into ``out_dir``; see :func:`holdout_rows`.

    Returns:
        ``(fit_path, holdout_path)``.
    """
    import pyarrow.parquet as pq

    from .io import atomic_path

    table = pq.read_table(train_path)
    fit, hold = holdout_rows(table.num_rows, fraction, seed, max_samples)
    out = []
    for name, rows in (("fit", fit), ("holdout", hold)):
        path = Path(out_dir) / f"{name}.parquet"
        with atomic_path(path) as tmp:
            pq.write_table(table.take(rows), tmp)
        out.append(path)
    return out[0], out[1]


# ------------------------------------------------------------------------------------------------
# The study
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    """The ``tuning:`` settings one study needs (see the schema for each key)."""

    trials: int
    sampler: str
    pruner: str
    seed: int
    holdout_fraction: float
    trials_per_job: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Settings":
        """From the ``tuning:`` mapping; missing keys take the schema defaults."""
        from .config import schema_defaults

        names = [f.name for f in dataclasses.fields(cls)]
        full = {**schema_defaults("tuning"), **(d or {})}
        return cls(**{n: full[n] for n in names})

    def to_json(self) -> str:
        """Canonical JSON (the tune rule's tracked ``--settings``)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def open_study(storage_path: str | Path, name: str, settings: Settings, n_existing: int | None = None):
    """Create or load study ``name`` in the journal file ``storage_path`` (direction maximize).

    The sampler is seeded by ``settings.seed + n_existing`` (trials already in the study), so a
    resumed job does not repeat the first job's draws.
    """
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    Path(storage_path).parent.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(storage_path)))
    seed = settings.seed + (n_existing or 0)
    sampler = (optuna.samplers.RandomSampler(seed=seed) if settings.sampler == "random"
               else optuna.samplers.TPESampler(seed=seed))
    pruner = optuna.pruners.MedianPruner() if settings.pruner == "median" else optuna.pruners.NopPruner()
    return optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                               direction="maximize", load_if_exists=True)


def study_name(model: str, task: str, method: str, budget: str, recipe, settings: Settings,
               space: dict[str, Param], budget_denominator: str | None = None) -> str:
    """``{model}/{task}/{method}/b{budget}#<12 hex>``: the hash covers what changes a trial's
    result (the base recipe, the space, sampler, pruner, seed, holdout fraction and the budget
    denominator), not ``trials`` / ``trials_per_job``, so raising ``tuning.trials`` extends the
    study while editing the space starts a fresh one in the same journal file."""
    import hashlib

    what = {"recipe": json.loads(recipe.to_json()), "space": json.loads(space_json(space)),
            "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("trials", "trials_per_job")},
            "budget_denominator": budget_denominator}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]
    return f"{model}/{task}/{method}/b{budget}#{digest}"


def counts_as_finished(trial) -> bool:
    """A trial (``optuna.trial.FrozenTrial``) that counts toward ``tuning.trials``: complete,
    pruned, or failed because training diverged."""
    return trial.state.name in FINISHED or (trial.state.name == "FAIL" and trial.user_attrs.get("outcome") == DIVERGED)


def tune(*, model: str, model_spec: str, task: str, method: str, budget: str, train_path: str | Path,
         out_dir: str | Path, storage: str | Path, recipe, settings: Settings, space: dict[str, Param],
         runtime=None, svd_path: str | Path | None = None, device: str | None = None,
         budget_denominator: str | None = None, trials: int | None = None,
         model_cache: str | Path | None = None) -> dict[str, Any]:
    """Run trials of one study until it holds ``trials`` (default ``settings.trials``) finished
    trials, at most ``settings.trials_per_job`` in this call; write ``trials.parquet`` and, once
    the study is complete, ``best.yaml`` in ``out_dir``.

    Each trial: the parameters of ``space`` drawn by the sampler replace ``recipe.lr`` /
    ``recipe.method_options`` entries; :func:`peftbench.train.run` trains on ``fit.parquet`` with
    ``holdout.parquet`` as the dev split (caps off: both are already the capped rows), seed
    ``settings.seed``; the objective is the final-epoch held-out main metric (``dev_main`` of the
    trial's run, maximised). The held-out score after every epoch is reported to the pruner, which
    may stop the trial after any epoch but the last.

    Each trial's run files stay in ``out_dir/trials/<number>/`` (metrics, curve on the held-out
    rows), except ``adapter.safetensors``, which is deleted.

    Trials left RUNNING in the journal by a killed job are told FAIL (``outcome = killed``) and
    do not count; their points are drawn again by the sampler's next draws.

    ``model_cache``: the spec's model cache folder (:mod:`peftbench.modelcache`), what every
    trial loads the model from (``None``: the spec).

    Returns:
        ``{"finished": n, "target": trials, "complete": bool, "best": best.yaml dict or None}``.

    Raises:
        ValueError: bad holdout fraction (see :func:`holdout_rows`), bad recipe or options.
    """
    import optuna
    from optuna.trial import TrialState

    from .recipe import Runtime
    from .runkey import RunKey
    from .train import run as train_run
    from .vocab import RUN_FILES, get_task

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out_dir = Path(out_dir)
    target = trials or settings.trials
    name = study_name(model, task, method, budget, recipe, settings, space, budget_denominator)
    study = open_study(storage, name, settings)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        log.warning("trial %d was left %s by a killed job; marking it FAIL (not counted)", t.number, t.state.name)
        study._storage.set_trial_user_attr(t._trial_id, "outcome", KILLED)
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
    study = open_study(storage, name, settings, n_existing=len(study.trials))
    fit, hold = write_holdout(train_path, out_dir / "data", settings.holdout_fraction, settings.seed,
                              recipe.max_train_samples)
    tspec = get_task(task)
    dev_paths = {s: hold for s in tspec.eval_splits}  # MNLI: the held-out rows under both split names
    key = RunKey.of(model, task, method, budget, settings.seed)
    runtime = runtime or Runtime.from_dict({})
    # the pruner reads every epoch's held-out metric
    runtime = dataclasses.replace(runtime, checkpoint_every=0, snapshots=0, eval_every_epoch=True)
    ran = 0
    while sum(map(counts_as_finished, study.trials)) < target and \
            (settings.trials_per_job is None or ran < settings.trials_per_job):
        trial = study.ask()
        params = {n: p.suggest(trial) for n, p in space.items()}
        trial_recipe = dataclasses.replace(
            recipe, lr=params.get(LR, recipe.lr), max_train_samples=None, max_eval_samples=None,
            method_options={**recipe.method_options, **{k: v for k, v in params.items() if k != LR}})

        def report(epoch: int, metrics: dict[str, float], trial=trial, epochs=trial_recipe.epochs) -> None:
            trial.report(metrics[tspec.main_metric], epoch + 1)
            if epoch + 1 < epochs and trial.should_prune():  # never discard a finished trial
                raise optuna.TrialPruned(f"epoch {epoch + 1}: held-out {tspec.main_metric} "
                                         f"{metrics[tspec.main_metric]:.4f} below the median")

        t0 = time.perf_counter()
        trial_dir = out_dir / "trials" / f"{trial.number:04d}"
        try:
            row = train_run(key=key, model_spec=model_spec, train_path=fit, dev_paths=dev_paths,
                            out_dir=trial_dir, recipe=trial_recipe,
                            runtime=runtime, svd_path=svd_path, device=device, checkpoint_dir=None,
                            budget_denominator=budget_denominator, on_eval=report, model_cache=model_cache)
        except optuna.TrialPruned:
            trial.set_user_attr("seconds", time.perf_counter() - t0)
            trial.set_user_attr("outcome", "pruned")
            study.tell(trial, state=TrialState.PRUNED)
        else:
            trial.set_user_attr("seconds", time.perf_counter() - t0)
            # the trained weights and method state are not needed (full fine-tuning's would be the
            # whole model per trial)
            for f in ("adapter", "method_state"):
                (trial_dir / RUN_FILES[f]).unlink(missing_ok=True)
            if row["status"] == "ok" and math.isfinite(row["dev_main"]):
                trial.set_user_attr("outcome", "ok")
                study.tell(trial, float(row["dev_main"]))
            else:
                trial.set_user_attr("outcome", DIVERGED)
                study.tell(trial, state=TrialState.FAIL)
        ran += 1
        log.info("%s: trial %d %s %s (%d/%d finished)", name, trial.number, params,
                 study.trials[-1].state.name, sum(map(counts_as_finished, study.trials)), target)
    write_trials(study, out_dir / "trials.parquet", tspec.main_metric)
    finished = sum(map(counts_as_finished, study.trials))
    best = None
    if finished >= target:
        best = best_record(study, recipe, method, tspec.main_metric, space)
        from .io import atomic_path

        with atomic_path(out_dir / "best.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(best, sort_keys=False))
    return {"finished": finished, "target": target, "complete": finished >= target, "best": best}


def trials_frame(study, metric: str):
    """Every trial of ``study`` as a DataFrame: number, state, outcome, value (held-out main
    metric; NaN unless complete), metric, seconds, counted, and one ``param_<name>`` column per
    parameter."""
    import pandas as pd

    rows = []
    for t in study.trials:
        rows.append({"trial": t.number, "state": t.state.name, "outcome": t.user_attrs.get("outcome"),
                     "value": float(t.value) if t.value is not None else float("nan"), "metric": metric,
                     "seconds": float(t.user_attrs.get("seconds", float("nan"))), "counted": counts_as_finished(t),
                     **{f"param_{k}": v for k, v in t.params.items()}})
    return pd.DataFrame(rows)


def write_trials(study, path: str | Path, metric: str) -> None:
    """Write :func:`trials_frame` as ``trials.parquet`` (atomically)."""
    from .io import write_table

    write_table(trials_frame(study, metric), path)


def best_record(study, recipe, method: str, metric: str, space: dict[str, Param]) -> dict[str, Any]:
    """The ``best.yaml`` mapping: the best complete trial's ``lr`` and full ``method_options``
    (the recipe's, with the tuned ones replaced), its held-out score, how many complete trials tie
    with it (``tied_trials``; a warning when all do: the held-out slice selected nothing), and the
    study's cost.

    Raises:
        RuntimeError: no trial of the study completed (all pruned or diverged).
    """
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not done:
        raise RuntimeError(f"study {study.study_name}: no trial completed (all diverged or were pruned); "
                           f"narrow tuning.spaces.{method}.lr or raise tuning.trials")
    t = study.best_trial
    counted = [x for x in study.trials if counts_as_finished(x)]
    tied = sum(1 for x in done if x.value == t.value)
    if len(done) > 1 and tied == len(done):
        log.warning("study %s: all %d complete trials scored %s %.4f on the held-out slice, so it cannot tell "
                    "the settings apart (too few held-out examples, or every trial at chance); best.yaml takes "
                    "trial %d's. Fix: a larger held-out slice (tuning.holdout_fraction, data.max_train_samples) "
                    "or more epochs", study.study_name, len(done), metric, t.value, t.number)
    return {
        "method": method,
        "lr": float(t.params.get(LR, recipe.lr)),
        "method_options": {**recipe.method_options, **{k: v for k, v in t.params.items() if k != LR}},
        "holdout_metric": metric,
        "holdout_value": float(t.value),
        "best_trial": int(t.number),
        # complete trials with the best held-out value; == trials: the selection was a tie
        "tied_trials": int(tied),
        "tuning_trials": len(counted),
        "tuning_s": float(sum(x.user_attrs.get("seconds", 0.0) for x in study.trials)),
        "space": {n: p.to_dict() for n, p in space.items()},
    }


def apply_best(recipe, best_path: str | Path):
    """``recipe`` with ``lr`` and ``method_options`` from ``best.yaml``, and the study's cost
    ``{"tuning_trials": n, "tuning_s": s}`` (columns of the final run's metrics row).

    Raises:
        FileNotFoundError: no ``best.yaml`` at ``best_path``.
        ValueError: ``best.yaml`` lacks ``lr`` or ``method_options``.
    """
    best = yaml.safe_load(Path(best_path).read_text()) or {}
    missing = [k for k in ("lr", "method_options") if k not in best]
    if missing:
        raise ValueError(f"{best_path}: missing {missing}; rerun the tune job (snakemake --forcerun tune)")
    return (dataclasses.replace(recipe, lr=float(best["lr"]), method_options=dict(best["method_options"])),
            {"tuning_trials": int(best.get("tuning_trials", 0)), "tuning_s": float(best.get("tuning_s", 0.0))})


# ------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------

def expected_max(values, n: int | np.ndarray) -> np.ndarray:
    """Expected validation performance (Dodge et al. 2019, "Show Your Work", arXiv:1909.03004,
    Eq. 1): the expected best held-out score of ``n`` trials drawn i.i.d. (with replacement) from
    the empirical distribution of the ``N`` observed scores ``values``.

    With the scores sorted, ``v_(1) ≤ … ≤ v_(N)``, ``P(max of n = v_(i)) = (i/N)^n − ((i−1)/N)^n``
    and ``E[max] = Σ_i v_(i) · ((i/N)^n − ((i−1)/N)^n)``. Units: those of ``values``.

    Args:
        values: ``(N,)`` finite scores (NaN entries are dropped).
        n: number(s) of trials, each ≥ 1.

    Returns:
        ``E[max]`` for each ``n`` (same shape as ``np.asarray(n)``).

    Raises:
        ValueError: no finite value, or an ``n`` < 1.
    """
    v = np.sort(np.asarray(values, dtype=np.float64))
    v = v[np.isfinite(v)]
    ns = np.asarray(n)
    if len(v) == 0:
        raise ValueError("expected_max: no finite score")
    if (ns < 1).any():
        raise ValueError(f"expected_max: number of trials must be >= 1, got {ns.min()}")
    i = np.arange(1, len(v) + 1) / len(v)
    k = ns.reshape(-1, 1).astype(np.float64)
    w = i ** k - (i - 1 / len(v)).clip(min=0) ** k
    return (w @ v).reshape(ns.shape)


def collect_trials(study_dirs, out: str | Path) -> int:
    """Concatenate the ``trials.parquet`` of every study directory
    (``…/{model}/{task}/{method}/b{budget}``) into ``out`` (``results/tables/trials.parquet``),
    with the key columns model, task, method, budget first. An empty list writes an empty table
    with those columns.

    Returns:
        The number of rows written.

    Raises:
        ValueError: a directory whose last part is not ``b{budget}``.
        FileNotFoundError: a study without ``trials.parquet``.
    """
    import pandas as pd

    from .io import write_table

    frames = []
    for d in map(Path, study_dirs):
        parts = d.parts[-4:]
        if len(parts) < 4 or not parts[3].startswith("b"):
            raise ValueError(f"{d}: not a study directory …/{{model}}/{{task}}/{{method}}/b{{budget}}")
        f = d / "trials.parquet"
        if not f.is_file():
            raise FileNotFoundError(f"{f}: no such file; run `snakemake {f}` (rule tune)")
        df = pd.read_parquet(f)
        key = {"model": parts[0], "task": parts[1], "method": parts[2], "budget": parts[3][1:]}
        frames.append(df.assign(**key)[[*key, *df.columns]])
    table = (pd.concat(frames, ignore_index=True) if frames
             else pd.DataFrame(columns=["model", "task", "method", "budget", "trial", "state", "value"]))
    write_table(table, out)
    return len(table)
