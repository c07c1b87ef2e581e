"""Training the prompt-to-LoRA generator on one split (rule ``train_generator``).

:func:`train_generator` tells the story: load the dataset (:mod:`.dataset`) and the split's
checkpoints, embed every prompt sentence once with the frozen encoder
(:func:`~peftbench.generator.model.embed_sentences`), build :class:`~.model.PromptToLoRA`, AdamW
with a cosine schedule (``torch.optim.lr_scheduler.CosineAnnealingLR`` to 0 over all steps), resume
from a checkpoint when one of this configuration exists, run the epochs and write the outputs.

One epoch visits every training checkpoint of the split once, in a random order, each paired with
a training prompt of its task drawn at random (both from the generator's seeded RNG); ``batch_size``
pairs per optimizer step. The loss is on the normalised tokens (per-token statistics of the split,
:func:`~.params.normalise`) over the real entries only (the mask):

``loss = mse_weight · MSE + l1_weight · L1`` (the seed's ``1.0 · MSE + 0.1 · L1``).

After every epoch the validation pairs (each validation checkpoint × each held-out prompt of its
task) are scored: the same MSE, L1 and total, and in parameter space (denormalised tokens,
real entries) MAE, RMSE and the relative error ``‖Ŵ − W‖_F / ‖W‖_F`` (:func:`param_errors`).

Outputs (``out_dir``): ``generator.safetensors`` (decoder weights; metadata: settings, split,
embedding size), ``curve.parquet`` (:data:`CURVE_COLUMNS`, one row per epoch and role: ``train`` —
the running mean over the epoch's steps — and ``validation``), ``manifest.parquet`` (the checkpoints
and prompts the split trained and validated on: ``role``, ``ckpt_id``, ``task``, ``seed``, ``step``,
``path``, ``prompt_ids``). Checkpoints (``generator.pt`` in ``checkpoint_dir``, every
``checkpoint_every`` epochs) hold the decoder, optimizer, scheduler, RNG and curve; a rerun after a
kill continues from the last one.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..io import atomic_path, save_tensors, write_table
from ..vocab import GENERATOR_SPLIT_FILES
from .dataset import load_dataset
from .model import PromptToLoRA, embed_sentences
from .params import denormalise, normalise
from .settings import GeneratorSettings

log = logging.getLogger(__name__)

#: Columns of a generator's ``curve.parquet``.
CURVE_COLUMNS = ["split", "epoch", "step", "role", "mse", "l1", "total", "mae", "rmse", "rel_error", "lr"]
#: Files of a trained generator's directory (:data:`peftbench.vocab.GENERATOR_SPLIT_FILES`).
GENERATOR_FILES = GENERATOR_SPLIT_FILES


def masked_losses(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(MSE, L1)`` over the real entries: means of ``(p − t)²`` and ``|p − t|`` where ``mask``.

    pred, target: ``(B, T, D)``; mask: ``(T, D)`` bool."""
    m = mask.to(pred.dtype).expand_as(pred)
    n = m.sum().clamp_min(1)
    d = (pred - target) * m
    return (d ** 2).sum() / n, d.abs().sum() / n


