"""The side-by-side benchmark command (behaviour: the table, not the speed)."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from peftbench.bench import budget_for_rank, format_table
from peftbench.budget import uniform_rank
from peftbench.cli import main


def test_budget_for_rank_inverts_uniform_rank(tiny_model_dir):
    from peftbench.models import backbone_param_count, find_targets, load_classifier
    from peftbench.vocab import get_task

    model = load_classifier(str(tiny_model_dir), get_task("sst2"))
    n, targets = backbone_param_count(model), find_targets(model)
    for r in (1, 4, 8, 32):
        assert uniform_rank(budget_for_rank(r, n, targets), n, targets) == r
    with pytest.raises(ValueError, match="rank must be in"):
        budget_for_rank(33, n, targets)


def test_bench_prints_both_systems_side_by_side(tiny_model_dir, glue_dir, tmp_path, capsys):
    out = tmp_path / "bench.parquet"
    main(["bench", "--model", str(tiny_model_dir), "--task", "sst2", "--glue-dir", str(glue_dir),
          "--methods", "lora,adalora,glora", "--rank", "4", "--batch-size", "16", "--max-length", "32",
          "--max-train-samples", "64", "--max-eval-samples", "64", "--work-dir", str(tmp_path / "work"),
          "--out", str(out)])
    df = pd.read_parquet(out)
    assert list(zip(df.system, df.method)) == [("hf_trainer", "lora"), ("peftbench", "lora"),
                                                ("hf_trainer", "adalora"), ("peftbench", "adalora"),
                                                ("peftbench", "glora")]  # no Trainer baseline for glora
    assert (df.samples_per_s > 0).all() and (df.train_s > 0).all() and (df.peak_mem_mib > 0).all()
    assert df.dev.between(0, 1).all() and set(df.metric) == {"accuracy"}
    hf_lora = df[(df.system == "hf_trainer") & (df.method == "lora")].iloc[0]
    ours_lora = df[(df.system == "peftbench") & (df.method == "lora")].iloc[0]
    assert hf_lora.speedup == 1.0
    assert ours_lora.speedup == pytest.approx(ours_lora.samples_per_s / hf_lora.samples_per_s)
    assert math.isnan(df[df.method == "glora"].speedup.iloc[0])
    assert ours_lora.vs_lora_time == 1.0
    assert (df.train_examples == 64).all() and (df["rank"] == 4).all()
    assert ours_lora.compile_note.startswith("eager (fallback")  # CUDA graphs on a CPU: eager
    text = capsys.readouterr().out
    assert "| system | method | samples/s |" in text and "hf_trainer" in text and "vs HF Trainer" in text
    assert format_table(df) in text
