"""The one training loop every method runs in.

:func:`run` tells one run's story top to bottom: load the tokenised splits, build the model with
the method, build AdamW and its schedule (:mod:`peftbench.optim`), resume from a checkpoint if one
fits (:mod:`peftbench.checkpoint`), run the epochs — each a sequence of :func:`train_step` calls
followed by :func:`evaluate` on every dev split — and write the outputs
(:mod:`peftbench.outputs`). Methods plug in through the hooks of
:class:`peftbench.methods.base.Method`, which :func:`train_step` calls in the documented order.

Causal-LM track (seed 003; :attr:`peftbench.vocab.TaskSpec.is_causal`): the backbone is a
decoder (:func:`peftbench.models.load_causal_lm`) without a head, the loss is the model's shifted
cross-entropy on the target tokens only (prompt and padding labels are ``-100``,
:meth:`peftbench.batches.TokenizedSplit.lm_labels`), and :func:`evaluate` generates every dev
answer greedily from left-padded prompts (:mod:`peftbench.generation`) and scores the texts
(:func:`peftbench.metrics.compute_generation_metrics`); ``predictions.parquet`` then holds the
generated text of every dev example (:func:`peftbench.outputs.generation_frame`).

Precision: the recipe's ``precision`` (:mod:`peftbench.precision`; ``auto``: bf16 autocast on a GPU and on
a CPU with native bf16 matmul, fp32 otherwise), resolved once per run and recorded. Batches come from the tokenised Parquet cache
(:mod:`peftbench.batches`), shuffled by the run's seed (or grouped by length, recipe key
``group_by_length``) and padded per batch (or to length buckets).

Outputs of one run (all written atomically) in ``out_dir``: :data:`peftbench.vocab.RUN_FILES`
(``metrics.parquet``: one row, see :func:`run`; ``curve.parquet``: step, epoch, kind (train/eval),
loss, lr, dev metrics per evaluation; ``adapter.safetensors``: the method's
:meth:`~peftbench.methods.base.Method.state_to_save`; ``ranks.parquet``: per-module rank/gates
where the method reports them; ``method_state.pt``: the method's
:meth:`~peftbench.methods.base.Method.checkpoint_state` at the end (what a reload restores before the
adapter: :func:`peftbench.checkpoint.load_trained`); ``gradnorms.parquet``: per-group gradient norms when logging is on;
``predictions.parquet``: every dev example's label, prediction and logits at the final and the best
epoch, :func:`peftbench.outputs.prediction_frame`).
"""
from __future__ import annotations

import logging
import math
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .batches import TokenizedSplit
from .checkpoint import Checkpointer, Progress, fingerprint
from .dropout import check_dropout_kernel, resolve_dropout_kernel, use_dropout_kernel
from .methods import BuildContext, LoopState, get_method, method_info
from .generation import greedy_generate
from .merging import merged_adapters
from .metrics import compute_generation_metrics, compute_metrics, require_metric_data
from .models import (backbone_param_count, embedding_param_count, find_targets, head_module_names, is_head_param,
                     load_causal_lm, load_classifier, load_tokenizer)
from .optim import optimizer_factory, rebuild_optimizer, warmup_steps
from .precision import resolve_precision
from .outputs import (PROTOCOL, generation_frame, gradnorm_columns, metric_columns, peak_mem_mib, prediction_frame,
                      provenance, write_run)
from .recipe import Recipe, Runtime
from .runkey import RunKey
from .tracking import mirror_finished_run
from .vocab import GRAD_TOTAL, SNAPSHOT_DIR, TaskSpec, get_task

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


# ------------------------------------------------------------------------------------------------
# One run, top to bottom
# ------------------------------------------------------------------------------------------------

