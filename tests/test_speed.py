"""Speed work (issue 17), behaviour only: the fast tokenisation path gives the tokens of the
Hugging Face call, run rows carry their phase timings, the grid-overhead report adds up, the bench
measures a matmul peak and model FLOPs. Speeds themselves are printed by ``peftbench bench``."""
from __future__ import annotations

from pathlib import Path

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
    assert table.schema.field("token_type_ids").type == pa.list_(pa.int8())
    assert lengths.tolist() == [len(x) for x in ref["input_ids"]]
    assert (lengths == max_length).any() and lengths.max() == max_length
    # an Arrow table in, the same tokens out
    arrow, _ = encode_table(tok, pa.Table.from_pandas(df), columns, max_length, pa.array(np.zeros(len(df), np.int64)))
    assert arrow.column("input_ids").equals(table.column("input_ids"))


def _train_cli(tiny_model_dir, tiny_data, out, method, seed=1):
    from conftest import recipe_args
    from peftbench.cli import main

    rec = {"lr": 1e-3, "epochs": 1, "batch_size": 16, "max_train_samples": 48, "max_eval_samples": 32}
    main(["train", "--model-name", "tiny", "--model", str(tiny_model_dir), "--task", "sst2", "--method", method,
          "--budget", "2.0", "--seed", str(seed), "--train", str(tiny_data["sst2"]["train"]),
          "--dev", f"validation={tiny_data['sst2']['validation']}", *recipe_args(rec), "--out", str(out)])
    return pd.read_parquet(out / "metrics.parquet").iloc[0]


def test_run_rows_time_their_phases_and_grid_overhead_adds_them_up(tiny_model_dir, tiny_data, tmp_path, capsys):
    import os

    from peftbench.cli import main
    from peftbench.overhead import grid_overhead
    from peftbench.runkey import RunKey
    from peftbench.vocab import RUN_PHASES

    results = tmp_path / "results"
    keys = [RunKey.of("tiny", "sst2", "lora", "2.0", 1), RunKey.of("tiny", "sst2", "full", "2.0", 2)]
    rows = [_train_cli(tiny_model_dir, tiny_data, Path(k.run_dir(results / "runs")), k.method, k.seed) for k in keys]
    for row in rows:
        for p in RUN_PHASES:
            assert np.isfinite(row[p]) and row[p] >= 0, (p, row[p])
        # a CLI process: its import phase is the age of this (pytest) process, at least the imports
        assert row["import_s"] > 0.1 and row["load_model_s"] > 0 and row["load_data_s"] > 0 and row["write_s"] > 0
    # Snakemake benchmark files: two train jobs and one tokenize job at known times
    bench = results / "benchmarks"
    layout = [(f"train/{keys[0].rel_dir}", 40.0, 1000.0), (f"train/{keys[1].rel_dir}", 30.0, 1100.0),
              ("tokenize/tiny/sst2/train", 5.0, 900.0)]
    for rel, s, end in layout:
        f = bench / f"{rel}.tsv"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(f"s\th:m:s\tmax_rss\n{s}\t0:00:{int(s):02d}\t100.0\n")
        os.utime(f, (end, end))
    rep = grid_overhead(results)
    assert rep["wall_s"] == pytest.approx(1100.0 - (900.0 - 5.0))  # first start to last end
    assert rep["train_s"] == pytest.approx(sum(r["train_s"] for r in rows))
    assert rep["ratio"] == pytest.approx(rep["wall_s"] / rep["train_s"])
    assert rep["rules"] == {"tokenize": (1, 5.0), "train": (2, 70.0)}
    per = rep["per_job"].set_index("method")
    assert per.loc["lora", "job_s"] == 40.0 and per.loc["full", "job_s"] == 30.0
    assert per.loc["lora", "other_s"] == pytest.approx(40.0 - sum(rows[0][p] for p in RUN_PHASES))
    assert rep["other_s"] == pytest.approx(per["other_s"].sum())
    # a measured wall-clock wins; the CLI prints the ratio and writes the per-job table
    main(["grid-overhead", "--results", str(results), "--wall-s", "200", "--out", str(tmp_path / "jobs.parquet")])
    text = capsys.readouterr().out
    assert f"ratio {200 / rep['train_s']:.2f}" in text and "| load_model_s |" in text and "| tokenize | 1 |" in text
    assert len(pd.read_parquet(tmp_path / "jobs.parquet")) == 2


def test_grid_overhead_names_what_is_missing(tmp_path):
    from peftbench.overhead import grid_overhead

    with pytest.raises(FileNotFoundError, match="run the grid first"):
        grid_overhead(tmp_path)
    (tmp_path / "tables").mkdir()
    pd.DataFrame([{"model": "m", "task": "sst2", "method": "lora", "budget": "1", "seed": 1, "train_s": 1.0}]) \
        .to_parquet(tmp_path / "tables" / "runs.parquet")
    with pytest.raises(ValueError, match="before phase timings were recorded"):
        grid_overhead(tmp_path)
