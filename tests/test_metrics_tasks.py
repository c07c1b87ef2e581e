"""GLUE task table and metrics against hand computations."""
import math

import numpy as np
import pytest

from peftbench.metrics import compute_metrics
from peftbench.vocab import TASKS, get_task


def test_task_table_covers_glue():
    from peftbench.vocab import TRACK_TASKS

    assert set(TRACK_TASKS["encoder"]) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"}
    assert set(TRACK_TASKS["causal"]) == {"rte_gen", "sst2_gen", "mnli_gen", "e2e_nlg", "samsum", "wikisql"}
    assert set(TASKS) == set(TRACK_TASKS["encoder"]) | set(TRACK_TASKS["causal"])
    assert get_task("stsb").is_regression and get_task("stsb").num_labels == 1
    assert get_task("mnli").num_labels == 3
    assert get_task("mnli").metric_names() == ["accuracy_matched", "accuracy_mismatched"]
    assert get_task("cola").main_metric == "matthews_correlation"
    with pytest.raises(KeyError, match="unknown task 'foo'"):
        get_task("foo")


def test_cola_matthews_by_hand():
    gold = np.array([1, 1, 0, 0, 1, 0])
    pred = np.array([1, 0, 0, 1, 1, 0])
    logits = np.eye(2)[pred]
    tp, tn, fp, fn = 2, 2, 1, 1
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    m = compute_metrics(get_task("cola"), logits, gold, "validation")
    assert m["matthews_correlation"] == pytest.approx(mcc)
    assert m["accuracy"] == pytest.approx(4 / 6)


def test_mrpc_f1_and_accuracy_by_hand():
    gold = np.array([1, 1, 1, 0])
    pred = np.array([1, 1, 0, 1])
    m = compute_metrics(get_task("mrpc"), np.eye(2)[pred], gold, "validation")
    precision, recall = 2 / 3, 2 / 3
    assert m["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert m["accuracy"] == pytest.approx(0.5)


def test_stsb_pearson_spearman_by_hand():
    gold = np.array([0.0, 1.0, 2.0, 3.0, 5.0])
    pred = np.array([0.1, 0.9, 2.5, 2.4, 4.0])
    m = compute_metrics(get_task("stsb"), pred[:, None], gold, "validation")
    assert m["pearson"] == pytest.approx(np.corrcoef(pred, gold)[0, 1])
    # ranks: pred 1,2,4,3,5 vs gold 1..5 -> d^2 = 0+0+1+1+0 = 2 -> 1 - 6*2/(5*24)
    assert m["spearman"] == pytest.approx(1 - 6 * 2 / (5 * 24))
    flat = compute_metrics(get_task("stsb"), np.ones((5, 1)), gold, "validation")
    assert flat == {"pearson": 0.0, "spearman": 0.0}


def test_mnli_metrics_carry_split_suffix():
    m = compute_metrics(get_task("mnli"), np.eye(3)[[0, 1, 2]], np.array([0, 1, 1]), "validation_mismatched")
    assert m == {"accuracy_mismatched": pytest.approx(2 / 3)}


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 predictions for 3 labels"):
        compute_metrics(get_task("sst2"), np.eye(2), np.array([0, 1, 1]), "validation")