def run(*, key: RunKey, model_spec: str, train_path: str | Path, dev_paths: dict[str, str | Path],
        out_dir: str | Path, recipe: Recipe, runtime: Runtime | None = None, svd_path: str | Path | None = None,
        device: str | None = None, checkpoint_dir: str | Path | None = None,
        budget_denominator: str | None = None, on_eval: Callable[[int, dict[str, float]], None] | None = None,
        extra_columns: dict[str, Any] | None = None, import_s: float | None = None,
        model_cache: str | Path | None = None) -> dict[str, Any]:
    """Train one (model, task, method, budget, seed) and write its outputs to ``out_dir``.

    With ``checkpoint_dir``, the run saves a checkpoint every ``runtime.checkpoint_every`` steps
    and after each epoch, and a rerun after a kill resumes from it and ends with the same metrics
    as an uninterrupted run (bitwise on a CPU). A NaN/inf loss ends the run as
    ``status = "failed"`` (outputs written, error in the ``error`` column, the last checkpoint kept
    for inspection).

    Args:
        key: the run (model short name, task, method, budget — a percentage or ``r<N>`` —, seed).
        model_spec: what ``models:`` maps the model to (hub id, directory, ``package:NAME``); what
            the run records (provenance, checkpoint fingerprint), also when loaded from ``model_cache``.
        train_path: tokenised train split.
        dev_paths: ``{split: tokenised path}`` for every dev split of the task.
        out_dir: run directory.
        recipe: the tracked hyperparameters; runtime: the speed knobs (schema defaults if None).
        svd_path: ``factors.safetensors`` for methods whose table line says ``uses_svd``.
        device: ``cuda``/``cpu``; default CUDA when available.
        checkpoint_dir: where checkpoints go (outside the outputs, so Snakemake does not delete
            them when the job fails); ``None`` disables checkpoints.
        budget_denominator: what a percentage budget is a percentage of
            (:data:`peftbench.budget.DENOMINATORS`); ``None``: the schema default.
        on_eval: called as ``on_eval(epoch, metrics)`` (0-based epoch, the evaluation's
            ``{metric: value}``) after every epoch's evaluation; an exception it raises ends the run
            without outputs (the tuning stage's pruner, :mod:`peftbench.tuning`).
        extra_columns: added to the ``metrics.parquet`` row (the tuning cost ``tuning_trials``,
            ``tuning_s`` of a tuned run).
        import_s: seconds from process start to this call (the CLI measures it,
            :func:`peftbench.outputs.process_age_s`); ``None`` (an in-process caller): NaN.
        model_cache: the spec's model cache folder (:mod:`peftbench.modelcache`, rule
            ``cache_model``): the model and tokenizer are loaded from it; ``None``: from the spec.

    With ``runtime.tracking.backend`` other than ``none`` the finished run is also mirrored to the
    tracker (:mod:`peftbench.tracking`; a tracker failure is logged, the outputs stay).

    Returns:
        The ``metrics.parquet`` row as a dict. Columns: model, task, method, budget, seed, status,
        error, metric (main metric name), dev_main, best_dev_main, best_epoch, ``dev_<m>`` and
        ``best_dev_<m>`` per task metric, trainable_params, adapter_params, head_params,
        backbone_params, trainable_pct (% of backbone, adapter only), budget_params (the budget as a
        parameter count, what the method was sized for), budget_denominator, denominator_params,
        budget_pct (budget_params in % of denominator_params), budget_used_params (adapter
        parameters the method counts against the budget: AdaLoRA's final allocation, all adapter
        parameters otherwise),
        the phase timings of :data:`peftbench.vocab.RUN_PHASES` (import_s, load_data_s,
        load_model_s, compile_s, train_s, eval_s, write_s; seconds), samples_per_s, compiled, compile_note, precision (resolved: fp32/bf16), length_buckets, dropout_kernel (resolved: torch/fast),
        eval_every_epoch (``runtime.eval_every_epoch``: False when only the last epoch was evaluated),
        peak_mem_mib, steps, epochs, train_examples, eval_examples, batch_size, lr, protocol,
        method columns (e.g. rank), the provenance columns of :data:`peftbench.vocab.PROVENANCE`
        (commit, dirty flag, model and data sha256, package versions, device, host; see
        :func:`peftbench.outputs.provenance`), adapter_bytes (size of adapter.safetensors) and, when
        gradient norms were logged,
        ``gradnorm_mean_<group>`` / ``gradnorm_max_<group>`` (and per phase ``gradnorm_mean_<group>_p<k>``;
        :func:`peftbench.outputs.gradnorm_columns`).

    Raises:
        FileNotFoundError, ValueError: missing inputs, bad recipe or options.
    """
    runtime = runtime or Runtime.from_dict({})
    task = get_task(key.task)
    if method_info(key.method).uses_svd and svd_path is None:
        raise ValueError(f"method {key.method} needs the SVD factors (--svd results/svd/{key.model}/factors.safetensors)")
    require_metric_data(task)  # before training: METEOR's WordNet corpus
    check_dropout_kernel(runtime.dropout_kernel)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = resolve_precision(recipe.precision, dev)
    torch.manual_seed(key.seed)
    np.random.seed(key.seed)

    # data: the capped training subset (optionally length-bucketed) and every dev split
    t_data = time.perf_counter()
    train = TokenizedSplit(train_path, recipe.max_train_samples, subset_seed=train_subset_seed(recipe, key.seed))
    if runtime.length_buckets:
        train.set_buckets(train.bucket_widths(runtime.length_buckets))
        log.info("length buckets (tokens): %s", train.buckets)
    devs = {s: TokenizedSplit(p, recipe.max_eval_samples) for s, p in dev_paths.items()}
    steps_per_epoch = math.ceil(len(train) / recipe.batch_size)
    total_steps = steps_per_epoch * recipe.epochs
    t_model = time.perf_counter()

    # model: backbone wrapped by the method, the module the training steps call
    model, method, backbone = build_model(model_spec, task, key, recipe, steps_per_epoch, total_steps, dev,
                                          svd_path, budget_denominator, model_cache)
    model = model.to(dev)
    model.train()
    forward, compile_note = compile_for_training(model, type(method), dev, runtime)
    dropout_kernel = resolve_dropout_kernel(runtime.dropout_kernel, dev, compiled=forward is not model)
    log.info("dropout kernel %s on %d dropout modules", dropout_kernel, use_dropout_kernel(model, dropout_kernel))
    phases = {"import_s": float("nan") if import_s is None else float(import_s),
              "load_data_s": t_model - t_data, "load_model_s": time.perf_counter() - t_model}

    # optimizer and schedule, built in one place (and rebuilt there when a method resizes)
    warmup = warmup_steps(recipe.warmup_ratio, total_steps)
    new_optimizer = optimizer_factory(method, model, recipe.lr, recipe.weight_decay, warmup, total_steps, dev)
    optimizer, scheduler = new_optimizer()
    state = LoopState(step=0, epoch=0, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                      optimizer=optimizer, scheduler=scheduler)

    def rebuild(transfer=None):  # a method replaced modules (GLoRA's re-allocation): new optimizer, same dropout kernel
        rebuild_optimizer(state, method, model, recipe.lr, recipe.weight_decay, warmup, total_steps, dev, transfer)
        use_dropout_kernel(model, dropout_kernel)

    state.rebuild = rebuild

    # resume from a checkpoint of this very configuration
    gen = torch.Generator().manual_seed(key.seed)
    progress = Progress()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    # a percentage budget's count depends on its denominator: a checkpoint of another one is not resumed
    denominator = method.ctx.budget_denominator if key.budget.is_pct else None
    ckpt = (Checkpointer(checkpoint_dir, fingerprint(key, model_spec, recipe, train_path, denominator))
            if checkpoint_dir else None)
    if ckpt is not None and ckpt.exists() and ckpt.load(model, method, state, gen, progress, new_optimizer):
        log.info("resumed from %s at step %d (epoch %d)", ckpt.path, state.step, progress.epoch)
        use_dropout_kernel(model, dropout_kernel)  # a resumed re-allocation rebuilt modules
    log.info("%s: %d train examples, %d steps (%d per epoch), %d trainable parameters, device %s, %s", key,
             len(train), total_steps, steps_per_epoch, sum(q.numel() for q in model.parameters() if q.requires_grad),
             dev, precision)

    # the epochs
    tokenizer = load_tokenizer(model_spec, model_cache) if task.is_causal else None  # decodes the generated answers
    loop = Loop(model=model, forward=forward, method=method, task=task, train=train, devs=devs, recipe=recipe,
                runtime=runtime, state=state, gen=gen, device=dev, ckpt=ckpt, label=str(key), on_eval=on_eval,
                precision=precision, tokenizer=tokenizer,
                snapshots=Snapshots(Path(out_dir) / SNAPSHOT_DIR, snapshot_steps(total_steps, runtime.snapshots),
                                    {k: str(v) for k, v in key.columns().items()}))
    loop.snapshots.prune(after=state.step)
    error = None
    try:
        loop.run(progress)
    except TrainingDiverged as exc:
        error = str(exc)
        log.error("%s", exc)

    # outputs (metrics.parquet last)
    t_write = time.perf_counter()
    row = run_row(key, task, method, model, backbone, recipe, progress, error, train, devs, dev,
                  compiled=forward is not model, compile_note=compile_note, precision=precision,
                  dropout_kernel=dropout_kernel, eval_every_epoch=runtime.eval_every_epoch)
    row.update(phases)
    row.update(provenance(model_spec, train_path, dev_paths, dev, model_cache))
    row.update(extra_columns or {})
    preds = prediction_table(task, devs, progress, error)
    row = write_run(out_dir, key, row, adapter=method.state_to_save(model), curve=progress.curve,
                    ranks=method.tables(model).get("ranks"), gradrows=progress.gradrows, predictions=preds,
                    method_state=method.checkpoint_state(model), write_started=t_write)
    mirror_finished_run(runtime.tracking, key, recipe, row, progress.curve, str(out_dir))
    if ckpt is not None and error is None and not runtime.keep_checkpoints:
        ckpt.remove()
    return {**key.columns(), **row}


