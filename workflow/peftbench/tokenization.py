"""Tokenised-dataset cache: one Parquet per (model, task, split).

Columns: ``input_ids`` (list<int32>), ``attention_mask`` (list<int8>), ``token_type_ids``
(list<int8>, where the tokenizer makes them), ``label`` (int64; float32 for STS-B), ``idx``
(int64). The schema metadata records the tokenizer, ``max_length`` and ``pad_token_id`` so a
later stage can check it reads what it expects. Sequences are truncated to ``max_length`` and not
padded (the training loop pads per batch).

Causal-LM tasks (:func:`encode_causal`): ``input_ids`` is the prompt's tokens followed by the
target's and the end-of-sequence token; ``prompt_length`` (int32) says where the target starts
(the loss is computed on the tokens from there on only, :class:`peftbench.batches.TokenizedSplit`),
``references`` (list<string>) holds what a generation is scored against, ``label`` the class id of
a verbaliser task (-1 otherwise); the metadata adds ``eos_token_id`` and ``track: causal``.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from .data import load_causal_split, load_split
from .io import write_table
from .models import eos_token_id, load_tokenizer, resolve_model
from .vocab import TaskSpec, get_task

log = logging.getLogger(__name__)


def _texts(df, column: str) -> list[str]:
    """Column ``column`` of a DataFrame or an Arrow table as a list of Python strings."""
    if isinstance(df, pa.Table):
        return df.column(column).cast(pa.string()).to_pylist()
    return df[column].astype(str).tolist()


def encode_table(tok, df, text_columns, max_length: int, labels: pa.Array, batch_size: int = 32768):
    """Tokenise the text columns of ``df`` (one column, or a pair) with ``tok``, truncated to
    ``max_length`` tokens, not padded.

    A fast tokenizer is driven through its Rust backend (``tokenizers.Tokenizer.encode_batch_fast``,
    which splits each batch over the CPU cores): the same truncation (``longest_first`` for pairs)
    and special tokens as ``tok(..., truncation=True, max_length=max_length)``, without building
    the per-token Python lists of a ``BatchEncoding``. The Arrow list columns are assembled from
    one flat id array and the example offsets (``attention_mask`` is all ones before padding, so
    it is written from the offsets alone; so are single-sentence ``token_type_ids`` when the
    tokenizer's template gives the first example only segment 0: the template is the same for every
    example, so they are all zeros). A slow (Python) tokenizer takes the ``tok(...)`` path.

    Args:
        tok: a Hugging Face tokenizer.
        df: a DataFrame or an Arrow table holding ``text_columns``.
        text_columns: one column name, or two for sentence pairs.
        max_length: truncation length in tokens (special tokens included).
        labels: the ``label`` column to attach.
        batch_size: examples per backend call.

    Returns:
        ``(table, lengths)``: a table with ``input_ids`` (list<int32>), ``attention_mask``
        (list<int8>), ``token_type_ids`` (list<int8>, where the tokenizer makes them) and
        ``label`` (``labels``); ``lengths`` ``(n,)`` int64 tokens per example.
    """
    texts = [_texts(df, c) for c in text_columns]
    n = len(texts[0])
    wants_types = "token_type_ids" in tok.model_input_names
    ids: list[list[int]] = []
    types: list[list[int]] = []
    zero_types = False  # single sentences whose template has segment 0 only: written from the offsets
    backend = getattr(tok, "backend_tokenizer", None) if getattr(tok, "is_fast", False) else None
    if backend is not None:
        from tokenizers import Tokenizer

        engine = Tokenizer.from_str(backend.to_str())  # a copy: the caller's tokenizer keeps its settings
        engine.no_padding()
        engine.enable_truncation(max_length, strategy="longest_first")
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets nobody here reads
        encode = getattr(engine, "encode_batch_fast", engine.encode_batch)
        for start in range(0, n, batch_size):
            chunk = texts[0][start:start + batch_size] if len(texts) == 1 else \
                list(zip(texts[0][start:start + batch_size], texts[1][start:start + batch_size]))
            encs = encode(chunk, add_special_tokens=True)
            ids.extend(e.ids for e in encs)
            if wants_types and start == 0 and len(texts) == 1 and encs and not any(encs[0].type_ids):
                zero_types = True
            if wants_types and not zero_types:
                types.extend(e.type_ids for e in encs)
    else:
        for start in range(0, n, batch_size):
            enc = tok(*[t[start:start + batch_size] for t in texts], truncation=True, max_length=max_length,
                      padding=False)
            ids.extend(enc["input_ids"])
            if "token_type_ids" in enc:
                types.extend(enc["token_type_ids"])
    input_ids = pa.array(ids, type=pa.list_(pa.int32()))
    offsets = input_ids.offsets
    lengths = np.diff(offsets.to_numpy()).astype(np.int64)
    cols = {
        "input_ids": input_ids,
        "attention_mask": pa.ListArray.from_arrays(offsets, pa.array(np.ones(int(lengths.sum()), np.int8))),
    }
    if zero_types:
        cols["token_type_ids"] = pa.ListArray.from_arrays(offsets, pa.array(np.zeros(int(lengths.sum()), np.int8)))
    elif types:
        cols["token_type_ids"] = pa.array(types, type=pa.list_(pa.int8()))
    cols["label"] = labels
    log.info("tokenised %d examples", n)
    return pa.table(cols), lengths


def encode_causal(tok, frame, task: TaskSpec, max_length: int):
    """Tokenise prompt/target rows (:func:`peftbench.data.causal_frame`) for a decoder.

    Each example is ``prompt_ids + target_ids + [eos]``: the prompt with the tokenizer's special
    tokens (a LLaMA ``<s>``), the target as ``" " + target`` without them, cut to
    ``task.max_target_tokens`` tokens (eos included). When the example is longer than ``max_length``
    the prompt loses tokens from its **left** (the instruction and answer cue at its end stay), and
    the target is cut only if even one prompt token would not fit.

    Returns:
        ``(table, lengths)``: ``input_ids`` (list<int32>), ``attention_mask`` (list<int8>),
        ``prompt_length`` (int32), ``label`` (int64), ``references`` (list<string>); ``lengths``
        ``(n,)`` int64 tokens per example.

    Raises:
        ValueError: ``max_length < 2`` (no room for a prompt token and a target token).
    """
    if max_length < 2:
        raise ValueError(f"max_length {max_length}: a causal example needs at least one prompt and one target token")
    eos = eos_token_id(tok)
    prompts = tok(frame["prompt"].tolist(), add_special_tokens=True)["input_ids"]
    targets = tok([" " + t for t in frame["target"].tolist()], add_special_tokens=False)["input_ids"]
    ids, plen = [], []
    for p, t in zip(prompts, targets):
        t = list(t)[:max(task.max_target_tokens - 1, 1)] + [eos]
        t = t[:max_length - 1]
        p = list(p)[-(max_length - len(t)):]
        ids.append(p + t)
        plen.append(len(p))
    table = pa.table({
        "input_ids": pa.array(ids, type=pa.list_(pa.int32())),
        "attention_mask": pa.array([[1] * len(x) for x in ids], type=pa.list_(pa.int8())),
        "prompt_length": pa.array(plen, type=pa.int32()),
        "label": pa.array(frame["label"].to_numpy().astype(np.int64)),
        "references": pa.array([list(map(str, r)) for r in frame["references"]], type=pa.list_(pa.string())),
    })
    return table, np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))


def tokenize_split(model_spec: str, task_name: str, split: str, out: str | Path, max_length: int,
                   glue_dir: str | None = None, batch_size: int = 32768, model_cache: str | Path | None = None) -> dict:
    """Tokenise one GLUE split with the model's fast tokenizer and write it to ``out``.

    Args:
        model_spec: model spec (hub id, directory or ``package:NAME``).
        task_name: GLUE task.
        split: split name.
        out: Parquet path to write.
        max_length: truncation length in tokens.
        glue_dir: local GLUE mirror, or ``None`` for the hub.
        batch_size: examples per tokenizer call.
        model_cache: the spec's model cache folder (:mod:`peftbench.modelcache`): the tokenizer
            is read from it (the same tokens); the metadata still names the spec.

    Returns:
        ``{"rows", "read_s", "seconds", "cpu_s", "examples_per_s", "examples_per_cpu_s", "mean_length",
        "truncated"}``: ``read_s`` loading the split, ``seconds`` / ``cpu_s`` the wall-clock / process
        CPU seconds of tokenisation (on a machine shared with other jobs the wall-clock rate falls,
        the CPU-time rate does not), ``examples_per_s`` = rows / ``seconds``.

    Raises:
        DataError: missing data (see :func:`peftbench.data.load_split`).
    """
    task = get_task(task_name)
    t_read = time.perf_counter()
    df = load_causal_split(task, split, glue_dir) if task.is_causal else load_split(task, split, glue_dir)
    read_s = time.perf_counter() - t_read
    tok = load_tokenizer(model_spec, model_cache)
    t0, c0 = time.perf_counter(), time.process_time()
    if task.is_causal:
        table, lengths = encode_causal(tok, df, task, max_length)
    else:
        label_type = pa.float32() if task.is_regression else pa.int64()
        table, lengths = encode_table(tok, df, task.text_columns, max_length,
                                      pa.array(df["label"].to_numpy(), type=label_type), batch_size)
    table = table.append_column("idx", pa.array(df["idx"].to_numpy().astype(np.int64)))
    seconds, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    meta = {"model": model_spec, "tokenizer": resolve_model(model_spec), "task": task_name, "split": split,
            "max_length": max_length, "pad_token_id": int(tok.pad_token_id or 0), "track": task.track}
    if task.is_causal:
        meta["eos_token_id"] = eos_token_id(tok)
    write_table(table, out, metadata=meta)
    stats = {"rows": len(df), "read_s": read_s, "seconds": seconds, "cpu_s": cpu_s,
             "examples_per_s": len(df) / max(seconds, 1e-9), "examples_per_cpu_s": len(df) / max(cpu_s, 1e-9),
             "mean_length": float(lengths.mean()) if len(lengths) else 0.0,
             "truncated": int((lengths >= max_length).sum())}
    log.info("%s/%s: %d rows in %.2f s (%.0f examples/s; %.2f CPU s), mean length %.1f tokens, %d truncated",
             task_name, split, stats["rows"], seconds, stats["examples_per_s"], cpu_s, stats["mean_length"],
             stats["truncated"])
    return stats
