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
          "--methods", "lora,adalora,glora", "--precisions", "fp32,bf16", "--peak-seconds", "0.01", "--rank", "4", "--batch-size", "16", "--max-length", "32",
          "--max-train-samples", "64", "--max-eval-samples", "32", "--work-dir", str(tmp_path / "work"),
          "--no-compile", "--no-isolate", "--out", str(out)])
    df = pd.read_parquet(out)
    assert list(zip(df.system, df.method, df.precision)) == [
        (system, m, p) for m in ("lora", "adalora", "glora") for p in ("fp32", "bf16")
        for system in (("hf_trainer", "peftbench") if m != "glora" else ("peftbench",))]  # no Trainer for glora
    assert (df.precision == df.requested_precision).all()
    # the arithmetic limit: one matmul peak per precision, the achieved model FLOP/s as a fraction of it
    assert (df.peak_fp32_tflops > 0).all() and (df.peak_bf16_tflops > 0).all()
    assert df.peak_fp32_tflops.nunique() == 1
    assert (df.peak_tflops == df.peak_fp32_tflops.where(df.precision == "fp32", df.peak_bf16_tflops)).all()
    assert df.frac_of_peak.to_numpy() == pytest.approx((df.model_tflops / df.peak_tflops).to_numpy())
    assert df.model_tflops.to_numpy() == pytest.approx(
        (df.samples_per_s * df.model_flops_per_example / 1e12).to_numpy())
    full, df = df, df[df.precision == "fp32"].reset_index(drop=True)
    assert (df.samples_per_s > 0).all() and (df.train_s > 0).all() and (df.peak_mem_mib > 0).all()
    assert df.dev.between(0, 1).all() and set(df.metric) == {"accuracy"}
    hf_lora = df[(df.system == "hf_trainer") & (df.method == "lora")].iloc[0]
    ours_lora = df[(df.system == "peftbench") & (df.method == "lora")].iloc[0]
    assert hf_lora.speedup == 1.0
    assert ours_lora.speedup == pytest.approx(ours_lora.samples_per_s / hf_lora.samples_per_s)
    assert math.isnan(df[df.method == "glora"].speedup.iloc[0])
    assert ours_lora.vs_lora_time == 1.0
    ours = df[df.system == "peftbench"].set_index("method")
    assert ours.loc["glora", "vs_lora_time"] == pytest.approx(ours.loc["glora", "s_per_step"] / ours_lora.s_per_step)
    assert (df.steps == 4).all()  # 64 examples, batch 16, one epoch
    assert (df.train_examples == 64).all() and (df["rank"] == 4).all()
    assert ours_lora.compile_note == "eager"
    assert ours_lora.dropout_kernel == "fast" and hf_lora.dropout_kernel == "torch"  # eager on a CPU
    text = capsys.readouterr().out
    assert "| system | method | precision | samples/s |" in text and "matmul peak" in text and "hf_trainer" in text and "vs HF Trainer" in text
    assert format_table(full) in text


def test_bench_runs_the_svd_methods_on_factors_it_computes_once(tiny_model_dir, glue_dir, tmp_path):
    """--methods all includes the methods that read the SVD factors: the bench computes them once, as the DAG's svd stage."""
    out, work = tmp_path / "bench.parquet", tmp_path / "work"
    main(["bench", "--model", str(tiny_model_dir), "--task", "sst2", "--glue-dir", str(glue_dir),
          "--methods", "spectral_a,gsa", "--precisions", "fp32", "--peak-seconds", "0.01", "--rank", "2",
          "--batch-size", "16", "--max-length", "32", "--max-train-samples", "32", "--max-eval-samples", "16",
          "--no-baseline", "--no-compile", "--no-isolate", "--work-dir", str(work), "--out", str(out)])
    df = pd.read_parquet(out)
    assert list(df.method) == ["spectral_a", "gsa"] and (df.system == "peftbench").all()
    assert (df.steps == 2).all() and df.dev.between(0, 1).all()
    assert (work / "svd" / "factors.safetensors").is_file()


def test_bench_runs_every_seed_and_prints_the_mean_over_seeds(tiny_model_dir, glue_dir, tmp_path, capsys):
    out = tmp_path / "bench.parquet"
    main(["bench", "--model", str(tiny_model_dir), "--task", "sst2", "--glue-dir", str(glue_dir),
          "--methods", "lora", "--precisions", "fp32", "--peak-seconds", "0.01", "--rank", "2", "--seeds", "1,2",
          "--batch-size", "16", "--max-length", "32", "--max-train-samples", "32", "--max-eval-samples", "16",
          "--no-compile", "--no-isolate", "--dropout-kernel", "torch", "--work-dir", str(tmp_path / "work"),
          "--out", str(out)])
    df = pd.read_parquet(out)
    assert list(zip(df.seed, df.system)) == [(1, "hf_trainer"), (1, "peftbench"), (2, "hf_trainer"), (2, "peftbench")]
    assert set(df.dropout_kernel) == {"torch"}
    for seed, g in df.groupby("seed"):  # each seed's ratio is to its own Trainer run
        hf, ours = g.set_index("system").loc["hf_trainer"], g.set_index("system").loc["peftbench"]
        assert ours.speedup == pytest.approx(ours.samples_per_s / hf.samples_per_s)
    from peftbench.bench import seed_means

    means = seed_means(df).set_index("system")
    assert (means.seeds == 2).all()
    assert means.loc["peftbench", "dev"] == pytest.approx(df[df.system == "peftbench"].dev.mean())
    assert means.loc["peftbench", "vs_lora_time"] == 1.0 and means.loc["hf_trainer", "vs_lora_time"] == 1.0
    text = capsys.readouterr().out
    assert "| system | method | precision | seed |" in text and "mean over 2 seeds:" in text