def snapshot_steps(total_steps: int, n: int) -> tuple[int, ...]:
    """The optimizer steps after which an adapter snapshot is saved: ``n`` evenly spaced steps
    ``round(k · total_steps / n)`` for ``k = 1 … n`` (the last is the final step), duplicates
    dropped (fewer than ``n`` when ``n > total_steps``); ``()`` for ``n = 0``."""
    if n <= 0 or total_steps <= 0:
        return ()
    return tuple(sorted({max(1, round(k * total_steps / n)) for k in range(1, n + 1)}))


@dataclass
class Snapshots:
    """Adapter snapshots along training (``runtime.snapshots``): after each optimizer step of
    ``steps`` the method's :meth:`~peftbench.methods.base.Method.state_to_save` goes to
    ``directory/step<NNNNNN>.safetensors`` (atomic; safetensors metadata: the run key and the
    ``step``). The parameter generator's training data (:mod:`peftbench.generator`)."""

    directory: Path
    steps: tuple[int, ...]
    metadata: dict[str, str]

    def prune(self, after: int) -> None:
        """Delete the snapshots of steps after ``after`` (a fresh run: ``after = 0``, every stale
        file of an earlier run of this directory; a resumed run: those past its checkpoint)."""
        for f in self.directory.glob("step*.safetensors"):
            if int(f.stem[4:]) > after:
                f.unlink()

    def maybe_save(self, model, method, step: int) -> None:
        """Save a snapshot if ``step`` is one of :attr:`steps`."""
        if step in self.steps:
            from .io import save_tensors

            save_tensors(method.state_to_save(model), self.directory / snapshot_name(step),
                         metadata={**self.metadata, "step": str(step)})


def snapshot_name(step: int) -> str:
    """File name of the snapshot after optimizer step ``step`` (``step000040.safetensors``)."""
    return f"step{step:06d}.safetensors"


def train_subset_seed(recipe: Recipe, seed: int) -> int:
    """Seed of the capped training subset (:class:`peftbench.batches.TokenizedSplit`): the run's
    seed with ``recipe.resample_per_seed`` (Bouthillier et al. 2021, arXiv:2103.03098: the seed
    variance then includes data sampling), else 0 (one subset for the whole grid)."""
    return int(seed) if recipe.resample_per_seed else 0


def prediction_table(task: TaskSpec, devs: dict[str, TokenizedSplit], p: Progress, error: str | None):
    """The run's ``predictions.parquet`` (:func:`peftbench.outputs.prediction_frame`): every dev
    example at the final epoch (the ``dev_*`` metrics) and, when it differs, at the first best
    epoch (``best_dev_*``); no rows for a failed run (its metrics are NaN)."""
    epochs = []
    if error is None and p.logits_last is not None:
        epochs.append(p.logits_last[:2])
        if p.logits_best is not None and p.logits_best[0] != p.logits_last[0]:
            epochs.append(p.logits_best[:2])
    if task.is_causal:
        return generation_frame(task, {s: (d.idx, d.labels.numpy(), d.references) for s, d in devs.items()}, epochs)
    return prediction_frame(task, {s: (d.idx, d.labels.numpy()) for s, d in devs.items()}, epochs)


