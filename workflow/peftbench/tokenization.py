"""Tokenised-dataset cache: one Parquet per (model, task, split).

Columns: ``input_ids`` (list<int32>), ``attention_mask`` (list<int8>), ``token_type_ids``
(list<int8>, where the tokenizer makes them), ``label`` (int64; float32 for STS-B), ``idx``
(int64). The schema metadata records the tokenizer, ``max_length`` and ``pad_token_id`` so a
later stage can check it reads what it expects. Sequences are truncated to ``max_length`` and not
padded (the training loop pads per batch).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from .data import load_split
from .io import write_table
from .models import load_tokenizer, resolve_model
from .vocab import get_task

log = logging.getLogger(__name__)


def encode_table(tok, df, text_columns, max_length: int, labels: pa.Array, batch_size: int = 4096):
    """Tokenise the text columns of ``df`` (one column, or a pair) with ``tok``, truncated to
    ``max_length`` tokens, not padded.

    Returns:
        ``(table, lengths)``: a table with ``input_ids`` (list<int32>), ``attention_mask``
        (list<int8>), ``token_type_ids`` (list<int8>, where the tokenizer makes them) and
        ``label`` (``labels``); ``lengths`` ``(n,)`` int64 tokens per example.
    """
    texts = [df[c].astype(str).tolist() for c in text_columns]
    ids, masks, types = [], [], []
    for start in range(0, len(df), batch_size):
        chunk = [t[start:start + batch_size] for t in texts]
        enc = tok(*chunk, truncation=True, max_length=max_length, padding=False)
        ids.extend(enc["input_ids"])
        masks.extend(enc["attention_mask"])
        if "token_type_ids" in enc:
            types.extend(enc["token_type_ids"])
        log.info("tokenised %d/%d examples", min(start + batch_size, len(df)), len(df))
    cols = {
        "input_ids": pa.array(ids, type=pa.list_(pa.int32())),
        "attention_mask": pa.array(masks, type=pa.list_(pa.int8())),
    }
    if types:
        cols["token_type_ids"] = pa.array(types, type=pa.list_(pa.int8()))
    cols["label"] = labels
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    return pa.table(cols), lengths


def tokenize_split(model_spec: str, task_name: str, split: str, out: str | Path, max_length: int,
                   glue_dir: str | None = None, batch_size: int = 4096) -> dict:
    """Tokenise one GLUE split with the model's fast tokenizer and write it to ``out``.

    Args:
        model_spec: model spec (hub id, directory or ``package:NAME``).
        task_name: GLUE task.
        split: split name.
        out: Parquet path to write.
        max_length: truncation length in tokens.
        glue_dir: local GLUE mirror, or ``None`` for the hub.
        batch_size: examples per tokenizer call.

    Returns:
        ``{"rows", "seconds", "examples_per_s", "mean_length", "truncated"}``.

    Raises:
        DataError: missing data (see :func:`peftbench.data.load_split`).
    """
    task = get_task(task_name)
    df = load_split(task, split, glue_dir)
    tok = load_tokenizer(model_spec)
    t0 = time.perf_counter()
    label_type = pa.float32() if task.is_regression else pa.int64()
    table, lengths = encode_table(tok, df, task.text_columns, max_length,
                                  pa.array(df["label"].to_numpy(), type=label_type), batch_size)
    table = table.append_column("idx", pa.array(df["idx"].to_numpy().astype(np.int64)))
    seconds = time.perf_counter() - t0
    meta = {"model": model_spec, "tokenizer": resolve_model(model_spec), "task": task_name, "split": split,
            "max_length": max_length, "pad_token_id": int(tok.pad_token_id or 0)}
    write_table(table, out, metadata=meta)
    stats = {"rows": len(df), "seconds": seconds, "examples_per_s": len(df) / max(seconds, 1e-9),
             "mean_length": float(lengths.mean()) if len(lengths) else 0.0,
             "truncated": int((lengths >= max_length).sum())}
    log.info("%s/%s: %d rows in %.2f s (%.0f examples/s), mean length %.1f tokens, %d truncated",
             task_name, split, stats["rows"], seconds, stats["examples_per_s"], stats["mean_length"], stats["truncated"])
    return stats
