"""predictions.parquet: every dev example's label, prediction and logits, per run and aggregated
(issue 14, step 1). The logged dev_* / best_dev_* metrics must be recomputable from it exactly."""
import numpy as np
import pandas as pd
import pytest
from conftest import recipe_args

from peftbench.cli import main
from peftbench.metrics import compute_metrics
from peftbench.outputs import prediction_frame
from peftbench.vocab import RUN_FILES, TABLES, get_task


def _train(tiny_model_dir, tiny_data, root, task, seed=1, **recipe):
    rec = {"lr": 5e-3, "epochs": 3, "batch_size": 16, "max_train_samples": 96, "max_eval_samples": 64,
           "log_every": 2, **recipe}
    out = root / "tiny" / task / "lora" / "b2" / f"s{seed}"
    main(["train", "--model-name", "tiny", "--model", str(tiny_model_dir), "--task", task, "--method", "lora",
          "--budget", "2", "--seed", str(seed), "--train", str(tiny_data[task]["train"]),
          "--dev", f"validation={tiny_data[task]['validation']}", *recipe_args(rec), "--out", str(out)])
    return out


def _logits(task, df):
    cols = ["score"] if task.is_regression else [f"logit_{c}" for c in range(task.num_labels)]
    return df[cols].to_numpy()


@pytest.mark.parametrize("task_name", ["cola", "stsb"])
def test_predictions_recompute_every_logged_metric(tiny_model_dir, tiny_data, tmp_path, task_name):
    task = get_task(task_name)
    run = _train(tiny_model_dir, tiny_data, tmp_path / "runs", task_name)
    m = pd.read_parquet(run / RUN_FILES["metrics"]).iloc[0]
    pred = pd.read_parquet(run / RUN_FILES["predictions"])
    assert m["status"] == "ok"
    # key columns first, then the prediction columns, compact dtypes
    assert list(pred.columns[:5]) == ["model", "task", "method", "budget", "seed"]
    assert pred["epoch"].dtype == np.int16 and pred["idx"].dtype == np.int64
    if task.is_regression:
        assert {"score", "prediction", "label"} <= set(pred.columns)
        assert pred["score"].dtype == np.float32 and pred["label"].dtype == np.float32
        assert np.array_equal(pred["prediction"], pred["score"])
    else:
        assert [c for c in pred.columns if c.startswith("logit_")] == ["logit_0", "logit_1"]
        assert pred["prediction"].dtype == np.int8 and pred["label"].dtype == np.int8
        assert pred["logit_0"].dtype == np.float32
        assert np.array_equal(pred["prediction"], _logits(task, pred).argmax(axis=1))
    # the final epoch, plus the best one when it differs
    expected_epochs = {3} | {int(m["best_epoch"])}
    assert set(pred["epoch"]) == expected_epochs
    for epoch, prefix in ((3, "dev_"), (int(m["best_epoch"]), "best_dev_")):
        sub = pred[(pred["epoch"] == epoch) & (pred["split"] == "validation")]
        assert len(sub) == 64 and sub["idx"].is_unique
        got = compute_metrics(task, _logits(task, sub), sub["label"].to_numpy(), "validation")
        for name in task.metric_names():
            assert got[name] == m[f"{prefix}{name}"], (prefix, name)
    # the idx column is the GLUE idx of the evaluated (capped) dev subset, labels match the source
    src = pd.read_parquet(tiny_data[task_name]["validation"])
    labels = src.set_index("idx")["label"]
    final = pred[pred["epoch"] == 3]
    assert np.allclose(labels.loc[final["idx"]].to_numpy(), final["label"].to_numpy())


def test_aggregate_collects_predictions(tiny_model_dir, tiny_data, tmp_path):
    runs = [_train(tiny_model_dir, tiny_data, tmp_path / "runs", "sst2", seed=s, epochs=1) for s in (1, 2)]
    main(["aggregate", "--out-dir", str(tmp_path / "tables"), *map(str, runs)])
    table = pd.read_parquet(tmp_path / "tables" / TABLES["predictions"])
    assert len(table) == 2 * 64
    assert sorted(table["seed"].unique()) == [1, 2]
    assert set(table["method"]) == {"lora"} and set(table["task"]) == {"sst2"}
    per_run = pd.read_parquet(runs[0] / RUN_FILES["predictions"])
    pd.testing.assert_frame_equal(table[table["seed"] == 1].reset_index(drop=True), per_run, check_dtype=False)


def test_prediction_frame_shapes_and_errors():
    task = get_task("mnli")
    z = np.arange(12, dtype=np.float32).reshape(4, 3)
    df = prediction_frame(task, {"validation_matched": (np.array([5, 6, 7, 8]), np.array([0, 1, 2, 2]))},
                          [(2, {"validation_matched": z})])
    assert list(df.columns) == ["epoch", "split", "idx", "label", "prediction", "logit_0", "logit_1", "logit_2"]
    assert list(df["prediction"]) == [2, 2, 2, 2] and list(df["idx"]) == [5, 6, 7, 8]
    empty = prediction_frame(task, {"validation_matched": (np.array([5]), np.array([0]))}, [])
    assert len(empty) == 0 and "logit_2" in empty.columns
    with pytest.raises(ValueError, match=r"mnli/validation_matched: logits of shape \(4, 3\), expected \(3, 3\)"):
        prediction_frame(task, {"validation_matched": (np.array([1, 2, 3]), np.array([0, 1, 2]))},
                         [(1, {"validation_matched": z})])