def run_row(key: RunKey, task: TaskSpec, method, model, backbone: int, recipe: Recipe, p: Progress,
            error: str | None, train: TokenizedSplit, devs: dict[str, TokenizedSplit], dev: torch.device, *,
            compiled: bool, compile_note: str, precision: str = "fp32", dropout_kernel: str = "torch",
            eval_every_epoch: bool = True) -> dict[str, Any]:
    """The ``metrics.parquet`` row of a run (without the key columns; see :func:`run`)."""
    counts = method.param_counts(model)
    budget_count = method.budget_count(model)
    size = method.ctx.budget_size
    return {
        "status": "ok" if error is None else "failed", "error": error, "metric": task.main_metric,
        **metric_columns(task, p.evals, error),
        "trainable_params": counts["adapter_params"] + counts["head_params"], **counts,
        "backbone_params": backbone, "trainable_pct": 100.0 * counts["adapter_params"] / backbone,
        **size.columns(), "budget_used_params": budget_count,
        "train_s": p.train_s, "samples_per_s": (p.seen - p.compile_seen) / max(p.train_s, 1e-9), "eval_s": p.eval_s,
        "compile_s": p.compile_s, "compiled": compiled, "compile_note": compile_note, "precision": precision,
        "length_buckets": ",".join(map(str, train.buckets)), "dropout_kernel": dropout_kernel,
        "eval_every_epoch": bool(eval_every_epoch),
        "peak_mem_mib": peak_mem_mib(dev), "steps": int(p.steps), "epochs": recipe.epochs,
        "train_examples": len(train), "eval_examples": sum(len(s) for s in devs.values()),
        "batch_size": recipe.batch_size, "lr": float(recipe.lr), "protocol": PROTOCOL, **method.summary(model),
        # per-group gradient-norm statistics (none unless logged); per phase for phased methods
        **gradnorm_columns(p.gradrows, getattr(method, "phase_boundaries", None)),
    }


def build_model(model_spec: str, task: TaskSpec, key: RunKey, recipe: Recipe, steps_per_epoch: int,
                total_steps: int, dev: torch.device, svd_path: str | Path | None = None,
                budget_denominator: str | None = None, model_cache: str | Path | None = None):
    """Load the pretrained classifier (a causal task: the decoder, no head) — from the model cache
    ``model_cache`` when given (:func:`peftbench.models.load_source`) — and wrap it with the run's
    method (still on the CPU).

    The method is sized by the budget's parameter count (:attr:`BuildContext.budget_params`:
    ``key.budget`` on this model, a percentage of ``budget_denominator``, default the schema's).

    Returns:
        ``(model, method, backbone_params)``.

    Raises:
        OptionsError, ValueError: bad method options, budget or denominator.
    """
    why = method_info(key.method).encoder_only
    if task.is_causal and why:
        raise ValueError(f"method {key.method} cannot run on the causal-LM task {task.name}: {why}")
    model = (load_causal_lm(model_spec, model_cache) if task.is_causal
             else load_classifier(model_spec, task, model_cache))
    backbone = backbone_param_count(model)
    ctx = BuildContext(task=task, budget=key.budget, backbone_params=backbone, targets=find_targets(model),
                       head_modules=[] if task.is_causal else head_module_names(model), total_steps=total_steps,
                       steps_per_epoch=steps_per_epoch, options=dict(recipe.method_options), seed=key.seed,
                       device=dev, svd_path=Path(svd_path) if svd_path else None,
                       budget_denominator=budget_denominator, embedding_params=embedding_param_count(model))
    method = get_method(key.method)(ctx)
    return method.build(model), method, backbone


# ------------------------------------------------------------------------------------------------
# One optimizer step
# ------------------------------------------------------------------------------------------------

def train_step(model, method, batch: dict[str, torch.Tensor], state: LoopState, max_grad_norm: float, *,
               forward=None, autocast: bool = False, record_gradnorms: bool = False) -> tuple[torch.Tensor, list]:
    """One optimizer step, calling the method's hooks in the contract's order.

    ``forward`` (default ``model``; a ``torch.compile``d ``model`` when compiling) runs the forward
    pass; the loss is the model's task loss (cross-entropy, or MSE for STS-B) plus the method's
    :meth:`extra_loss`. After ``backward`` the method sees the gradients (:meth:`after_backward`),
    then they are clipped to L2 norm ``max_grad_norm``, AdamW and the schedule step,
    ``state.step`` counts the step, the method's :meth:`after_optimizer_step` runs (AdaLoRA's
    allocation: after the step, before ``zero_grad``) and the gradients are dropped.

    Args:
        batch: model inputs plus ``labels``, ``(B, W)`` tensors on the model's device.
        record_gradnorms: also return :func:`gradient_norms` of this step (after ``after_backward``)
            over the optimizer's parameters.

    Returns:
        ``(loss, grad_rows)``: the detached fp32 loss (a 0-d tensor still on the device: no host
        sync), and ``[(group, layer, norm), ...]`` (empty unless ``record_gradnorms``).
    """
    forward = forward if forward is not None else model
    method.on_step_start(model, state)
    with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=autocast):
        outputs = forward(**batch)
        loss = outputs.loss
        extra = method.extra_loss(model, outputs, batch, state)
        if extra is not None:
            loss = loss + extra
    loss.backward()
    method.after_backward(model, state)
    params = [q for g in state.optimizer.param_groups for q in g["params"]]
    grads = gradient_norms(model, params) if record_gradnorms else []
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    state.optimizer.step()
    state.scheduler.step()
    state.step += 1
    method.after_optimizer_step(model, state)
    state.optimizer.zero_grad(set_to_none=True)
    return loss.detach().float(), grads


