"""Each stage's CLI on a tiny random BERT and real GLUE data (no Snakemake)."""
import json

import numpy as np
import pandas as pd
from conftest import recipe_args
import pytest
import torch
from safetensors.torch import load_file

from peftbench.cli import main
from peftbench.io import read_metadata
from peftbench.models import find_targets, load_classifier
from peftbench.vocab import get_task


def test_tokenize_cli_writes_list_columns(tiny_model_dir, glue_dir, tmp_path):
    out = tmp_path / "cola" / "validation.parquet"
    main(["tokenize", "--model", str(tiny_model_dir), "--task", "cola", "--split", "validation",
          "--max-length", "16", "--glue-dir", str(glue_dir), "--out", str(out)])
    df = pd.read_parquet(out)
    assert len(df) == 1043
    assert list(df.columns) == ["input_ids", "attention_mask", "token_type_ids", "label", "idx"]
    assert df["input_ids"].map(len).max() <= 16
    assert df["input_ids"].map(lambda x: x[0]).eq(101).all()  # [CLS]
    assert set(df["label"].unique()) == {0, 1}
    meta = read_metadata(out)
    assert meta["max_length"] == 16 and meta["pad_token_id"] == 0 and meta["split"] == "validation"


def test_tokenize_cli_missing_split_exits_with_message(tiny_model_dir, glue_dir, tmp_path, caplog):
    with pytest.raises(SystemExit) as exc:
        main(["tokenize", "--model", str(tiny_model_dir), "--task", "qnli", "--split", "train",
              "--max-length", "16", "--glue-dir", str(glue_dir), "--out", str(tmp_path / "x.parquet")])
    assert exc.value.code == 1
    assert "qnli/train.parquet" in caplog.text
    assert not (tmp_path / "x.parquet").exists()


def test_svd_cli_reconstructs_weights(tiny_model_dir, tmp_path):
    f, s = tmp_path / "factors.safetensors", tmp_path / "spectrum.parquet"
    main(["svd", "--model-name", "tiny", "--model", str(tiny_model_dir), "--top-k", "64",
          "--factors", str(f), "--spectrum", str(s)])
    factors = load_file(f)
    model = load_classifier(str(tiny_model_dir), get_task("sst2"))
    targets = find_targets(model)
    assert len(targets) == 12  # 2 layers x (q, k, v, attention output, intermediate, output)
    mods = dict(model.named_modules())
    for t in targets:
        u, sv, vh = factors[f"{t.name}.U"], factors[f"{t.name}.S"], factors[f"{t.name}.Vh"]
        k = min(t.d_in, t.d_out)
        assert u.shape == (t.d_out, k) and sv.shape == (k,) and vh.shape == (k, t.d_in)
        assert torch.allclose(u @ torch.diag(sv) @ vh, mods[t.name].weight, atol=1e-5)
        assert torch.all(sv[:-1] >= sv[1:])
    spec = pd.read_parquet(s)
    assert set(spec.columns) == {"model", "module", "layer", "kind", "index", "sigma", "energy"}
    last = spec.groupby("module")["energy"].max()
    assert np.allclose(last, 1.0)  # top-k covers the full rank of these small matrices
    assert set(spec["kind"]) == {"query", "key", "value", "attention_output", "intermediate", "output"}


def _train(tiny_model_dir, tiny_data, tmp_path, method, task="stsb", budget=2.0, seed=1, **recipe):
    rec = {"lr": 1e-3, "epochs": 2, "batch_size": 16, "max_train_samples": 96, "max_eval_samples": 64,
           "log_every": 2, **recipe}
    out = tmp_path / f"{method}-{task}-{seed}"
    main(["train", "--model-name", "tiny", "--model", str(tiny_model_dir), "--task", task, "--method", method,
          "--budget", str(budget), "--seed", str(seed), "--train", str(tiny_data[task]["train"]),
          "--dev", f"validation={tiny_data[task]['validation']}", *recipe_args(rec), "--out", str(out)])
    return out