def test_isolated_cases_run_in_fresh_processes_and_reproduce_the_in_process_ones(tiny_model_dir, glue_dir, tmp_path):
    """The default bench runs every case in its own process, alternates the method order between
    seeds, keeps the table in the given order, and trains exactly what the one-process bench trains."""
    import os

    common = ["bench", "--model", str(tiny_model_dir), "--task", "sst2", "--glue-dir", str(glue_dir),
              "--methods", "lora,full", "--precisions", "fp32", "--peak-seconds", "0.01", "--rank", "2",
              "--seeds", "1,2", "--batch-size", "16", "--max-length", "32", "--max-train-samples", "32",
              "--max-eval-samples", "16", "--no-compile"]
    main(common + ["--work-dir", str(tmp_path / "a"), "--out", str(tmp_path / "isolated.parquet")])
    main(common + ["--no-isolate", "--work-dir", str(tmp_path / "b"), "--out", str(tmp_path / "one.parquet")])
    iso, one = pd.read_parquet(tmp_path / "isolated.parquet"), pd.read_parquet(tmp_path / "one.parquet")
    cases = [(seed, m, system) for seed in (1, 2) for m in ("lora", "full") for system in ("hf_trainer", "peftbench")]
    for df in (iso, one):
        assert list(zip(df.seed, df.method, df.system)) == cases  # the table in the given order
        # seed 2 ran full before lora (its run_order), the Trainer before our loop within a method
        assert list(df.run_order) == [0, 1, 2, 3, 6, 7, 4, 5]
    assert iso.isolated.all() and not one.isolated.any()
    assert iso.pid.nunique() == len(iso) and os.getpid() not in set(iso.pid)  # a fresh process per case
    assert set(one.pid) == {os.getpid()}
    # the same training in either mode: each case's steps and dev metric, to the bit
    assert list(iso.steps) == list(one.steps) and (iso.steps == 2).all()
    assert iso.dev.tolist() == one.dev.tolist()
    assert (iso.peak_mem_mib > 0).all()
    # an error in a case's process reaches the bench as itself
    from peftbench.bench import run_isolated
    from peftbench.dropout import check_dropout_kernel

    with pytest.raises(ValueError, match="dropout_kernel must be one of"):
        run_isolated(check_dropout_kernel, kernel="bogus")


def test_model_flops_is_6nt_plus_attention(tiny_model_dir):
    """6·N·T + 12·L·d·T² per example, N without the embedding tables (2 layers, width 32)."""
    from peftbench.bench import model_flops
    from peftbench.models import embedding_param_count, load_classifier
    from peftbench.vocab import get_task

    model = load_classifier(str(tiny_model_dir), get_task("sst2"))
    n = sum(p.numel() for p in model.parameters()) - embedding_param_count(model)
    assert 0 < n < sum(p.numel() for p in model.parameters())
    assert model_flops(model, [3, 5]) == 6 * n * 8 + 12 * 2 * 32 * (9 + 25)


def test_matmul_peak_measures_each_dtype():
    import torch

    from peftbench.bench import matmul_peak

    peak = matmul_peak([(64, 32), (64, 32), (32, 64)], tokens=16, device=torch.device("cpu"), seconds=0.01)
    assert set(peak) == {"fp32", "bf16"} and all(v > 0 for v in peak.values())


def test_trainer_dev_metric_follows_its_grouped_prediction_order(tiny_model_dir, tiny_data, tmp_path):
    # transformers 5 length-groups (and shuffles) the Trainer's evaluation order too when
    # train_sampling_strategy="group_by_length": its predictions must be scored against the labels
    # it returns with them, not against the dev split in file order.
    import numpy as np
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from peftbench.batches import TokenizedSplit
    from peftbench.bench import _Examples, trainer_dev_metrics
    from peftbench.metrics import compute_metrics
    from peftbench.models import load_classifier, load_tokenizer
    from peftbench.vocab import get_task

    task = get_task("stsb")  # a regression: Pearson changes with any misalignment
    dev = TokenizedSplit(tiny_data["stsb"]["validation"], 96)
    model = load_classifier(str(tiny_model_dir), task)

    def trainer(strategy):
        args = TrainingArguments(output_dir=str(tmp_path / strategy), per_device_eval_batch_size=8, use_cpu=True,
                                 train_sampling_strategy=strategy, report_to="none", disable_tqdm=True,
                                 remove_unused_columns=False, seed=3)
        return Trainer(model=model, args=args, data_collator=DataCollatorWithPadding(load_tokenizer(str(tiny_model_dir))))

    in_order = trainer("random").predict(_Examples(dev))  # sequential evaluation sampler
    np.testing.assert_array_equal(in_order.label_ids, dev.labels.numpy())
    expected = compute_metrics(task, in_order.predictions, dev.labels.numpy(), "validation")
    grouped = trainer("group_by_length")
    shuffled = grouped.predict(_Examples(dev))
    assert not np.array_equal(shuffled.label_ids, dev.labels.numpy())  # the order really changed
    naive = compute_metrics(task, shuffled.predictions, dev.labels.numpy(), "validation")
    assert abs(naive["pearson"] - expected["pearson"]) > 1e-3
    got = trainer_dev_metrics(grouped, dev, task, "validation")
    assert got["pearson"] == pytest.approx(expected["pearson"], abs=1e-4)
    assert got["spearman"] == pytest.approx(expected["spearman"], abs=1e-4)