# ------------------------------------------------------------------------------------------------
# The epochs
# ------------------------------------------------------------------------------------------------

@dataclass
class Loop:
    """Everything the epochs need: model, method, data, recipe, live state and checkpointer."""

    model: Any
    forward: Any
    method: Any
    task: TaskSpec
    train: TokenizedSplit
    devs: dict[str, TokenizedSplit]
    recipe: Recipe
    runtime: Runtime
    state: LoopState
    gen: torch.Generator
    device: torch.device
    ckpt: Checkpointer | None
    label: str
    on_eval: Callable[[int, dict[str, float]], None] | None = None
    tokenizer: Any = None  # causal-LM track: decodes generated answers
    snapshots: Snapshots | None = None
    clock: "ProgressClock" = field(default_factory=lambda: ProgressClock())
    precision: str = "fp32"

    @property
    def autocast(self) -> bool:
        """bf16 autocast for training and evaluation (the resolved ``precision`` is ``bf16``)."""
        return self.precision == "bf16"

    @property
    def cuda_graphs(self) -> bool:
        """The compiled forward records CUDA graphs (a CUDA-graph mode on a GPU)."""
        return self.forward is not self.model and self.device.type == "cuda" and \
            self.runtime.compile_backend == "inductor" and \
            resolve_compile_mode(self.runtime.compile_mode, self.device) in CUDA_GRAPH_MODES

    @property
    def log_gradnorms(self) -> bool:
        """The recipe's ``log_gradnorms``; unset: the method's default, and always on for a causal-LM
        task (seed 003's gradient analysis covers every causal run)."""
        if self.recipe.log_gradnorms is not None:
            return bool(self.recipe.log_gradnorms)
        return self.method.log_gradnorms or self.task.is_causal

    def run(self, p: Progress) -> None:
        """Run the epochs from ``p``'s position (a fresh :class:`Progress` or a resumed one).

        Steps of a compiled forward during which Dynamo compiled a graph (and, with CUDA graphs,
        the first :data:`COMPILE_WARM_CALLS` steps of each batch shape) are timed apart as
        compilation (``p.compile_s``), not training.

        Raises:
            TrainingDiverged: the mean training loss of a logged interval is NaN/inf.
        """
        rt, state, dev = self.runtime, self.state, self.device
        compiled = self.forward is not self.model
        self.clock.start(state.step, p.seen)
        for epoch in range(p.epoch, self.recipe.epochs):
            state.epoch = p.epoch = epoch
            if p.b_next == 0:
                p.gen_state = self.gen.get_state()
            else:
                self.gen.set_state(p.gen_state)
            batches = self.train.epoch_batches(self.recipe.batch_size, self.gen, self.recipe.group_by_length)
            t0, excluded = time.perf_counter(), 0.0
            loss_acc = torch.full((), p.loss_sum, device=dev)
            for b in range(p.b_next, state.steps_per_epoch):
                idx = batches[b]
                batch = self.train.batch(idx, dev)
                warm = compiled and self._count_shape(p, tuple(batch["input_ids"].shape))
                if warm:
                    self._sync()
                if compiled:
                    graphs, tw = graphs_compiled(), time.perf_counter()
                loss, grads = train_step(self.model, self.method, batch, state, self.recipe.max_grad_norm,
                                         forward=self.forward, autocast=self.autocast,
                                         record_gradnorms=self.log_gradnorms and (state.step % rt.log_every == 0))
                p.gradrows.extend((state.step - 1, g, layer, v) for g, layer, v in grads)
                if self.snapshots is not None:
                    self.snapshots.maybe_save(self.model, self.method, state.step)
                loss_acc += loss
                p.n_acc += 1
                p.seen += len(idx)
                p.steps = state.step
                if compiled and (warm or graphs_compiled() != graphs):
                    self._sync()
                    dt = time.perf_counter() - tw
                    excluded += dt
                    p.compile_s += dt
                    p.compile_seen += len(idx)
                if state.step % rt.log_every == 0 or b == state.steps_per_epoch - 1:
                    self._log_train(p, float(loss_acc) / p.n_acc, epoch)  # one host sync per logged step
                    loss_acc.zero_()
                    p.n_acc = 0
                p.b_next = b + 1
                if self.ckpt is not None and rt.checkpoint_every and state.step % rt.checkpoint_every == 0 \
                        and p.b_next < state.steps_per_epoch:
                    p.loss_sum = float(loss_acc)
                    p.train_s += time.perf_counter() - t0 - excluded
                    self.ckpt.save(self.model, self.method, state, p)
                    t0, excluded = time.perf_counter(), 0.0
            self._sync()
            p.train_s += time.perf_counter() - t0 - excluded
            if rt.eval_every_epoch or epoch + 1 == self.recipe.epochs:
                self._evaluate(p, epoch)
            p.epoch, p.b_next, p.loss_sum = epoch + 1, 0, 0.0
            p.gen_state = self.gen.get_state()  # the data order of the next epoch starts here
            if self.ckpt is not None and rt.checkpoint_every and epoch + 1 < self.recipe.epochs:
                self.ckpt.save(self.model, self.method, state, p)

    def _count_shape(self, p: Progress, shape: tuple) -> bool:
        """Count a compiled call of ``shape``; True while it is still CUDA-graph warm-up (always
        False without CUDA graphs: compilation is then seen by :func:`graphs_compiled`)."""
        calls = p.shape_calls.get(shape, 0)
        p.shape_calls[shape] = calls + 1
        return self.cuda_graphs and calls < COMPILE_WARM_CALLS

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _log_train(self, p: Progress, mean_loss: float, epoch: int) -> None:
        state = self.state
        if not math.isfinite(mean_loss):
            last = "none logged yet" if math.isnan(p.last_finite) else f"{p.last_finite:.4g}"
            raise TrainingDiverged(
                f"{self.label}: loss became {mean_loss} at step {state.step} (epoch {epoch + 1}); last finite "
                f"loss {last}. Fix: lower the learning rate (now {self.recipe.lr:g}) or the gradient "
                f"clipping threshold max_grad_norm (now {self.recipe.max_grad_norm:g}).")
        p.last_finite = mean_loss
        p.curve.append({"step": state.step, "epoch": state.step / state.steps_per_epoch, "kind": "train",
                        "loss": mean_loss, "lr": state.scheduler.get_last_lr()[0],
                        **{k: float(v) for k, v in state.log.items()}})  # tensors read here, once
        state.log.clear()
        rate = self.clock.samples_per_s(p.seen)
        log.info("%s | step %d/%d (%d%%) | epoch %d/%d | loss %.4f | %s samples/s | ETA %s", self.label,
                 state.step, state.total_steps, 100 * state.step // max(state.total_steps, 1), epoch + 1,
                 self.recipe.epochs, mean_loss, "n/a" if rate is None else f"{rate:.1f}",
                 self._eta(p, evaluated=epoch))

    def _evaluate(self, p: Progress, epoch: int) -> None:
        t1 = time.perf_counter()
        m, logits = evaluate(self.model, self.method, self.task, self.devs, self.device,
                             self.runtime.eval_batch_size, self.autocast, tokenizer=self.tokenizer)
        t2 = time.perf_counter()
        p.eval_s += t2 - t1
        self.clock.evaluated(t2 - t1, p.seen)
        p.evals.append({**m, "epoch": epoch + 1})  # the epoch, for best_epoch (not every epoch is evaluated)
        main = self.task.main_metric
        # logits of the final epoch (so far: this one) and of the first best epoch (dev_* / best_dev_*)
        p.logits_last = (epoch + 1, logits)
        if p.logits_best is None or m[main] > p.logits_best[2]:
            p.logits_best = (epoch + 1, logits, m[main])
        p.curve.append({"step": self.state.step, "epoch": float(epoch + 1), "kind": "eval",
                        "lr": self.state.scheduler.get_last_lr()[0], "dev_main": m[main],
                        **{f"dev_{k}": v for k, v in m.items()}})
        log.info("%s | epoch %d/%d done at step %d/%d | loss %.4f | dev %s %.4f | %.1f s train, %.1f s eval | ETA %s",
                 self.label, epoch + 1, self.recipe.epochs, self.state.step, self.state.total_steps, p.last_finite,
                 main, m[main], p.train_s, p.eval_s, self._eta(p, evaluated=epoch + 1))
        if self.on_eval is not None:
            self.on_eval(epoch, m)

    def _eta(self, p: Progress, evaluated: int) -> str:
        """Seconds left, as ``"<n> s"`` (``"n/a"`` before the first timed step): the remaining
        optimizer steps at this process's mean seconds per step (evaluations excluded) plus the
        remaining evaluations at the mean duration of those run so far; ``evaluated`` is the
        number of epochs whose evaluation is done."""
        evals_left = (self.recipe.epochs - evaluated if self.runtime.eval_every_epoch
                      else int(evaluated < self.recipe.epochs))  # the last epoch's only
        left = self.clock.eta_s(self.state.step, self.state.total_steps, evals_left,
                                p.eval_s / len(p.evals) if p.evals else 0.0)
        return "n/a" if left is None else f"{left:.0f} s" if left >= 10 else f"{left:.1f} s"