def param_errors(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Errors in parameter space over the real entries of ``(B, T, D)`` tokens: ``mae``, ``rmse``
    and ``rel_error = ‖pred − target‖_F / ‖target‖_F`` (all pairs together)."""
    m = mask.to(pred.dtype).expand_as(pred)
    d = (pred - target) * m
    n = m.sum().clamp_min(1)
    return {"mae": float(d.abs().sum() / n), "rmse": float(((d ** 2).sum() / n).sqrt()),
            "rel_error": float(d.norm() / (target * m).norm().clamp_min(1e-12))}


def prompt_embeddings(prompts: pd.DataFrame, encoder_spec: str, max_length: int) -> dict[tuple[str, int], torch.Tensor]:
    """``{(task, prompt_id): (S, E)}``: the frozen encoder's sentence embeddings of every prompt."""
    from ..models import load_encoder

    enc, tok = load_encoder(encoder_spec)
    texts = [t for ts in prompts.texts for t in ts]
    emb = embed_sentences(enc, tok, texts, max_length=max_length)
    out, i = {}, 0
    for _, p in prompts.iterrows():
        out[(p.task, int(p.prompt_id))] = emb[i:i + len(p.texts)]
        i += len(p.texts)
    return out


def build_generator(s: GeneratorSettings, embed_dim: int) -> PromptToLoRA:
    """The decoder of settings ``s`` for an encoder of embedding size ``embed_dim``."""
    return PromptToLoRA(embed_dim, s.samples_per_prompt, s.latent, s.blocks, s.token_width)


def split_pairs(data: dict, split: str):
    """``(train_ckpts, val_pairs, prompts_by_role)`` of a split: training checkpoint rows, the
    validation ``(ckpt_id, task, prompt_id)`` pairs, and ``{(role, task): [prompt_id, …]}``.

    Raises:
        ValueError: the split has no training checkpoints or no validation pairs (names it), or a
            task without training prompts.
    """
    sp = data["splits"][data["splits"].split == split]
    if sp.empty:
        raise ValueError(f"generator split {split!r} is not in the dataset (splits: {sorted(data['splits'].split.unique())})")
    prompts = {(r, t): sorted(g.prompt_id.tolist()) for (r, t), g in data["prompts"].groupby(["role", "task"])}
    train = sp[sp.role == "train"].reset_index(drop=True)
    val = [(int(c.ckpt_id), c.task, p) for _, c in sp[sp.role == "validation"].iterrows()
           for p in prompts.get(("validation", c.task), [])]
    for t in train.task.unique():
        if not prompts.get(("train", t)):
            raise ValueError(f"generator split {split!r}: task {t} has no training prompts (an empty prompt set)")
    if train.empty or not val:
        raise ValueError(f"generator split {split!r}: {len(train)} training checkpoints, {len(val)} validation pairs; "
                         f"both must be non-empty")
    return train, val, prompts


def train_generator(*, data_dir: str | Path, split: str, settings: GeneratorSettings, out_dir: str | Path,
                    checkpoint_dir: str | Path | None = None, device: str | None = None) -> dict:
    """Train the generator on ``split`` of the dataset in ``data_dir``; write :data:`GENERATOR_FILES`.

    Returns:
        The last validation row of the curve (``mse``, ``l1``, ``total``, ``mae``, ``rmse``, ``rel_error``).

    Raises:
        FileNotFoundError: a dataset file is missing. ValueError: an unknown or empty split.
    """
    s = settings
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(s.seed)
    data = load_dataset(data_dir)
    train, val, prompts = split_pairs(data, split)
    mean, std = data["stats"][split]
    mask = data["mask"].to(dev)
    tokens = data["tokens"]                                                      # (N, T, D)
    target = normalise(tokens, data["mask"], mean, std)                          # (N, T, D), normalised
    emb = prompt_embeddings(data["prompts"], s.encoder, s.encoder_max_length)    # {(task, id): (S, E)}
    embed_dim = next(iter(emb.values())).shape[-1]

    model = build_generator(s, embed_dim).to(dev)
    if model.tokens != tokens.shape[1]:
        raise ValueError(f"the generator makes {model.tokens} tokens, the dataset has {tokens.shape[1]} "
                         f"(generator.max_tokens changed after tokenize_params?)")
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    steps_per_epoch = math.ceil(len(train) / s.batch_size)
    total = steps_per_epoch * s.epochs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1))
    gen = torch.Generator().manual_seed(s.seed)
    curve: list[dict] = []
    start = 0
    ckpt_path = Path(checkpoint_dir) / "generator.pt" if checkpoint_dir else None
    fp = f"{s.to_json()}|{split}"
    if ckpt_path is not None and ckpt_path.is_file():
        c = torch.load(ckpt_path, weights_only=False)
        if c.get("fingerprint") == fp:
            model.load_state_dict(c["model"])
            opt.load_state_dict(c["optimizer"])
            sched.load_state_dict(c["scheduler"])
            gen.set_state(c["gen"])
            torch.set_rng_state(c["torch_rng"])
            curve, start = c["curve"], c["epoch"]
            log.info("resumed the generator of split %s from %s at epoch %d", split, ckpt_path, start)

    val_x = torch.stack([emb[(t, p)] for _, t, p in val]).to(dev)               # (V, S, E)
    val_ids = torch.as_tensor([c for c, _, _ in val])
    log.info("generator %s/%s: %d training checkpoints, %d validation pairs, %d steps (%d per epoch), "
             "%d parameters, device %s", s.name, split, len(train), len(val), total, steps_per_epoch,
             sum(p.numel() for p in model.parameters()), dev)
    t0 = time.perf_counter()
    for epoch in range(start, s.epochs):
        model.train()
        perm = torch.randperm(len(train), generator=gen)
        sums = np.zeros(3)
        for b in range(steps_per_epoch):
            rows = train.iloc[perm[b * s.batch_size:(b + 1) * s.batch_size].numpy()]
            pids = [prompts[("train", t)][int(torch.randint(len(prompts[("train", t)]), (1,), generator=gen))]
                    for t in rows.task]
            x = torch.stack([emb[(t, p)] for t, p in zip(rows.task, pids)]).to(dev)   # (B, S, E)
            y = target[torch.tensor(rows.ckpt_id.tolist())].to(dev)             # (B, T, D)
            mse, l1 = masked_losses(model(x), y, mask)
            loss = s.mse_weight * mse + s.l1_weight * l1
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            sums += [float(mse.detach()), float(l1.detach()), float(loss.detach())]
        step = (epoch + 1) * steps_per_epoch
        lr = sched.get_last_lr()[0]
        curve.append({"split": split, "epoch": epoch + 1, "step": step, "role": "train",
                      **dict(zip(("mse", "l1", "total"), sums / steps_per_epoch)),
                      "mae": float("nan"), "rmse": float("nan"), "rel_error": float("nan"), "lr": lr})
        vrow = validate(model, val_x, target[val_ids].to(dev), tokens[val_ids].to(dev), mask, mean.to(dev),
                        std.to(dev), s)
        curve.append({"split": split, "epoch": epoch + 1, "step": step, "role": "validation", **vrow, "lr": lr})
        done = epoch + 1 - start
        eta = (time.perf_counter() - t0) / done * (s.epochs - epoch - 1)
        log.info("generator %s | epoch %d/%d | step %d/%d | train loss %.4f | val loss %.4f | val rel. error %.4f | "
                 "ETA %.0f s", split, epoch + 1, s.epochs, step, total, sums[2] / steps_per_epoch, vrow["total"],
                 vrow["rel_error"], eta)
        if ckpt_path is not None and s.checkpoint_every and (epoch + 1) % s.checkpoint_every == 0 \
                and epoch + 1 < s.epochs:
            with atomic_path(ckpt_path) as tmp:
                torch.save({"fingerprint": fp, "model": model.state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "gen": gen.get_state(),
                            "torch_rng": torch.get_rng_state(), "curve": curve, "epoch": epoch + 1}, tmp)

    out_dir = Path(out_dir)
    save_tensors({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                 out_dir / GENERATOR_FILES["weights"],
                 metadata={"settings": s.to_json(), "split": split, "embed_dim": str(embed_dim)})
    write_table(pd.DataFrame(curve, columns=CURVE_COLUMNS), out_dir / GENERATOR_FILES["curve"])
    write_table(manifest(data, train, val, prompts, split), out_dir / GENERATOR_FILES["manifest"])
    if ckpt_path is not None and ckpt_path.is_file():
        ckpt_path.unlink()
    return curve[-1]


@torch.no_grad()
def validate(model, x, y_norm, y_raw, mask, mean, std, s: GeneratorSettings) -> dict[str, float]:
    """Validation losses (normalised) and parameter-space errors (:func:`param_errors`) of ``x``
    ``(V, S, E)`` against targets ``y_norm`` / ``y_raw`` ``(V, T, D)``."""
    model.eval()
    pred = model(x)
    mse, l1 = masked_losses(pred, y_norm, mask)
    return {"mse": float(mse), "l1": float(l1), "total": float(s.mse_weight * mse + s.l1_weight * l1),
            **param_errors(denormalise(pred, mask, mean, std), y_raw, mask)}


def manifest(data: dict, train: pd.DataFrame, val: list, prompts: dict, split: str) -> pd.DataFrame:
    """One row per checkpoint the split used: ``role`` (train/validation), ``ckpt_id``, ``task``,
    ``seed``, ``step``, ``path``, ``prompt_ids`` (the prompts it was paired with)."""
    ck = data["checkpoints"].set_index("ckpt_id")
    rows = [{"split": split, "role": "train", "ckpt_id": int(c), "task": ck.loc[c, "task"], "seed": int(ck.loc[c, "seed"]),
             "step": int(ck.loc[c, "step"]), "path": ck.loc[c, "path"], "prompt_ids": prompts[("train", ck.loc[c, "task"])]}
            for c in train.ckpt_id]
    for c in sorted({c for c, _, _ in val}):
        rows.append({"split": split, "role": "validation", "ckpt_id": int(c), "task": ck.loc[c, "task"],
                     "seed": int(ck.loc[c, "seed"]), "step": int(ck.loc[c, "step"]), "path": ck.loc[c, "path"],
                     "prompt_ids": [p for cc, _, p in val if cc == c]})
    return pd.DataFrame(rows)


def load_generator(path: str | Path) -> tuple[PromptToLoRA, GeneratorSettings, str]:
    """A trained generator: ``(model in eval mode, settings, split)``.

    Raises:
        FileNotFoundError: no such file (names the rule that writes it).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run rule train_generator first")
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
        state = {k: fh.get_tensor(k) for k in fh.keys()}
    s = GeneratorSettings.from_json(meta["settings"])
    model = build_generator(s, int(meta["embed_dim"]))
    model.load_state_dict(state)
    return model.eval(), s, meta["split"]
