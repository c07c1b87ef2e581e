"""Speed work (issue 17), behaviour only: the fast tokenisation path gives the tokens of the
Hugging Face call, run rows carry their phase timings, the grid-overhead report adds up, the bench
measures a matmul peak and model FLOPs. Speeds themselves are printed by ``peftbench bench``."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from conftest import MINILM


@pytest.mark.parametrize("task,columns,max_length", [("sst2", ("sentence",), 12),
                                                      ("stsb", ("sentence1", "sentence2"), 20)])
def test_encode_table_matches_the_tokenizer_call(glue_dir, task, columns, max_length):
    """Backend path == ``tok(..., truncation=True)``: ids, masks, type ids and lengths, pairs
    truncated longest-first (max_length is below many examples' length, so truncation happens)."""
    from peftbench.models import load_tokenizer
    from peftbench.tokenization import encode_table

    tok = load_tokenizer(MINILM)
    df = pd.read_parquet(glue_dir / task / "train.parquet").head(300)
    table, lengths = encode_table(tok, df, columns, max_length, pa.array(np.zeros(len(df), np.int64)),
                                  batch_size=128)
    ref = tok(*[df[c].astype(str).tolist() for c in columns], truncation=True, max_length=max_length)
    assert table.column("input_ids").to_pylist() == ref["input_ids"]
    assert table.column("attention_mask").to_pylist() == ref["attention_mask"]
    assert table.column("token_type_ids").to_pylist() == ref["token_type_ids"]
    assert table.schema.field("attention_mask").type == pa.list_(pa.int8())
    assert lengths.tolist() == [len(x) for x in ref["input_ids"]]
    assert (lengths == max_length).any() and lengths.max() == max_length
    # an Arrow table in, the same tokens out
    arrow, _ = encode_table(tok, pa.Table.from_pandas(df), columns, max_length, pa.array(np.zeros(len(df), np.int64)))
    assert arrow.column("input_ids").equals(table.column("input_ids"))