class ProgressClock:
    """Wall-clock bookkeeping of the progress lines (this process only: not checkpointed).

    Measured at logged steps, right after the loop's one host sync of that step, so the times
    include the device's work. ``samples_per_s`` is the rate of the interval since the previous
    progress line (or evaluation); ``eta_s`` extrapolates the mean seconds per optimizer step
    since :meth:`start` (evaluations excluded) to the remaining steps and adds the remaining
    evaluations.
    """

    def __init__(self) -> None:
        self.start(0, 0)

    def start(self, step: int, seen: int) -> None:
        """Start timing at optimizer step ``step`` with ``seen`` examples seen (a resumed run
        starts at its checkpoint's counts)."""
        self.t0 = self.t_last = time.perf_counter()
        self.step0, self.seen_last, self.eval_wall = step, seen, 0.0

    def samples_per_s(self, seen: int) -> float | None:
        """Training examples per second since the previous call (None when no time passed)."""
        now = time.perf_counter()
        dt, n = now - self.t_last, seen - self.seen_last
        self.t_last, self.seen_last = now, seen
        return n / dt if dt > 0 and n > 0 else None

    def evaluated(self, seconds: float, seen: int) -> None:
        """An evaluation took ``seconds``: left out of the step time and of the next interval."""
        self.eval_wall += seconds
        self.t_last, self.seen_last = time.perf_counter(), seen

    def eta_s(self, step: int, total_steps: int, evals_left: int, eval_s: float) -> float | None:
        """Seconds left: ``(total_steps - step)`` × mean seconds per step + ``evals_left`` ×
        ``eval_s``; None before the first step of this process."""
        done = step - self.step0
        if done <= 0:
            return None
        per_step = max(time.perf_counter() - self.t0 - self.eval_wall, 0.0) / done
        return max(total_steps - step, 0) * per_step + max(evals_left, 0) * eval_s


