"""Generation and evaluation of one generator split (rule ``evaluate_generator``).

For every validation checkpoint of the split — the final snapshot of a run ``(task, seed)`` — and
every held-out prompt of its task, the trained generator (:mod:`.fit`) makes ``(T, D)`` tokens,
which are denormalised with the split's statistics and turned back into LoRA tensors
(:meth:`~.params.ParamLayout.detokenize`). Each adapter is scored on the task's dev set by the
same code as trained runs: the run's model is rebuilt exactly as training built it
(:func:`peftbench.train.build_model`, the run's key, recipe and step counts), its
``adapter.safetensors`` is loaded (:func:`peftbench.checkpoint.load_adapter`), the LoRA tensors are
replaced, and :func:`peftbench.train.evaluate` scores every dev split.

Variants (the ``variant`` column), all with the *task head of the trained run* (the generator makes
adapters; classifier and pooler are not generated):

- ``generated``: the generated LoRA tensors, one row per held-out prompt (also written as a peft
  adapter, ``adapters/<task>/s<seed>/p<prompt>/``: ``adapter_config.json`` +
  ``adapter_model.safetensors`` by ``PeftModel.save_pretrained``, loadable with
  ``PeftModel.from_pretrained`` on the rebuilt classifier);
- ``trained``: the trained run's own adapter (the LoRA the generator imitates);
- ``checkpoint_mean``: the element-wise mean of the split's *training* checkpoints of the task
  (in-task), or of all its training checkpoints when the task has none (zero-shot splits): what a
  generator that ignores its prompt would output under the MSE loss;
- ``head_only``: the frozen backbone with the trained run's head and the adapter removed (every
  ``lora_B`` set to 0, so ``ΔW = B A = 0``).

Outputs (``out_dir``): ``evaluation.parquet`` (:data:`EVAL_COLUMNS` + ``dev_<metric>`` per task
metric), ``reconstruction.parquet`` (parameter-space errors of ``generated`` and
``checkpoint_mean`` against the checkpoint: :data:`RECON_COLUMNS`), ``errors_by_matrix.parquet``
(relative error and RMSE of ``generated`` per layer, kind and factor, mean over prompts and seeds).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..io import write_table
from ..runkey import RunKey
from ..vocab import GENERATOR_SPLIT_FILES, RUN_FILES, get_task
from .dataset import load_dataset
from .fit import load_generator, param_errors, prompt_embeddings, split_pairs
from .params import denormalise, load_lora_state
from .settings import held_out_task

log = logging.getLogger(__name__)

VARIANTS = ("generated", "trained", "checkpoint_mean", "head_only")
EVAL_COLUMNS = ["split", "zero_shot", "task", "seed", "variant", "prompt_id", "metric", "dev_main"]
RECON_COLUMNS = ["split", "zero_shot", "task", "seed", "variant", "prompt_id", "mae", "rmse", "rel_error"]
EVAL_FILES = GENERATOR_SPLIT_FILES


def evaluate_generator(*, data_dir: str | Path, generator_path: str | Path, model_spec: str,
                       dev_dir: str | Path, recipes: dict, out_dir: str | Path, runtime=None,
                       budget_denominator: str | None = None, device: str | None = None,
                       model_cache: str | Path | None = None) -> pd.DataFrame:
    """Generate adapters for the held-out prompts of the generator's split and score every variant
    (see the module docstring); write :data:`EVAL_FILES` into ``out_dir``.

    Args:
        dev_dir: the tokenised cache of the backbone (``{dev_dir}/{task}/{split}.parquet``).
        recipes: ``{task: Recipe or its dict}``: each task's training recipe (method options,
            ``max_eval_samples``), as the train rule got it.
        model_cache: the backbone's model cache folder (:mod:`peftbench.modelcache`); ``None``:
            the backbone is loaded from ``model_spec``.

    Returns:
        The ``evaluation.parquet`` table.

    Raises:
        FileNotFoundError: a dataset, generator, run or dev file is missing.
        ValueError: an adapter tensor that does not fit the rebuilt model.
    """
    from ..batches import TokenizedSplit
    from ..recipe import Recipe, Runtime
    from ..checkpoint import load_adapter
    from ..train import build_model, evaluate

    runtime = runtime or Runtime.from_dict({})
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = load_dataset(data_dir)
    gen_model, s, split = load_generator(generator_path)
    gen_model = gen_model.to(dev)
    held = held_out_task(split)
    train, val, prompts = split_pairs(data, split)
    layout, mask = data["layout"], data["mask"]
    mean, std = data["stats"][split]
    emb = prompt_embeddings(data["prompts"], s.encoder, s.encoder_max_length)
    ck = data["checkpoints"].set_index("ckpt_id")
    out_dir = Path(out_dir)
    evals, recon, by_matrix = [], [], []
    for ckpt_id in sorted({c for c, _, _ in val}):
        c = ck.loc[ckpt_id]
        run_dir = Path(c.path).parent.parent
        key = RunKey.parse(run_dir)
        task = get_task(key.task)
        recipe = recipes[key.task] if isinstance(recipes[key.task], Recipe) else Recipe.from_dict(recipes[key.task])
        m = pd.read_parquet(run_dir / RUN_FILES["metrics"]).iloc[0]
        total, epochs = int(m["steps"]), max(int(m["epochs"]), 1)
        torch.manual_seed(key.seed)
        model, method, _ = build_model(model_spec, task, key, recipe, max(total // epochs, 1), total, dev,
                                       None, budget_denominator, model_cache)
        trained = load_lora_state(run_dir / RUN_FILES["adapter"])
        load_adapter(model, trained, str(run_dir / RUN_FILES["adapter"]))
        model = model.to(dev)
        devs = {sp: TokenizedSplit(Path(dev_dir) / key.task / f"{sp}.parquet", recipe.max_eval_samples)
                for sp in task.eval_splits}
        target = data["tokens"][ckpt_id]                                                   # (T, D)
        same = train[train.task == key.task].ckpt_id.to_numpy()
        pool = same if len(same) else train.ckpt_id.to_numpy()
        mean_tokens = data["tokens"][torch.tensor(pool.tolist())].mean(0)                       # (T, D)
        pids = [p for cc, _, p in val if cc == ckpt_id]
        with torch.no_grad():
            x = torch.stack([emb[(key.task, p)] for p in pids]).to(dev)                   # (P, S, E)
            gen_tokens = denormalise(gen_model(x).cpu(), mask, mean, std)                # (P, T, D)
        base = {"split": split, "zero_shot": held is not None, "task": key.task, "seed": key.seed}

        def score(variant: str, lora: dict, prompt_id) -> None:
            load_adapter(model, {k: v.to(dev) for k, v in lora.items()}, f"{variant} adapter")
            metrics, _ = evaluate(model, method, task, devs, dev, runtime.eval_batch_size, dev.type == "cuda")
            evals.append({**base, "variant": variant, "prompt_id": prompt_id, "metric": task.main_metric,
                          "dev_main": metrics[task.main_metric], **{f"dev_{k}": v for k, v in metrics.items()}})
            log.info("%s %s s%d %s%s: dev %s %.4f", split, key.task, key.seed, variant,
                     "" if prompt_id is None else f" prompt {prompt_id}", task.main_metric, metrics[task.main_metric])

        lora_keys = [e.key for e in layout.entries]
        score("trained", {k: trained[k] for k in lora_keys}, None)
        for p, toks in zip(pids, gen_tokens):
            lora = layout.detokenize(toks)
            score("generated", lora, p)
            model.save_pretrained(str(out_dir / EVAL_FILES["adapters"] / key.task / f"s{key.seed}" / f"p{p}"))
            recon.append({**base, "variant": "generated", "prompt_id": p,
                          **param_errors(toks[None], target[None], mask)})
            by_matrix.extend(matrix_errors(layout, lora, trained, base, p))
        score("checkpoint_mean", layout.detokenize(mean_tokens), None)
        recon.append({**base, "variant": "checkpoint_mean", "prompt_id": None,
                      **param_errors(mean_tokens[None], target[None], mask)})
        score("head_only", {e.key: torch.zeros(e.shape) if e.factor == "B" else trained[e.key]
                            for e in layout.entries}, None)
    ev = pd.DataFrame(evals)
    ev["prompt_id"] = ev["prompt_id"].astype("Int64")
    rc = pd.DataFrame(recon, columns=RECON_COLUMNS)
    rc["prompt_id"] = rc["prompt_id"].astype("Int64")
    bm = pd.DataFrame(by_matrix)
    bm = bm.groupby(["split", "zero_shot", "task", "layer", "kind", "factor"], as_index=False)[["rel_error", "rmse"]].mean()
    write_table(ev, out_dir / EVAL_FILES["evaluation"])
    write_table(rc, out_dir / EVAL_FILES["reconstruction"])
    write_table(bm, out_dir / EVAL_FILES["errors_by_matrix"])
    return ev


def matrix_errors(layout, lora: dict, trained: dict, base: dict, prompt_id: int) -> list[dict]:
    """Relative error ``‖X̂ − X‖_F / ‖X‖_F`` and RMSE of every LoRA factor of a generated adapter
    against the trained one (one row per layout entry)."""
    rows = []
    for e in layout.entries:
        d = lora[e.key].float() - trained[e.key].float()
        rows.append({**base, "prompt_id": prompt_id, "layer": e.layer, "kind": e.kind, "factor": e.factor,
                     "rel_error": float(d.norm() / trained[e.key].float().norm().clamp_min(1e-12)),
                     "rmse": float(d.pow(2).mean().sqrt())})
    return rows


def recon_summary(rc: pd.DataFrame) -> pd.DataFrame:
    """Mean reconstruction errors per (split, task, variant)."""
    return rc.groupby(["split", "zero_shot", "task", "variant"], as_index=False)[["mae", "rmse", "rel_error"]].agg(np.mean)
