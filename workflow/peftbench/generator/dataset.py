"""The generator's dataset (rule ``tokenize_params``): tokenised checkpoints, prompts and splits.

:func:`build_dataset` reads the snapshots of every collected run (``<run>/snapshots/*.safetensors``,
the runtime key ``snapshots``; at most ``max_checkpoints`` per run, the last ones), tokenises them
with one :class:`~peftbench.generator.params.ParamLayout` (fixed by the first checkpoint, checked
against every other one) and writes, under ``out_dir``:

- ``params.safetensors``: ``tokens`` ``(N, T, D)`` float32 (row ``i`` is checkpoint ``ckpt_id = i``),
  ``mask`` ``(T, D)`` uint8, and per split ``mean.<split>`` / ``std.<split>`` ``(T,)``: the per-token
  normalisation statistics over that split's *training* checkpoints
  (:func:`~peftbench.generator.params.token_stats`); metadata ``layout`` (JSON);
- ``checkpoints.parquet``: one row per checkpoint (``ckpt_id``, run key columns, ``step``,
  ``final``: the run's last snapshot, ``path``);
- ``layout.parquet``: one row per real token (:meth:`ParamLayout.token_frame`);
- ``prompts.parquet``: per task ``train_prompts + validation_prompts`` prompts, each
  ``samples_per_prompt`` training sentences of the task (rows of the GLUE train split drawn without
  replacement with ``prompt_seed``, so prompts never overlap; a sentence pair is joined by a
  space), the first ``validation_prompts`` of the draw are ``role = validation``;
- ``splits.parquet``: per split, which checkpoints it trains on and validates on (``split``,
  ``role``, ``ckpt_id``, ``task``, ``seed``, ``step``). ``in_task``: trains on every checkpoint
  (with the training prompts of its task), validates on each run's final checkpoint with the
  held-out prompts. ``loto_<task>``: trains on the checkpoints of every *other* task only and
  validates on the held-out task's final checkpoints with its held-out prompts (zero-shot).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..io import save_tensors, write_table
from ..runkey import RunKey
from ..vocab import GENERATOR_DATA_FILES, RUN_FILES, SNAPSHOT_DIR, get_task
from .params import ParamLayout, load_lora_state, token_stats
from .settings import GeneratorSettings, held_out_task

log = logging.getLogger(__name__)

#: Files of a generator dataset directory.
DATASET_FILES = GENERATOR_DATA_FILES


def run_snapshots(run_dir: str | Path, max_checkpoints: int) -> list[tuple[int, Path]]:
    """``[(step, path), …]`` of a run's snapshots in step order, the last ``max_checkpoints``.

    Raises:
        FileNotFoundError: the run has no ``metrics.parquet`` (not finished) or no snapshots (it ran
            with ``snapshots: 0``; the message says how to rerun it).
    """
    run_dir = Path(run_dir)
    if not (run_dir / RUN_FILES["metrics"]).is_file():
        raise FileNotFoundError(f"{run_dir / RUN_FILES['metrics']} not found; train the run first (rule train)")
    files = sorted((run_dir / SNAPSHOT_DIR).glob("step*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{run_dir / SNAPSHOT_DIR}: no adapter snapshots; the run was trained with snapshots: 0 (an untracked "
            f"runtime key, so enabling it reran nothing). Fix: snakemake --forcerun train for this run, or delete "
            f"{run_dir} and run the workflow again")
    return [(int(f.stem[4:]), f) for f in files][-max_checkpoints:]


def sentences(task: str, glue_dir: str | Path | None) -> tuple[list[str], str]:
    """Every training sentence of ``task`` (a pair joined by a space) and where it was read from."""
    from ..data import load_split, split_path

    spec = get_task(task)
    df = load_split(spec, "train", glue_dir)
    texts = df[list(spec.text_columns)].astype(str).agg(" ".join, axis=1).tolist()
    return texts, str(split_path(glue_dir, task, "train")) if glue_dir else f"nyu-mll/glue {task} train"


def prompt_sets(texts_by_task: dict[str, tuple[list[str], str]], s: GeneratorSettings) -> pd.DataFrame:
    """The prompts of every task (see the module docstring): columns ``task``, ``prompt_id``,
    ``role``, ``rows`` (train-split row numbers), ``texts``.

    Raises:
        ValueError: a task with fewer training sentences than the prompts need (an empty or too
            small prompt set; names the file and the settings to lower).
    """
    rows = []
    need = s.samples_per_prompt * (s.train_prompts + s.validation_prompts)
    for task, (texts, source) in texts_by_task.items():
        if len(texts) < need:
            raise ValueError(f"{source}: {len(texts)} training sentences of {task}, the prompt set needs {need} "
                             f"(generator.samples_per_prompt × (train_prompts + validation_prompts)); lower those "
                             f"or use a larger training split (data.glue_dir)")
        order = np.random.default_rng(s.prompt_seed).permutation(len(texts))[:need]
        for p in range(s.train_prompts + s.validation_prompts):
            idx = order[p * s.samples_per_prompt:(p + 1) * s.samples_per_prompt]
            rows.append({"task": task, "prompt_id": p, "role": "validation" if p < s.validation_prompts else "train",
                         "rows": [int(i) for i in idx], "texts": [texts[i] for i in idx]})
    return pd.DataFrame(rows)


def split_rows(ckpts: pd.DataFrame, splits: list[str]) -> pd.DataFrame:
    """Which checkpoints each split trains and validates on (see the module docstring)."""
    out = []
    for split in splits:
        held = held_out_task(split)
        for _, c in ckpts.iterrows():
            base = {"split": split, "ckpt_id": int(c.ckpt_id), "task": c.task, "seed": int(c.seed), "step": int(c.step)}
            if held is None or c.task != held:
                out.append({**base, "role": "train"})
            if c.final and (held is None or c.task == held):
                out.append({**base, "role": "validation"})
    return pd.DataFrame(out, columns=["split", "role", "ckpt_id", "task", "seed", "step"])


def build_dataset(*, run_dirs: list[str | Path], settings: GeneratorSettings, out_dir: str | Path,
                  glue_dir: str | Path | None = None) -> dict:
    """Write the dataset files of :data:`DATASET_FILES` into ``out_dir`` (see the module docstring).

    Returns:
        ``{"checkpoints": N, "tokens": T_used, "splits": [...]}``.

    Raises:
        FileNotFoundError: a run without ``metrics.parquet`` or snapshots.
        peftbench.generator.params.ParamTokenError: a checkpoint without LoRA tensors, of another
            shape or rank than the first, or with rows wider than ``token_width`` (names the file).
        ValueError: a prompt set that cannot be filled (names the file).
    """
    out_dir = Path(out_dir)
    layout, tokens, rows = None, [], []
    for run_dir in run_dirs:
        key = RunKey.parse(run_dir)
        snaps = run_snapshots(run_dir, settings.max_checkpoints)
        for step, path in snaps:
            state = load_lora_state(path)
            if layout is None:
                layout = ParamLayout.from_state(state, settings.token_width, settings.max_tokens, str(path))
            tokens.append(layout.tokenize(state, str(path)))
            rows.append({"ckpt_id": len(rows), **key.columns(), "step": step, "final": step == snaps[-1][0],
                         "path": str(path)})
    if layout is None:
        raise ValueError("no runs to collect (generator.tasks / seeds select none)")
    ckpts = pd.DataFrame(rows)
    ckpts["budget"] = ckpts["budget"].astype(str)
    stacked = torch.stack(tokens)                                           # (N, T, D)
    mask = layout.mask()
    splits = split_rows(ckpts, settings.splits())
    tensors = {"tokens": stacked, "mask": mask.to(torch.uint8)}
    for split in settings.splits():
        ids = splits[(splits.split == split) & (splits.role == "train")].ckpt_id.to_numpy()
        if len(ids) == 0:
            raise ValueError(f"generator split {split}: no training checkpoints")
        tensors[f"mean.{split}"], tensors[f"std.{split}"] = token_stats(stacked[torch.tensor(ids.tolist())], mask)
    texts = {t: sentences(t, glue_dir) for t in settings.tasks}
    prompts = prompt_sets(texts, settings)
    save_tensors(tensors, out_dir / DATASET_FILES["params"], metadata={"layout": layout.to_json()})
    write_table(ckpts, out_dir / DATASET_FILES["checkpoints"])
    write_table(layout.token_frame(), out_dir / DATASET_FILES["layout"])
    write_table(prompts, out_dir / DATASET_FILES["prompts"])
    write_table(splits, out_dir / DATASET_FILES["splits"])
    log.info("generator dataset: %d checkpoints, %d of %d tokens used (width %d), %d prompts, splits %s",
             len(ckpts), layout.used_tokens, layout.max_tokens, layout.token_width, len(prompts), settings.splits())
    return {"checkpoints": len(ckpts), "tokens": layout.used_tokens, "splits": settings.splits()}


def load_dataset(data_dir: str | Path) -> dict:
    """The dataset of :func:`build_dataset`: ``tokens``, ``mask`` (bool), ``stats`` ({split: (mean,
    std)}), ``layout``, and the ``checkpoints``, ``prompts``, ``splits`` frames.

    Raises:
        FileNotFoundError: a dataset file is missing (names it and the rule that writes it).
    """
    from safetensors import safe_open

    data_dir = Path(data_dir)
    for f in DATASET_FILES.values():
        if not (data_dir / f).is_file():
            raise FileNotFoundError(f"{data_dir / f} not found; run rule tokenize_params first")
    with safe_open(str(data_dir / DATASET_FILES["params"]), "pt") as fh:
        layout = ParamLayout.from_json(fh.metadata()["layout"])
        t = {k: fh.get_tensor(k) for k in fh.keys()}
    stats = {k.split(".", 1)[1]: (t[k], t["std." + k.split(".", 1)[1]]) for k in t if k.startswith("mean.")}
    return {"tokens": t["tokens"], "mask": t["mask"].bool(), "stats": stats, "layout": layout,
            **{k: pd.read_parquet(data_dir / DATASET_FILES[k]) for k in ("checkpoints", "prompts", "splits")}}