@torch.no_grad()
def evaluate(model, method, task: TaskSpec, splits: dict[str, TokenizedSplit], device: torch.device,
             batch_size: int, autocast: bool, tokenizer=None) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics on every dev split (see :func:`peftbench.metrics.compute_metrics`) and the logits
    they were computed from; for a causal task :func:`evaluate_generation`.

    Logits stay on the device until the split is done; metrics are computed once per split.
    Batches are formed longest examples first (a stable sort by length), so each is padded to
    lengths close to its own: fewer padded tokens than file-order batches (padding is masked, so
    only floating-point rounding changes), and the largest batch, the memory peak, comes first.
    A method with ``merge_for_eval`` (the LoRA family, AdaLoRA) is evaluated with its adapters
    merged into the frozen weights (:func:`peftbench.merging.merged_adapters`; restored exactly).

    Returns:
        ``(metrics, logits)``: ``{metric_name: value}`` over all splits, and ``{split: (n, C)
        float32 array}`` (``C = num_labels``; STS-B ``(n, 1)`` scores) in the split's row order
        (causal: ``{split: list of n generated texts}``).
    """
    if task.is_causal:
        return evaluate_generation(model, method, task, splits, device, batch_size, autocast, tokenizer)
    model.eval()
    method.on_eval_start(model)
    out: dict[str, float] = {}
    logits_by_split: dict[str, np.ndarray] = {}
    with merged_adapters(model) if method.merge_for_eval else nullcontext():
        for name, split in splits.items():
            logits = []
            order = torch.argsort(split.lengths, descending=True, stable=True)
            for start in range(0, len(split), batch_size):
                b = split.batch(order[start:start + batch_size], device)
                b.pop("labels")
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    logits.append(model(**b).logits.float())
            by_length = torch.cat(logits)
            rows = torch.empty_like(by_length)
            rows[order.to(by_length.device)] = by_length  # back to the split's row order
            arr = rows.cpu().numpy().astype(np.float32)
            logits_by_split[name] = arr
            out.update(compute_metrics(task, arr, split.labels.numpy(), name))
    method.on_eval_end(model)
    model.train()
    return out, logits_by_split


@torch.no_grad()
def evaluate_generation(model, method, task: TaskSpec, splits: dict[str, TokenizedSplit], device: torch.device,
                        batch_size: int, autocast: bool, tokenizer) -> tuple[dict[str, float], dict[str, list[str]]]:
    """Causal-LM evaluation: greedy generation of at most ``task.max_new_tokens`` tokens from every
    dev prompt, left-padded in batches of ``batch_size`` (:func:`peftbench.generation.greedy_generate`),
    decoded without special tokens and scored by :func:`peftbench.metrics.compute_generation_metrics`
    against the split's references.

    Returns:
        ``(metrics, texts)``: ``{metric_name: value}`` over all splits and ``{split: [n generated
        texts]}`` in the split's row order.

    Raises:
        ValueError: no tokenizer (needed to decode).
    """
    if tokenizer is None:
        raise ValueError(f"{task.name}: evaluating a causal-LM task needs the model's tokenizer to decode answers")
    model.eval()
    method.on_eval_start(model)
    out: dict[str, float] = {}
    texts: dict[str, list[str]] = {}
    with merged_adapters(model) if method.merge_for_eval else nullcontext():
        for name, split in splits.items():
            eos = split.eos_token_id if split.eos_token_id is not None else tokenizer.eos_token_id
            gen: list[str] = []
            for start in range(0, len(split), batch_size):
                idx = torch.arange(start, min(start + batch_size, len(split)))
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    ids = greedy_generate(model, split.prompt_batch(idx, device), task.max_new_tokens, eos,
                                          split.pad_token_id)
                gen.extend(tokenizer.batch_decode(ids, skip_special_tokens=True))
            texts[name] = [t.strip() for t in gen]
            out.update(compute_generation_metrics(task, texts[name], split.references, split.labels.numpy(), name))
    method.on_eval_end(model)
    model.train()
    return out, texts


def _grad_group(name: str) -> tuple[str, int]:
    """(group, layer) of parameter ``name`` for gradient-norm logging; layer −1 where not per layer.

    Groups (:data:`peftbench.vocab.GRAD_GROUPS`): ``head`` (classifier, pooler), ``embeddings``
    (any name with ``embeddings``; a decoder's ``embed_tokens``), ``lm_head`` (a decoder's output
    projection, when untied and trainable), ``attention`` / ``mlp`` (inside layer ``N``: an
    encoder's ``….layer.N.attention.…`` / the rest of the layer; a LLaMA-style decoder's
    ``….layers.N.self_attn.…`` and ``input_layernorm`` / ``mlp`` and ``post_attention_layernorm``),
    ``other`` (everything else, e.g. DeBERTa's ``encoder.LayerNorm``, a decoder's final ``norm`` or a
    hypernetwork outside the layers).
    """
    if is_head_param(name):
        return "head", -1
    if "embeddings" in name or "embed_tokens" in name:
        return "embeddings", -1
    if re.search(r"(^|\.)lm_head\.", name):
        return "lm_head", -1
    m = re.search(r"\.layers?\.(\d+)\.", name)
    if m is None:
        return "other", -1
    attention = ".attention." in name or ".self_attn." in name or ".input_layernorm." in name
    return ("attention" if attention else "mlp"), int(m.group(1))


def gradient_norms(model, params=None) -> list[tuple[str, int, float]]:
    """L2 norms of the current gradients: per (group, layer), per group and in total.

    Rows ``(group, layer, norm)``: for every group of :data:`peftbench.vocab.GRAD_GROUPS` holding a
    counted parameter, one row per encoder layer (``layer`` ≥ 0, attention and mlp only) and one
    group row with ``layer = −1`` (the group's norm over all its parameters, ``sqrt(Σ_layers norm²)``
    for attention/mlp: the per-layer rows and the group row overlap, never add them up); plus
    ``(GRAD_TOTAL, −1, ‖g‖₂)`` over every counted parameter (the norm gradient clipping sees).
    Norms are of the fp32-upcast gradients ∂L/∂θ (the loss's units per parameter unit).

    Args:
        model: the model whose ``named_parameters()`` name the groups.
        params: the parameters to count (the training loop passes the optimizer's); default: every
            parameter with ``requires_grad`` or a gradient. A counted parameter whose ``.grad`` is
            ``None`` (a factor phased LoRA froze for the phase) contributes exactly 0, so a frozen
            group is logged with norm 0.0 rather than left out.

    One host sync: the squared sums stay on the device until a single transfer at the end.
    """
    counted = None if params is None else {id(q) for q in params}
    sq: dict[tuple[str, int], list[torch.Tensor]] = {}
    for n, p in model.named_parameters():
        if counted is None:
            if not (p.requires_grad or p.grad is not None):
                continue
        elif id(p) not in counted:
            continue
        g, layer = _grad_group(n)
        keys = [(g, layer), (GRAD_TOTAL, -1)] + ([(g, -1)] if layer >= 0 else [])
        v = p.grad.detach().float().pow(2).sum() if p.grad is not None else None
        for k in keys:
            parts = sq.setdefault(k, [])
            if v is not None:
                parts.append(v)
    keys = sorted(sq)
    present = [k for k in keys if sq[k]]
    norms = dict(zip(present, torch.stack([torch.stack(sq[k]).sum() for k in present]).sqrt().tolist())) \
        if present else {}
    return [(g, layer, norms.get((g, layer), 0.0)) for g, layer in keys]


COMPILE_WARM_CALLS = 2
"""Calls of a CUDA-graph compiled step (modes ``reduce-overhead``/``max-autotune``) per batch shape
that count as compilation / warm-up: the first compiles (and runs once eagerly), the second
records the CUDA graph; later calls replay it. Without CUDA graphs a step counts as compilation
exactly when Dynamo compiled a graph during it (:func:`graphs_compiled`)."""

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def resolve_compile_mode(mode: str, dev: torch.device) -> str:
    """The ``torch.compile`` mode a recipe's ``compile_mode`` means on ``dev``: ``auto`` is
    ``reduce-overhead`` (CUDA graphs) on a GPU and ``default`` elsewhere; others are themselves."""
    if mode == "auto":
        return "reduce-overhead" if dev.type == "cuda" else "default"
    return mode


def graphs_compiled() -> int:
    """Graphs Dynamo has compiled in this process so far (``counters["stats"]["unique_graphs"]``);
    a training step during which the count grows has compiled or recompiled its graph."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def compile_for_training(model, method_cls, dev: torch.device, runtime: Runtime):
    """The module the training loop calls: ``torch.compile(model)`` when ``runtime.compile`` asks
    for it and compilation is possible, else ``model`` itself.

    Falls back to eager, with a log line naming the reason, when the method does not declare
    ``compilable`` or the mode needs CUDA graphs and the device is a CPU (``compile_mode: auto``
    picks ``default`` there, so inductor compiles on a CPU). Shapes: static
    (``dynamic=False``) with ``length_buckets`` (one graph per bucket length); without buckets
    Dynamo's automatic dynamic shapes (``dynamic=None``: the first change of batch length
    recompiles once with a symbolic length, not once per length). Evaluation always uses the
    eager module (other shapes, dropout off).

    Returns:
        ``(module, note)``; ``note`` says what happened (``"eager"``, ``"compiled (...)"`` or the
        fallback reason).
    """
    if not runtime.compile:
        return model, "eager"
    reason = None
    mode = resolve_compile_mode(runtime.compile_mode, dev)
    if not getattr(method_cls, "compilable", False):
        reason = f"method {method_cls.name} does not declare compilable = True"
    elif dev.type != "cuda" and runtime.compile_backend == "inductor" and mode in CUDA_GRAPH_MODES:
        reason = f"compile_mode {mode} uses CUDA graphs and the device is {dev.type} (compile_mode: auto or default compiles there)"
    if reason is not None:
        log.warning("compile: falling back to eager: %s", reason)
        return model, f"eager (fallback: {reason})"
    if runtime.compile_backend != "inductor":
        mode = None
    dynamic = False if runtime.length_buckets else None
    shapes = f"{runtime.length_buckets} length buckets" if runtime.length_buckets else "dynamic shapes"
    if not runtime.length_buckets and mode in CUDA_GRAPH_MODES:
        log.warning("compile with CUDA graphs and without length_buckets: one graph is recorded per batch "
                    "length; set training.defaults.length_buckets (e.g. 4) for static shapes")
    log.info("compile: torch.compile(backend=%s, mode=%s, %s) for training steps", runtime.compile_backend, mode,
             shapes)
    return torch.compile(model, backend=runtime.compile_backend, mode=mode, dynamic=dynamic), \
        f"compiled (backend {runtime.compile_backend}, mode {mode}, {shapes})"
