"""The one training loop every method runs in.

AdamW (fused on CUDA) with linear warm-up and linear decay (``transformers``'
``get_linear_schedule_with_warmup``), gradient clipping, bf16 autocast on a GPU and fp32 on a CPU,
evaluation on every dev split at the end of each epoch, best and final dev metrics kept. Batches
come from the tokenised Parquet cache, shuffled by the run's seed and padded per batch.

Outputs of one run (all written atomically) in ``out_dir``:

- ``metrics.parquet``: one row (see :func:`run` for the columns),
- ``curve.parquet``: step, epoch, kind (train/eval), loss, lr, dev metrics per evaluation,
- ``adapter.safetensors``: the trained parameters (method's :meth:`Method.state_to_save`),
- ``ranks.parquet``: per-module rank/gates where the method reports them (else zero rows),
- ``gradnorms.parquet``: per-group gradient norms when logging is on (else zero rows).
"""
from __future__ import annotations

import importlib.metadata
import logging
import math
import platform
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from .io import read_metadata, save_tensors, write_table
from .methods import BuildContext, LoopState, get_method
from .metrics import compute_metrics
from .models import backbone_param_count, find_targets, head_module_names, is_head_param, load_classifier
from .tasks import TaskSpec, get_task

log = logging.getLogger(__name__)