@pytest.mark.parametrize("method", ["full", "lora", "adalora"])
def test_train_cli_outputs(tiny_model_dir, tiny_data, tmp_path, method):
    out = _train(tiny_model_dir, tiny_data, tmp_path, method)
    m = pd.read_parquet(out / "metrics.parquet")
    assert len(m) == 1
    row = m.iloc[0]
    assert row["method"] == method and row["task"] == "stsb" and row["status"] == "ok"
    assert row["budget"] == ("100" if method == "full" else "2")  # the budget token, as in the run path
    assert row["metric"] == "pearson" and -1 <= row["dev_main"] <= 1
    assert {"dev_pearson", "dev_spearman", "best_dev_pearson", "best_epoch", "train_s", "samples_per_s",
            "peak_mem_mib", "trainable_pct", "torch_version", "peft_version"} <= set(m.columns)
    assert row["steps"] == 2 * 6 and row["train_examples"] == 96 and row["eval_examples"] == 64
    assert row["trainable_params"] == row["adapter_params"] + row["head_params"]
    assert row["train_s"] > 0 and row["peak_mem_mib"] > 0
    curve = pd.read_parquet(out / "curve.parquet")
    assert (curve["kind"] == "eval").sum() == 2 and (curve["kind"] == "train").sum() >= 6
    assert curve.loc[curve.kind == "train", "loss"].notna().all()
    assert set(curve["method"]) == {method}
    adapter = load_file(out / "adapter.safetensors")
    assert sum(v.numel() for v in adapter.values()) == row["trainable_params"]
    ranks = pd.read_parquet(out / "ranks.parquet")
    if method == "full":
        assert len(ranks) == 0
        assert row["adapter_params"] == row["backbone_params"]
    else:
        assert len(ranks) == 12 and set(ranks["layer"]) == {0, 1}


def test_lora_budget_to_rank(tiny_model_dir, tiny_data, tmp_path):
    row = pd.read_parquet(_train(tiny_model_dir, tiny_data, tmp_path, "lora", budget=2.0, epochs=1) / "metrics.parquet").iloc[0]
    # tiny BERT: per unit of rank 2 layers x (4 x (32+32) + 2 x (32+64)) = 896 parameters
    expected_rank = round(0.02 * row["backbone_params"] / 896)
    assert row["rank"] == expected_rank
    assert row["adapter_params"] == expected_rank * 896
    assert abs(row["trainable_pct"] - 2.0) / 2.0 < 0.1


def test_adalora_ranks_really_change(tiny_model_dir, tiny_data, tmp_path):
    out = _train(tiny_model_dir, tiny_data, tmp_path, "adalora", task="sst2", budget=2.0, epochs=3,
                 max_train_samples=192, lr=5e-3)
    row = pd.read_parquet(out / "metrics.parquet").iloc[0]
    ranks = pd.read_parquet(out / "ranks.parquet")
    assert row["init_rank"] > row["rank"]
    # pruned to the target budget: total rank falls from init_r per matrix to about target_r per matrix
    assert ranks["rank"].sum() < row["init_rank"] * len(ranks)
    assert ranks["rank"].sum() == pytest.approx(row["rank"] * len(ranks), rel=0.1)
    assert row["effective_adapter_params"] < row["adapter_params"]


def test_training_is_deterministic_on_cpu(tiny_model_dir, tiny_data, tmp_path):
    a = pd.read_parquet(_train(tiny_model_dir, tiny_data, tmp_path / "a", "lora", task="cola", epochs=1) / "metrics.parquet")
    b = pd.read_parquet(_train(tiny_model_dir, tiny_data, tmp_path / "b", "lora", task="cola", epochs=1) / "metrics.parquet")
    assert a["dev_matthews_correlation"].iloc[0] == b["dev_matthews_correlation"].iloc[0]
    assert a["dev_accuracy"].iloc[0] == b["dev_accuracy"].iloc[0]


def test_nan_loss_is_a_failed_run_with_step_and_last_loss(tiny_model_dir, tiny_data, tmp_path, caplog):
    out = _train(tiny_model_dir, tiny_data, tmp_path, "full", lr=1e6, max_grad_norm=1e9, epochs=2, log_every=1)
    row = pd.read_parquet(out / "metrics.parquet").iloc[0]
    assert row["status"] == "failed"
    assert "loss became nan at step" in row["error"] and "last finite loss" in row["error"]
    assert "lower the learning rate (now 1e+06)" in row["error"]
    assert np.isnan(row["dev_main"])
    assert "loss became nan" in caplog.text
    for f in ("curve.parquet", "ranks.parquet", "gradnorms.parquet", "adapter.safetensors"):
        assert (out / f).is_file()


def test_aggregate_records_missing_runs(tiny_model_dir, tiny_data, tmp_path):
    run = _train(tiny_model_dir, tiny_data, tmp_path / "runs" / "tiny" / "stsb" / "lora" / "b2", "lora", epochs=1)
    good = run.rename(run.parent / "s1")
    missing = run.parent / "s2"
    main(["aggregate", "--out-dir", str(tmp_path / "tables"), str(good), str(missing)])
    runs = pd.read_parquet(tmp_path / "tables" / "runs.parquet")
    assert list(runs["status"]) == ["ok", "missing"]
    assert list(runs["seed"]) == [1, 2]
    assert len(pd.read_parquet(tmp_path / "tables" / "curves.parquet")) > 0
    assert len(pd.read_parquet(tmp_path / "tables" / "ranks.parquet")) == 12
