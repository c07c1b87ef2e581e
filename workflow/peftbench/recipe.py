"""A run's training recipe, split into what changes its results and what only changes its speed.

:class:`Recipe` holds the hyperparameters that define a run (learning rate, epochs, batch size …,
the training/evaluation caps and the method's options); Snakemake tracks it, so editing one reruns
exactly the runs it reaches. :class:`Runtime` holds the knobs that make the same run faster or
more observable without changing what it learns — evaluation batch size, logging and checkpoint
cadence, length buckets, ``torch.compile`` — and is handed to the job outside Snakemake's params
trigger, so toggling ``compile: true`` does not mark finished runs outdated.

Both are resolved from the config by :func:`peftbench.config.recipe_for` / :func:`runtime_for`.
Neither states a default: keys a caller leaves out (a hand-typed ``peftbench train --recipe``)
take the schema's ``training.defaults`` (:func:`peftbench.config.schema_defaults`), the only place
defaults live.

Torch-free.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any


def _from_dict(cls, d: dict[str, Any] | None, what: str, section: tuple[str, ...] | None = None):
    d = dict(d or {})
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"unknown {what} key(s) {unknown}; allowed: {names}")
    from .config import schema_defaults

    defaults = (schema_defaults(*section) if section else
                {**schema_defaults("training", "defaults"), **schema_defaults("data")})
    missing = [n for n in names if n not in d and n not in defaults]
    if missing:
        raise ValueError(f"{what}: no value and no schema default for {missing}")
    return cls(**{n: d[n] if n in d else defaults[n] for n in names})


@dataclass(frozen=True)
class Recipe:
    """The hyperparameters that define a run's result (tracked: a change reruns the run).

    Attributes:
        lr: peak learning rate.
        epochs: passes over the (capped) training set.
        batch_size: training examples per optimizer step.
        warmup_ratio: fraction of optimizer steps of linear warm-up.
        weight_decay: AdamW decoupled weight decay (not on biases/LayerNorm).
        max_grad_norm: gradient clipping threshold (L2 over all trainable parameters).
        precision: ``auto`` | ``fp32`` | ``bf16`` (:mod:`peftbench.precision`; ``auto`` resolves per
            device and the resolved value is recorded per run).
        log_gradnorms: log per-group gradient norms (``gradnorms.parquet``); ``None`` = the
            method's default.
        group_by_length: length-grouped batching (:meth:`peftbench.batches.TokenizedSplit.epoch_batches`,
            as Hugging Face's ``train_sampling_strategy="group_by_length"``): batches of examples of
            similar length, padded far less than uniformly random ones; tracked, because it changes
            which examples share a batch.
        max_train_samples: cap on training examples (a fixed subset, the same for every seed and
            method unless ``resample_per_seed``); ``None`` uses all.
        max_eval_samples: cap on examples per dev split (fixed subset); ``None`` uses all.
        resample_per_seed: draw the capped training subset with the run's seed instead of seed 0,
            so seeds differ in their training data too (Bouthillier et al. 2021, "Accounting for
            Variance in Machine Learning Benchmarks", arXiv:2103.03098); every method of one seed
            still sees the same subset (paired). No effect without ``max_train_samples``.
        method_options: the method's options (``method_options.<name>``, defaults filled in).
    """

    lr: float
    epochs: int
    batch_size: int
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float
    precision: str
    log_gradnorms: bool | None
    group_by_length: bool
    max_train_samples: int | None
    max_eval_samples: int | None
    resample_per_seed: bool
    method_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Recipe":
        """Build from a dict; missing keys take the schema defaults.

        Raises:
            ValueError: an unknown key (the message lists the allowed ones).
        """
        d = dict(d or {})
        d.setdefault("method_options", {})
        return _from_dict(cls, d, "training recipe")

    def to_json(self) -> str:
        """Canonical JSON (sorted keys): the tracked ``--recipe`` of the train rule."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@dataclass(frozen=True)
class Tracking:
    """Optional mirroring of every run to an experiment tracker (the config's ``tracking:``
    section; part of :class:`Runtime`, so turning it on or off reruns nothing). Implemented by
    :mod:`peftbench.tracking`.

    Attributes:
        backend: ``none`` (off) or ``mlflow``.
        uri: MLflow tracking URI: a directory (a local file store, relative to the working
            directory) or any URI MLflow accepts.
        experiment: MLflow experiment name.

    Raises:
        ValueError: an unknown backend, or a backend whose package is not installed (the message
            says what to install).
    """

    backend: str
    uri: str
    experiment: str

    def __post_init__(self):
        from .tracking import check_backend

        check_backend(self.backend)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Tracking":
        """Build from the ``tracking:`` mapping; missing keys take the schema defaults.

        Raises:
            ValueError: an unknown key, backend or a missing package (see the class).
        """
        return _from_dict(cls, d, "tracking option", section=("tracking",))


@dataclass(frozen=True)
class Runtime:
    """Knobs that change a run's speed or observability, not its result (not tracked).

    Attributes:
        eval_batch_size: examples per evaluation forward pass.
        eval_every_epoch: evaluate the dev splits after every epoch (``True``) or only after the
            last one (``False``). Evaluation reads the model without changing it or drawing from
            the training generator, so the trained model and the final ``dev_*`` metrics are the
            same either way; with ``False`` the ``best_dev_*`` columns equal ``dev_*``,
            ``best_epoch`` is the last epoch and ``curve.parquet`` holds one evaluation row. The
            per-epoch evaluations cost a forward pass over every dev split each (MiniLM, SST-2 dev:
            about 2 s on the 2-core CPU). Recorded per run (``metrics.parquet`` column
            ``eval_every_epoch``); tuning sets it (its pruner reads every epoch).
        log_every: optimizer steps between training-loss rows in ``curve.parquet`` (and host syncs).
        checkpoint_every: optimizer steps between checkpoints (also one after every epoch's
            evaluation); 0 turns checkpoints off. Needs a checkpoint directory.
        keep_checkpoints: keep the last checkpoint after the run's outputs are complete.
        snapshots: save this many adapter snapshots along training, at evenly spaced optimizer
            steps (:func:`peftbench.train.snapshot_steps`; the last at the final step), as
            ``snapshots/step<NNNNNN>.safetensors`` in the run directory (the method's
            :meth:`~peftbench.methods.base.Method.state_to_save`); 0: none. The training data of
            the parameter generator (:mod:`peftbench.generator`). Saving copies tensors and draws
            no random numbers, so it does not change the run's result (untracked).
        length_buckets: pad every batch up to one of this many fixed sequence lengths (quantiles of
            the training lengths, multiples of 8) instead of its own longest example, so the model
            sees few distinct shapes (what CUDA graphs / ``torch.compile`` need); 0 = pad each batch
            to its longest example. Padding is masked, so a forward pass changes only by
            floating-point rounding; dropout masks are drawn per padded shape, so a bucketed run is
            another (equally valid) random draw than an unbucketed one with the same seed.
        compile: wrap the training forward/backward in ``torch.compile`` (evaluation stays eager).
            Falls back to eager, with a log line saying why, where compilation is not possible: a
            CUDA-graph mode on a CPU, or a method that does not declare ``compilable``.
            Compilation time is measured apart (``compile_s``).
        compile_mode: ``torch.compile`` mode; ``auto`` is ``reduce-overhead`` on a GPU and
            ``default`` on a CPU (:func:`peftbench.train.resolve_compile_mode`); ``reduce-overhead``
            and ``max-autotune`` use CUDA graphs (GPU only).
        compile_backend: ``torch.compile`` backend (``inductor``; ``eager`` traces with Dynamo and
            runs eagerly, for checking the wiring on a CPU).
        dropout_kernel: how training draws dropout masks (:mod:`peftbench.dropout`): ``fast``
            (16-bit integers cut from 64-bit random words, about 3× faster than torch's Bernoulli
            on a CPU; ``p`` rounded to a multiple of 2**-16), ``torch`` (``nn.Dropout``) or
            ``auto`` (``fast`` for eager training on a CPU, ``torch`` on CUDA and when compiled;
            :func:`peftbench.dropout.resolve_dropout_kernel`). The same distribution, another
            random draw: not tracked, like ``length_buckets``.
        tracking: mirror the run to an experiment tracker (:class:`Tracking`, the config's
            top-level ``tracking:`` section, not a ``training.*`` layer key).
    """

    eval_batch_size: int
    eval_every_epoch: bool
    log_every: int
    checkpoint_every: int
    keep_checkpoints: bool
    snapshots: int
    length_buckets: int
    compile: bool
    compile_mode: str
    compile_backend: str
    dropout_kernel: str
    tracking: Tracking

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Runtime":
        """Build from a dict; missing keys take the schema defaults (``tracking``: a mapping or a
        :class:`Tracking`).

        Raises:
            ValueError: an unknown key (the message lists the allowed ones).
        """
        d = dict(d or {})
        if not isinstance(d.get("tracking"), Tracking):
            d["tracking"] = Tracking.from_dict(d.get("tracking"))
        return _from_dict(cls, d, "runtime option")

    def to_json(self) -> str:
        """Canonical JSON (sorted keys): the untracked ``--runtime`` of the train rule."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


#: Recipe keys of ``training.*`` layers that belong to the tracked :class:`Recipe`.
RECIPE_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Recipe)
                                     if f.name not in ("max_train_samples", "max_eval_samples", "resample_per_seed",
                                                       "method_options"))
#: Keys of the untracked :class:`Runtime`: the speed and logging knobs of the ``training.*``
#: layers, and ``tracking`` (the config's top-level ``tracking:`` section, which the schema does
#: not allow inside a layer).
RUNTIME_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Runtime))
#: Keys of ``training.defaults`` / ``training.tasks.<task>`` read by the tokenize stage only.
TOKENIZE_KEYS: tuple[str, ...] = ("max_length",)


def split_recipe(d: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a flat mapping of recipe and runtime keys into ``(recipe, runtime)`` mappings
    (keys of :data:`RUNTIME_KEYS` go to runtime, everything else to the recipe)."""
    return ({k: v for k, v in d.items() if k not in RUNTIME_KEYS}, {k: v for k, v in d.items() if k in RUNTIME_KEYS})