RUN_FILES = ("metrics.parquet", "curve.parquet", "adapter.safetensors", "ranks.parquet", "gradnorms.parquet")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class Recipe:
    """Training hyperparameters of one run (from config: task defaults, then method overrides).

    Attributes:
        lr: peak learning rate.
        epochs: passes over the (capped) training set.
        batch_size: training examples per optimizer step.
        eval_batch_size: examples per evaluation forward pass.
        warmup_ratio: fraction of steps of linear warm-up.
        weight_decay: AdamW decoupled weight decay (not on biases/LayerNorm).
        max_grad_norm: gradient clipping threshold (L2 over all trainable parameters).
        max_train_samples: cap on training examples (a fixed subset, the same for every seed and
            method); ``None`` uses all.
        max_eval_samples: cap on examples per dev split (fixed subset); ``None`` uses all.
        log_every: optimizer steps between training-loss rows in ``curve.parquet``.
        log_gradnorms: log per-group gradient norms every ``log_every`` steps; ``None`` = the
            method's default.
        checkpoint_every: optimizer steps between checkpoints (also one after every epoch's
            evaluation); 0 turns checkpoints off. Needs a checkpoint directory.
        keep_checkpoints: keep the last checkpoint after the run's outputs are complete.
        length_buckets: pad every batch up to one of this many fixed sequence lengths (quantiles of
            the training lengths, multiples of 8) instead of its own longest example, so the
            model sees few distinct shapes (what CUDA graphs / ``torch.compile`` need); 0 = pad
            each batch to its longest example. Padding is masked, so a forward pass changes only
            by floating-point rounding; dropout masks are drawn per padded shape, so a bucketed
            run is another (equally valid) random draw than an unbucketed one with the same seed.
        compile: wrap the training forward/backward in ``torch.compile`` (evaluation stays
            eager). Falls back to eager, with a log line saying why, where compilation is not
            possible: a CUDA-graph mode on a CPU, or a method that does not declare
            ``compilable``. Compilation time is measured apart (``compile_s``).
        compile_mode: ``torch.compile`` mode; ``reduce-overhead`` uses CUDA graphs (GPU only).
        compile_backend: ``torch.compile`` backend (``inductor``; ``eager`` traces with Dynamo
            and runs eagerly, for checking the wiring on a CPU).
        method_options: the method's options (``methods.<name>`` in config).
    """

    lr: float = 2e-5
    epochs: int = 3
    batch_size: int = 32
    eval_batch_size: int = 128
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    log_every: int = 10
    log_gradnorms: bool | None = None
    checkpoint_every: int = 200
    keep_checkpoints: bool = False
    length_buckets: int = 0
    compile: bool = False
    compile_mode: str = "reduce-overhead"
    compile_backend: str = "inductor"
    method_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        """Build from a dict, rejecting unknown keys with the list of allowed ones."""
        allowed = set(cls.__dataclass_fields__)
        unknown = set(d) - allowed
        if unknown:
            raise ValueError(f"unknown training recipe key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        return cls(**d)


class TokenizedSplit:
    """A tokenised split held as one padded int matrix, batched with per-batch trimming.

    Attributes:
        input_ids, attention_mask, token_type_ids: ``(n, L)`` int64 tensors (``L`` the longest
            example), padding ``pad_token_id`` / 0.
        lengths: ``(n,)`` tokens per example.
        labels: ``(n,)`` int64 class ids or float32 scores.
    """

    def __init__(self, path: str | Path, max_samples: int | None = None):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenised split {path} not found; run `snakemake {path}` (rule tokenize) first")
        meta = read_metadata(path)
        table = pq.read_table(path)
        n = table.num_rows
        if n == 0:
            raise ValueError(f"{path} has no rows; the split is empty")
        rows = np.arange(n)
        if max_samples is not None and max_samples < n:
            # A fixed subset (seed 0), the same for every method and seed of the grid.
            rows = np.sort(np.random.default_rng(0).permutation(n)[:max_samples])
            table = table.take(rows)
            n = len(rows)
        self.path = path
        self.pad_token_id = int(meta.get("pad_token_id", 0))
        ids = table.column("input_ids").combine_chunks()
        offsets = ids.offsets.to_numpy()
        self.lengths = torch.from_numpy(np.diff(offsets).astype(np.int64))
        width = int(self.lengths.max())
        self.input_ids = self._pad(ids, offsets, width, self.pad_token_id)
        self.attention_mask = self._pad(table.column("attention_mask").combine_chunks(), offsets, width, 0)
        self.token_type_ids = (self._pad(table.column("token_type_ids").combine_chunks(), offsets, width, 0)
                               if "token_type_ids" in table.column_names else None)
        label = table.column("label").to_numpy()
        self.labels = torch.from_numpy(label.astype(np.float32 if label.dtype.kind == "f" else np.int64))
        self.buckets: list[int] = []

    def bucket_widths(self, n: int, multiple: int = 8) -> list[int]:
        """``n`` padded sequence lengths covering this split: the ``i/n`` quantiles of the example
        lengths (i = 1..n) rounded up to a multiple of ``multiple`` and capped at the longest
        example; duplicates removed, so fewer than ``n`` may come back.

        Raises:
            ValueError: ``n < 1``.
        """
        if n < 1:
            raise ValueError(f"length_buckets must be >= 1 to make buckets, got {n}")
        longest = int(self.lengths.max())
        q = np.quantile(self.lengths.numpy(), np.arange(1, n + 1) / n)
        widths = {min(longest, int(math.ceil(x / multiple) * multiple)) for x in q}
        widths.add(longest)
        return sorted(widths)

    def set_buckets(self, widths: list[int]) -> None:
        """Pad batches up to the smallest of ``widths`` that holds their longest example.

        Raises:
            ValueError: a width shorter than the longest example (it would truncate).
        """
        widths = sorted(int(w) for w in widths)
        if widths and widths[-1] < int(self.lengths.max()):
            raise ValueError(f"length buckets {widths} do not hold the longest example of {self.path} "
                             f"({int(self.lengths.max())} tokens)")
        if widths and widths[-1] > self.input_ids.shape[1]:
            extra = widths[-1] - self.input_ids.shape[1]
            self.input_ids = torch.nn.functional.pad(self.input_ids, (0, extra), value=self.pad_token_id)
            self.attention_mask = torch.nn.functional.pad(self.attention_mask, (0, extra), value=0)
            if self.token_type_ids is not None:
                self.token_type_ids = torch.nn.functional.pad(self.token_type_ids, (0, extra), value=0)
        self.buckets = widths

    def width(self, idx: torch.Tensor) -> int:
        """Padded length of the batch ``idx``: its longest example, or the bucket holding it."""
        w = int(self.lengths[idx].max())
        if self.buckets:
            w = self.buckets[int(np.searchsorted(self.buckets, w))]
        return w

    @staticmethod
    def _pad(col, offsets: np.ndarray, width: int, pad: int) -> torch.Tensor:
        flat = col.values.to_numpy().astype(np.int64)
        n = len(offsets) - 1
        out = np.full((n, width), pad, dtype=np.int64)
        lengths = np.diff(offsets)
        pos = np.arange(width)[None, :] < lengths[:, None]
        out[pos] = flat[offsets[0]:offsets[-1]]
        return torch.from_numpy(out)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """The examples ``idx`` as model inputs plus ``labels``: ``(len(idx), W)`` tensors with ``W``
        from :meth:`width` (the longest example, or its length bucket)."""
        width = self.width(idx)
        b = {"input_ids": self.input_ids[idx, :width], "attention_mask": self.attention_mask[idx, :width]}
        if self.token_type_ids is not None:
            b["token_type_ids"] = self.token_type_ids[idx, :width]
        b["labels"] = self.labels[idx]
        return {k: v.to(device, non_blocking=True) for k, v in b.items()}


def _versions() -> dict[str, str]:
    out = {"python_version": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "peftbench"):
        try:
            out[f"{pkg}_version"] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[f"{pkg}_version"] = "unknown"
    return out


def _peak_mem_mib(device: torch.device) -> float:
    """Peak memory in MiB: CUDA max allocated on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@torch.no_grad()
def evaluate(model, method, task: TaskSpec, splits: dict[str, TokenizedSplit], device: torch.device,
             batch_size: int, autocast: bool) -> dict[str, float]:
    """Metrics on every dev split (see :func:`peftbench.metrics.compute_metrics`).

    Logits stay on the device until the split is done; metrics are computed once per split.
    """
    model.eval()
    method.on_eval_start(model)
    out: dict[str, float] = {}
    for name, split in splits.items():
        logits = []
        for start in range(0, len(split), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(split)))
            b = split.batch(idx, device)
            b.pop("labels")
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits.append(model(**b).logits.float())
        out.update(compute_metrics(task, torch.cat(logits).cpu().numpy(), split.labels.numpy(), name))
    method.on_eval_end(model)
    model.train()
    return out


GRAD_GROUPS = ("attention", "mlp", "embeddings", "head")


def _grad_group(name: str) -> tuple[str, int]:
    """(group, layer) of a parameter for gradient-norm logging; layer −1 where not per layer."""
    import re

    if is_head_param(name):
        return "head", -1
    if "embeddings" in name:
        return "embeddings", -1
    m = re.search(r"\.layer\.(\d+)\.", name)
    layer = int(m.group(1)) if m else -1
    if ".attention." in name:
        return "attention", layer
    return "mlp", layer


def gradient_norms(model) -> list[tuple[str, int, float]]:
    """L2 norm of the current gradients per (group, layer) and per group (layer −1).

    Groups: attention, mlp (feed-forward), embeddings, head. Parameters without gradient count 0.
    """
    sq: dict[tuple[str, int], float] = {}
    for n, p in model.named_parameters():
        if p.grad is None:
            continue
        g, layer = _grad_group(n)
        v = float(p.grad.detach().float().pow(2).sum())
        sq[(g, layer)] = sq.get((g, layer), 0.0) + v
        if layer >= 0:
            sq[(g, -1)] = sq.get((g, -1), 0.0) + v
    return [(g, layer, math.sqrt(v)) for (g, layer), v in sorted(sq.items())]


def build_model(model_spec: str, task: TaskSpec, method_name: str, budget: float, seed: int, recipe: Recipe,
                steps_per_epoch: int, total_steps: int, dev: torch.device, svd_path: str | Path | None = None):
    """Load the pretrained classifier and wrap it with the method (still on the CPU).

    Returns:
        ``(model, method, backbone_params)``.

    Raises:
        ValueError: bad method options or budget (from the method).
    """
    model = load_classifier(model_spec, task)
    backbone = backbone_param_count(model)
    ctx = BuildContext(task=task, budget=budget, backbone_params=backbone, targets=find_targets(model),
                       head_modules=head_module_names(model), total_steps=total_steps,
                       steps_per_epoch=steps_per_epoch, options=dict(recipe.method_options), seed=seed,
                       device=dev, svd_path=Path(svd_path) if svd_path else None)
    method = get_method(method_name)(ctx)
    return method.build(model), method, backbone


def run(*, model_name: str, model_spec: str, task_name: str, method_name: str, budget: float, seed: int,
        train_path: str | Path, dev_paths: dict[str, str | Path], out_dir: str | Path, recipe: Recipe,
        svd_path: str | Path | None = None, device: str | None = None,
        checkpoint_dir: str | Path | None = None) -> dict[str, Any]:
    """Train one (model, task, method, budget, seed) and write its outputs to ``out_dir``.

    With ``checkpoint_dir``, the run saves a checkpoint (trainable parameters, optimizer,
    scheduler, RNG states, data position, method state, the curve so far) every
    ``recipe.checkpoint_every`` steps and after each epoch, and a rerun after a kill resumes from
    it and ends with the same metrics as an uninterrupted run (bitwise on a CPU). A NaN/inf loss
    ends the run as ``status = "failed"`` (outputs written, error in the ``error`` column, the last
    checkpoint kept for inspection).

    Args:
        model_name: short model name (the ``model`` wildcard).
        model_spec: what ``models:`` maps it to (hub id, directory, ``package:NAME``).
        task_name: GLUE task.
        method_name: registry key.
        budget: trainable-parameter budget, % of backbone parameters (ignored by ``full``).
        seed: seeds data order, head init, dropout and adapter init.
        train_path: tokenised train split.
        dev_paths: ``{split: tokenised path}`` for every dev split of the task.
        out_dir: run directory.
        recipe: hyperparameters.
        svd_path: ``factors.safetensors`` for methods that use the SVD.
        device: ``cuda``/``cpu``; default CUDA when available.
        checkpoint_dir: where checkpoints go (outside the outputs, so Snakemake does not delete
            them when the job fails); ``None`` disables checkpoints.

    Returns:
        The ``metrics.parquet`` row as a dict. Columns: model, task, method, budget, seed, status,
        metric (main metric name), dev_main, best_dev_main, best_epoch, ``dev_<m>`` and
        ``best_dev_<m>`` per task metric, trainable_params, adapter_params, head_params,
        backbone_params, trainable_pct (% of backbone, adapter only), train_s, samples_per_s,
        eval_s, peak_mem_mib, steps, epochs, train_examples, eval_examples, batch_size, lr,
        protocol, device, versions, plus method columns (e.g. rank).

    Raises:
        FileNotFoundError, ValueError: missing inputs, bad recipe or options.
    """
    task = get_task(task_name)
    method_cls = get_method(method_name)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    autocast = dev.type == "cuda"
    out_dir = Path(out_dir)
    if method_cls.uses_svd and svd_path is None:
        raise ValueError(f"method {method_name} needs the SVD factors (--svd results/svd/{model_name}/factors.safetensors)")

    torch.manual_seed(seed)
    np.random.seed(seed)
    train = TokenizedSplit(train_path, recipe.max_train_samples)
    if recipe.length_buckets:
        train.set_buckets(train.bucket_widths(recipe.length_buckets))
        log.info("length buckets (tokens): %s", train.buckets)
    devs = {s: TokenizedSplit(p, recipe.max_eval_samples) for s, p in dev_paths.items()}
    steps_per_epoch = math.ceil(len(train) / recipe.batch_size)
    total_steps = steps_per_epoch * recipe.epochs

    model, method, backbone = build_model(model_spec, task, method_name, budget, seed, recipe, steps_per_epoch,
                                          total_steps, dev, svd_path)
    model = model.to(dev)
    model.train()
    train_model, compile_note = compile_for_training(model, method_cls, dev, recipe)
    log_gradnorms = method.log_gradnorms if recipe.log_gradnorms is None else recipe.log_gradnorms
    lr = float(recipe.lr)

    from transformers import get_linear_schedule_with_warmup

    warmup = int(recipe.warmup_ratio * total_steps)

    def make_optimizer():
        return torch.optim.AdamW(method.parameter_groups(model, recipe.weight_decay), lr=lr,
                                 fused=dev.type == "cuda")

    optimizer = make_optimizer()
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    state = LoopState(step=0, epoch=0, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                      optimizer=optimizer, scheduler=scheduler)

    def rebuild(transfer=None):
        old = state.optimizer
        new = make_optimizer()
        old_params = {id(p) for g in old.param_groups for p in g["params"]}
        for g in new.param_groups:
            for p in g["params"]:
                if id(p) in old_params and p in old.state:
                    new.state[p] = old.state[p]
        if transfer is not None:
            transfer(old, new)
        for g in new.param_groups:
            g["initial_lr"] = lr
        state.optimizer = new
        state.scheduler = get_linear_schedule_with_warmup(new, warmup, total_steps, last_epoch=state.step - 1)

    state.rebuild = rebuild
    trainable = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    p = _Progress()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    ckpt = Checkpointer(checkpoint_dir, _fingerprint(model_name, model_spec, task_name, method_name, budget, seed,
                                                     recipe, train_path)) if checkpoint_dir else None
    if ckpt is not None and ckpt.exists():
        resumed = ckpt.load(model, method, state, gen, p, dev, make_optimizer, warmup, total_steps, lr)
        if resumed:
            log.info("resumed from %s at step %d (epoch %d)", ckpt.path, state.step, p.epoch)
    log.info("%s/%s/%s b%s s%d: %d train examples, %d steps (%d per epoch), %d trainable parameters, device %s",
             model_name, task_name, method_name, budget, seed, len(train), total_steps, steps_per_epoch,
             sum(q.numel() for q in trainable), dev)
    error = None
    try:
        _loop(model, method, task, train, devs, recipe, state, gen, p, dev, autocast, log_gradnorms, lr, ckpt,
              label=f"{method_name} on {task_name} (budget {budget}, seed {seed})",
              train_model=train_model if train_model is not model else None)
    except TrainingDiverged as exc:
        error = str(exc)
        log.error("%s", exc)

    evals = p.evals
    counts = method.param_counts(model)
    row: dict[str, Any] = {
        "model": model_name, "task": task_name, "method": method_name,
        "budget": 100.0 if method_cls.budget_free else float(budget), "seed": int(seed),
        "status": "ok" if error is None else "failed", "error": error, "metric": task.main_metric,
    }
    if error is None:
        best = int(np.argmax([e[task.main_metric] for e in evals]))
        row.update({"dev_main": evals[-1][task.main_metric], "best_dev_main": evals[best][task.main_metric],
                    "best_epoch": best + 1})
        for k in task.metric_names():
            row[f"dev_{k}"] = evals[-1][k]
            row[f"best_dev_{k}"] = evals[best][k]
    else:
        row.update({"dev_main": float("nan"), "best_dev_main": float("nan"), "best_epoch": -1})
        for k in task.metric_names():
            row[f"dev_{k}"] = row[f"best_dev_{k}"] = float("nan")
    train_s, eval_s, seen = p.train_s, p.eval_s, p.seen
    curve, gradrows = p.curve, p.gradrows
    row.update({
        "trainable_params": counts["adapter_params"] + counts["head_params"], **counts,
        "backbone_params": backbone, "trainable_pct": 100.0 * counts["adapter_params"] / backbone,
        "budget_params": method.budget_count(model), "budget_pct": 100.0 * method.budget_count(model) / backbone,
        "train_s": train_s, "samples_per_s": (seen - p.compile_seen) / max(train_s, 1e-9), "eval_s": eval_s,
        "compile_s": p.compile_s, "compiled": train_model is not model, "compile_note": compile_note,
        "length_buckets": ",".join(map(str, train.buckets)),
        "peak_mem_mib": _peak_mem_mib(dev), "steps": state.step, "epochs": recipe.epochs,
        "train_examples": len(train), "eval_examples": sum(len(s) for s in devs.values()),
        "batch_size": recipe.batch_size, "lr": lr,
        "protocol": "final epoch (dev_*) and best epoch (best_dev_*) on the GLUE dev split; one run per seed",
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.machine()})",
        **_versions(), **method.summary(model),
    })
    keys = {"model": model_name, "task": task_name, "method": method_name, "budget": row["budget"], "seed": int(seed)}
    tables = method.tables(model)
    ranks = tables.get("ranks", pd.DataFrame(columns=["module", "layer", "kind", "rank", "score"]))
    save_tensors(method.state_to_save(model), out_dir / "adapter.safetensors",
                 metadata={k: str(v) for k, v in keys.items()})
    write_table(_with_keys(pd.DataFrame(curve), keys), out_dir / "curve.parquet")
    write_table(_with_keys(ranks, keys), out_dir / "ranks.parquet")
    grad = pd.DataFrame(gradrows, columns=["step", "group", "layer", "grad_norm"])
    write_table(_with_keys(grad, keys), out_dir / "gradnorms.parquet")
    write_table(pd.DataFrame([row]), out_dir / "metrics.parquet")  # last: its presence marks a finished run
    if ckpt is not None and error is None and not recipe.keep_checkpoints:
        ckpt.remove()
    return row


@dataclass
class _Progress:
    """Everything of the loop's progress that a checkpoint must carry besides tensors."""

    epoch: int = 0            # epoch being run
    b_next: int = 0           # next batch index within that epoch
    gen_state: Any = None     # data-order generator state at the start of ``epoch``
    curve: list = field(default_factory=list)
    gradrows: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    last_finite: float = float("nan")
    train_s: float = 0.0
    eval_s: float = 0.0
    seen: int = 0
    loss_sum: float = 0.0     # training loss summed since the last logged step
    n_acc: int = 0
    compile_s: float = 0.0    # seconds of steps that compiled or recorded a graph (not in train_s)
    compile_seen: int = 0     # examples of those steps (not in samples_per_s)
    shape_calls: dict = field(default_factory=dict)  # batch shape -> compiled calls so far


COMPILE_WARM_CALLS = 2
"""Calls of a compiled step per batch shape that count as compilation / warm-up: the first
compiles (and runs once eagerly), the second records the CUDA graph; later calls replay it."""


def compile_for_training(model, method_cls, dev: torch.device, recipe: Recipe):
    """The module the training loop calls: ``torch.compile(model)`` when ``recipe.compile`` asks
    for it and compilation is possible, else ``model`` itself.

    Falls back to eager, with a log line naming the reason, when the method does not declare
    ``compilable`` or the mode needs CUDA graphs and the device is a CPU. Evaluation always uses
    the eager module (other shapes, dropout off).

    Returns:
        ``(module, note)``; ``note`` says what happened (``"eager"``, ``"compiled (...)"`` or the
        fallback reason).
    """
    if not recipe.compile:
        return model, "eager"
    reason = None
    if not getattr(method_cls, "compilable", False):
        reason = f"method {method_cls.name} does not declare compilable = True"
    elif dev.type != "cuda" and recipe.compile_backend == "inductor" and \
            recipe.compile_mode in ("reduce-overhead", "max-autotune"):
        reason = f"compile_mode {recipe.compile_mode} uses CUDA graphs and the device is {dev.type}"
    if reason is not None:
        log.warning("compile: falling back to eager: %s", reason)
        return model, f"eager (fallback: {reason})"
    if not recipe.length_buckets:
        log.warning("compile without length_buckets: every new batch length recompiles; set "
                    "training.defaults.length_buckets (e.g. 4) for static shapes")
    mode = None if recipe.compile_backend != "inductor" else recipe.compile_mode
    log.info("compile: torch.compile(backend=%s, mode=%s) for training steps", recipe.compile_backend, mode)
    return torch.compile(model, backend=recipe.compile_backend, mode=mode, dynamic=False), \
        f"compiled (backend {recipe.compile_backend}, mode {mode})"


def _loop(model, method, task, train, devs, recipe, state, gen, p: _Progress, dev, autocast, log_gradnorms, lr,
          ckpt, label: str, train_model=None) -> None:
    """Run the epochs from ``p``'s position; raises TrainingDiverged on a NaN/inf loss.

    ``train_model`` (a compiled ``model``) runs the training forward passes when given; the
    first :data:`COMPILE_WARM_CALLS` steps of each batch shape are then timed apart as
    compilation (``p.compile_s``), not training.
    """
    forward = train_model if train_model is not None else model
    steps_per_epoch = state.steps_per_epoch
    for epoch in range(p.epoch, recipe.epochs):
        state.epoch = p.epoch = epoch
        if p.b_next == 0:
            p.gen_state = gen.get_state()
        else:
            gen.set_state(p.gen_state)
        perm = torch.randperm(len(train), generator=gen)
        t0 = time.perf_counter()
        excluded = 0.0
        loss_acc = torch.full((), p.loss_sum, device=dev)
        for b in range(p.b_next, steps_per_epoch):
            idx = perm[b * recipe.batch_size:(b + 1) * recipe.batch_size]
            batch = train.batch(idx, dev)
            warm = False
            if train_model is not None:
                shape = tuple(batch["input_ids"].shape)
                calls = p.shape_calls.get(shape, 0)
                p.shape_calls[shape] = calls + 1
                if calls < COMPILE_WARM_CALLS:
                    warm = True
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    tw = time.perf_counter()
            method.on_step_start(model, state)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                outputs = forward(**batch)
                loss = outputs.loss
                extra = method.extra_loss(model, outputs, batch, state)
                if extra is not None:
                    loss = loss + extra
            loss.backward()
            method.after_backward(model, state)
            if log_gradnorms and (state.step % recipe.log_every == 0):
                p.gradrows.extend((state.step, g, layer, v) for g, layer, v in gradient_norms(model))
            params = [q for g in state.optimizer.param_groups for q in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
            state.optimizer.step()
            state.scheduler.step()
            state.step += 1
            method.after_optimizer_step(model, state)
            state.optimizer.zero_grad(set_to_none=True)
            loss_acc += loss.detach().float()
            p.n_acc += 1
            p.seen += len(idx)
            if warm:
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                dt = time.perf_counter() - tw
                excluded += dt
                p.compile_s += dt
                p.compile_seen += len(idx)
            if state.step % recipe.log_every == 0 or b == steps_per_epoch - 1:
                mean_loss = float(loss_acc) / p.n_acc  # one host sync per logged step
                if not math.isfinite(mean_loss):
                    raise TrainingDiverged(
                        f"{label}: loss became {mean_loss} at step {state.step} (epoch {epoch + 1}); last finite "
                        f"loss {'none logged yet' if math.isnan(p.last_finite) else f'{p.last_finite:.4g}'}. Fix: lower the learning rate (now {lr:g}) or the gradient "
                        f"clipping threshold max_grad_norm (now {recipe.max_grad_norm:g}).")
                p.last_finite = mean_loss
                p.curve.append({"step": state.step, "epoch": state.step / steps_per_epoch, "kind": "train",
                                "loss": mean_loss, "lr": state.scheduler.get_last_lr()[0], **state.log})
                state.log.clear()
                loss_acc.zero_()
                p.n_acc = 0
            p.b_next = b + 1
            if ckpt is not None and recipe.checkpoint_every and state.step % recipe.checkpoint_every == 0 \
                    and p.b_next < steps_per_epoch:
                p.loss_sum = float(loss_acc)
                p.train_s += time.perf_counter() - t0 - excluded
                ckpt.save(model, method, state, p)
                t0, excluded = time.perf_counter(), 0.0
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        p.train_s += time.perf_counter() - t0 - excluded
        t1 = time.perf_counter()
        m = evaluate(model, method, task, devs, dev, recipe.eval_batch_size, autocast)
        p.eval_s += time.perf_counter() - t1
        p.evals.append(m)
        p.curve.append({"step": state.step, "epoch": float(epoch + 1), "kind": "eval",
                        "lr": state.scheduler.get_last_lr()[0], "dev_main": m[task.main_metric],
                        **{f"dev_{k}": v for k, v in m.items()}})
        log.info("epoch %d/%d: loss %.4f, dev %s = %.4f (%.1f s train, %.1f s eval)", epoch + 1, recipe.epochs,
                 p.last_finite, task.main_metric, m[task.main_metric], p.train_s, p.eval_s)
        p.epoch, p.b_next, p.loss_sum = epoch + 1, 0, 0.0
        p.gen_state = gen.get_state()  # the data order of the next epoch starts here
        if ckpt is not None and recipe.checkpoint_every and epoch + 1 < recipe.epochs:
            ckpt.save(model, method, state, p)


def _fingerprint(*parts) -> str:
    """A hash of what defines a run; a checkpoint of another configuration is not resumed."""
    import hashlib
    import json

    raw = json.dumps([str(x) if not isinstance(x, Recipe) else x.__dict__ for x in parts], sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


class Checkpointer:
    """Saves and restores one run's last checkpoint (``checkpoint.pt``, written atomically).

    A checkpoint holds the trainable parameters (and any parameter that ever was trainable),
    optimizer and scheduler states, the RNG states (torch, CUDA, numpy, the data-order
    generator), the loop's progress and :meth:`Method.checkpoint_state`.
    """

    def __init__(self, directory: str | Path, fingerprint: str):
        self.dir = Path(directory)
        self.path = self.dir / "checkpoint.pt"
        self.fingerprint = fingerprint

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, model, method, state: LoopState, p: _Progress) -> None:
        from .io import atomic_path

        payload = {
            "fingerprint": self.fingerprint,
            "step": state.step,
            "params": {n: q.detach().cpu().clone() for n, q in model.named_parameters() if q.requires_grad},
            "method": method.checkpoint_state(model),
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "progress": p.__dict__,
        }
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            torch.save(payload, tmp)
        log.info("checkpoint at step %d -> %s", state.step, self.path)

    def load(self, model, method, state: LoopState, gen, p: _Progress, dev, make_optimizer, warmup: int,
             total_steps: int, lr: float) -> bool:
        """Restore a checkpoint into the freshly built run; False (and a warning) if it belongs to
        another configuration or cannot be read."""
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as exc:  # a truncated file cannot happen (atomic), but be safe
            log.warning("cannot read checkpoint %s (%s); starting from scratch", self.path, exc)
            return False
        if payload.get("fingerprint") != self.fingerprint:
            log.warning("checkpoint %s belongs to another configuration of this run; starting from scratch", self.path)
            return False
        method.restore_checkpoint_state(model, payload["method"])
        named = dict(model.named_parameters())
        for n, t in payload["params"].items():
            if n not in named or named[n].shape != t.shape:
                raise RuntimeError(f"checkpoint {self.path}: parameter {n} does not fit the model "
                                   f"({None if n not in named else tuple(named[n].shape)} vs {tuple(t.shape)}); "
                                   f"delete the checkpoint to start over")
            with torch.no_grad():
                named[n].copy_(t.to(named[n].device))
        from transformers import get_linear_schedule_with_warmup

        state.optimizer = make_optimizer()
        # The schedule first (it writes the step-0 lr into the groups), then the saved groups' lr.
        state.scheduler = get_linear_schedule_with_warmup(state.optimizer, warmup, total_steps)
        state.optimizer.load_state_dict(payload["optimizer"])
        state.scheduler.load_state_dict(payload["scheduler"])
        state.step = payload["step"]
        p.__dict__.update(payload["progress"])
        gen.set_state(p.gen_state)
        torch.set_rng_state(payload["rng"]["torch"])
        np.random.set_state(payload["rng"]["numpy"])
        if payload["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
        return True

    def remove(self) -> None:
        if self.path.is_file():
            self.path.unlink()
        try:
            self.dir.rmdir()
        except OSError:
            pass


def _with_keys(df: pd.DataFrame, keys: dict[str, Any]) -> pd.DataFrame:
    df = df.copy()
    for i, (k, v) in enumerate(keys.items()):
        df.insert(i, k, v)
    return df
