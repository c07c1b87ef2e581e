"""Length buckets and torch.compile in the training loop (behaviour only; speed is benchmarked,
see peftbench.bench)."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from peftbench.batches import TokenizedSplit
from peftbench.recipe import Runtime
from peftbench.train import compile_for_training, graphs_compiled, resolve_compile_mode
from test_stages import _train


def test_bucket_widths_cover_every_example(tiny_data):
    split = TokenizedSplit(tiny_data["sst2"]["train"], max_samples=200)
    widths = split.bucket_widths(4)
    longest = int(split.lengths.max())
    assert 1 <= len(widths) <= 4 and widths == sorted(set(widths))
    assert widths[-1] == longest
    assert all(w % 8 == 0 or w == longest for w in widths)
    split.set_buckets(widths)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        idx = torch.randperm(len(split), generator=gen)[:16]
        b = split.batch(idx, torch.device("cpu"))
        w = b["input_ids"].shape[1]
        assert w in widths and w >= int(split.lengths[idx].max())
        # padding is masked: the mask sums to the true lengths
        assert torch.equal(b["attention_mask"].sum(1), split.lengths[idx])


def test_buckets_that_truncate_are_rejected(tiny_data):
    split = TokenizedSplit(tiny_data["sst2"]["train"], max_samples=50)
    with pytest.raises(ValueError, match="do not hold the longest example"):
        split.set_buckets([4])
    with pytest.raises(ValueError, match="length_buckets must be >= 1"):
        split.bucket_widths(0)


def test_bucket_padding_leaves_the_forward_pass_unchanged(tiny_model_dir, tiny_data):
    from peftbench.models import load_classifier
    from peftbench.vocab import get_task

    torch.manual_seed(0)
    model = load_classifier(str(tiny_model_dir), get_task("sst2")).eval()
    plain = TokenizedSplit(tiny_data["sst2"]["train"], max_samples=64)
    bucketed = TokenizedSplit(tiny_data["sst2"]["train"], max_samples=64)
    bucketed.set_buckets([plain.input_ids.shape[1] + 5])  # wider than any example: pure padding
    idx = torch.arange(16)
    a, b = plain.batch(idx, torch.device("cpu")), bucketed.batch(idx, torch.device("cpu"))
    assert b["input_ids"].shape[1] == plain.input_ids.shape[1] + 5 > a["input_ids"].shape[1]
    with torch.no_grad():
        la = model(**{k: v for k, v in a.items() if k != "labels"}).logits
        lb = model(**{k: v for k, v in b.items() if k != "labels"}).logits
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)


def test_training_with_length_buckets(tiny_model_dir, tiny_data, tmp_path):
    out = _train(tiny_model_dir, tiny_data, tmp_path, "lora", task="sst2", epochs=1, length_buckets=3)
    row = pd.read_parquet(out / "metrics.parquet").iloc[0]
    assert row["status"] == "ok" and 0 <= row["dev_main"] <= 1
    widths = [int(w) for w in row["length_buckets"].split(",")]
    assert 1 <= len(widths) <= 3 and widths == sorted(widths)
    assert not row["compiled"] and row["compile_s"] == 0 and row["compile_note"] == "eager"


def test_evaluating_only_the_last_epoch_changes_no_trained_weight(tiny_model_dir, tiny_data, tmp_path):
    """eval_every_epoch: false skips the earlier epochs' evaluations; the model and the final
    dev metrics are bitwise those of a run that evaluated every epoch."""
    from safetensors.torch import load_file

    every = _train(tiny_model_dir, tiny_data, tmp_path / "every", "lora", task="stsb", epochs=3)
    last = _train(tiny_model_dir, tiny_data, tmp_path / "last", "lora", task="stsb", epochs=3,
                  eval_every_epoch=False)
    a, b = (pd.read_parquet(d / "metrics.parquet").iloc[0] for d in (every, last))
    assert bool(a["eval_every_epoch"]) and not bool(b["eval_every_epoch"])
    for col in ("dev_main", "dev_pearson", "dev_spearman", "steps"):
        assert a[col] == b[col], col
    # one evaluation, of the last epoch: the best epoch is the last one
    assert b["best_epoch"] == 3 and b["best_dev_main"] == b["dev_main"]
    assert a["eval_s"] > b["eval_s"] > 0
    ca, cb = (pd.read_parquet(d / "curve.parquet") for d in (every, last))
    assert list(ca.loc[ca.kind == "eval", "epoch"]) == [1.0, 2.0, 3.0]
    assert list(cb.loc[cb.kind == "eval", "epoch"]) == [3.0]
    train_a, train_b = (c.loc[c.kind == "train", "loss"].to_numpy() for c in (ca, cb))
    np.testing.assert_array_equal(train_a, train_b)
    wa, wb = load_file(every / "adapter.safetensors"), load_file(last / "adapter.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # predictions: the final epoch only (the best epoch is the same one)
    pb = pd.read_parquet(last / "predictions.parquet")
    assert set(pb["epoch"]) == {3}


def test_compile_falls_back_to_eager_with_a_reason(caplog):
    from peftbench.methods import get_method

    model = torch.nn.Linear(2, 2)
    with caplog.at_level(logging.WARNING, logger="peftbench.train"):
        m, note = compile_for_training(model, get_method("lora"), torch.device("cpu"),
                                       Runtime.from_dict({"compile": True, "compile_mode": "reduce-overhead"}))
    assert m is model and "reduce-overhead uses CUDA graphs and the device is cpu" in note
    assert "falling back to eager" in caplog.text
    not_compilable = type("Plain", (), {"name": "plain", "compilable": False})  # every registered method is
    m, note = compile_for_training(model, not_compilable, torch.device("cpu"),
                                   Runtime.from_dict({"compile": True, "compile_backend": "eager"}))
    assert m is model and "plain does not declare compilable" in note
    m, note = compile_for_training(model, get_method("lora"), torch.device("cpu"), Runtime.from_dict({}))
    assert m is model and note == "eager"


def test_compile_mode_auto_compiles_with_inductor_on_a_cpu():
    """``compile_mode: auto`` (the default) is CUDA graphs on a GPU and inductor's default mode on
    a CPU, so ``compile: true`` compiles there instead of falling back to eager."""
    from peftbench.methods import get_method

    assert Runtime.from_dict({}).compile_mode == "auto"
    assert resolve_compile_mode("auto", torch.device("cpu")) == "default"
    assert resolve_compile_mode("auto", torch.device("cuda")) == "reduce-overhead"
    assert resolve_compile_mode("max-autotune", torch.device("cpu")) == "max-autotune"
    m, note = compile_for_training(torch.nn.Linear(2, 2), get_method("lora"), torch.device("cpu"),
                                   Runtime.from_dict({"compile": True}))
    assert note == "compiled (backend inductor, mode default, dynamic shapes)"
    m, note = compile_for_training(torch.nn.Linear(2, 2), get_method("lora"), torch.device("cpu"),
                                   Runtime.from_dict({"compile": True, "length_buckets": 4}))
    assert note == "compiled (backend inductor, mode default, 4 length buckets)"


def test_compile_without_buckets_uses_dynamic_shapes(tiny_model_dir, tiny_data, tmp_path):
    """Per-batch padding under compile: Dynamo's automatic dynamic shapes recompile once for the
    second batch length, not once per length (with ``dynamic=False`` every length was a new graph
    until ``recompile_limit``, then eager); only the steps that compiled count as ``compile_s``."""
    common = dict(task="sst2", epochs=1, max_train_samples=96, batch_size=8, dropout_kernel="torch")
    split = TokenizedSplit(tiny_data["sst2"]["train"], max_samples=96)
    torch._dynamo.reset()
    g0 = graphs_compiled()
    static = _train(tiny_model_dir, tiny_data, tmp_path / "one", "lora", compile=True, compile_backend="eager",
                    length_buckets=1, **common)
    per_compile = graphs_compiled() - g0  # one static shape: one compilation's graphs
    torch._dynamo.reset()
    g0 = graphs_compiled()
    a = _train(tiny_model_dir, tiny_data, tmp_path / "a", "lora", **common)
    b = _train(tiny_model_dir, tiny_data, tmp_path / "b", "lora", compile=True, compile_backend="eager", **common)
    assert 1 <= graphs_compiled() - g0 <= 2 * per_compile
    ma, mb = (pd.read_parquet(d / "metrics.parquet").iloc[0] for d in (a, b))
    assert mb["compiled"] and mb["compile_note"] == "compiled (backend eager, mode None, dynamic shapes)"
    assert 0 < mb["compile_s"] and pd.read_parquet(static / "metrics.parquet").iloc[0]["compiled"]
    ca, cb = (pd.read_parquet(d / "curve.parquet") for d in (a, b))
    np.testing.assert_allclose(ca.loc[ca.kind == "train", "loss"], cb.loc[cb.kind == "train", "loss"],
                               rtol=1e-5, atol=1e-6)
    gen = torch.Generator().manual_seed(1)
    lengths = {int(split.lengths[torch.randperm(len(split), generator=gen)[i:i + 8]].max()) for i in range(0, 96, 8)}
    assert len(lengths) >= 3  # several batch lengths, so a per-length compile would exceed the bound


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_compiled_training_matches_eager(tiny_model_dir, tiny_data, tmp_path, method):
    """Dynamo-traced training (backend ``eager``: the graph capture without code generation) gives
    the eager run's losses and counts the first steps of each batch shape as compilation."""
    common = dict(task="sst2", epochs=1, length_buckets=2, max_train_samples=64,
                  dropout_kernel="torch")  # the compiled run draws with torch's dropout
    a = _train(tiny_model_dir, tiny_data, tmp_path / "a", method, **common)
    b = _train(tiny_model_dir, tiny_data, tmp_path / "b", method, compile=True, compile_backend="eager", **common)
    ma, mb = (pd.read_parquet(d / "metrics.parquet").iloc[0] for d in (a, b))
    assert not ma["compiled"] and ma["compile_s"] == 0
    assert mb["compiled"] and mb["compile_s"] > 0 and mb["compile_note"].startswith("compiled (backend eager")
    ca, cb = (pd.read_parquet(d / "curve.parquet") for d in (a, b))
    np.testing.assert_allclose(ca.loc[ca.kind == "train", "loss"], cb.loc[cb.kind == "train", "loss"],
                               rtol=1e-5, atol=1e-6)
    assert ma["dev_main"] == pytest.approx(mb["dev_main"], abs=1e-9)


def test_evaluation_batches_longest_first_and_returns_rows_in_split_order(tiny_model_dir, tiny_data):
    """Dev batches are formed from the length-sorted split (longest first: less padding); the
    logits come back in the split's row order and equal one-example-at-a-time logits (no padding)."""
    from peftbench.methods import BuildContext, get_method
    from peftbench.models import backbone_param_count, find_targets, head_module_names, load_classifier
    from peftbench.train import evaluate
    from peftbench.vocab import get_task

    task = get_task("sst2")
    torch.manual_seed(0)
    model = load_classifier(str(tiny_model_dir), task)
    ctx = BuildContext(task=task, budget=2.0, backbone_params=backbone_param_count(model),
                       targets=find_targets(model), head_modules=head_module_names(model), total_steps=1,
                       steps_per_epoch=1, options={}, seed=0)
    method = get_method("lora")(ctx)
    model = method.build(model)
    split = TokenizedSplit(tiny_data["sst2"]["validation"], max_samples=40)
    assert len(set(split.lengths.tolist())) > 3  # lengths differ, so the order matters
    seen = []
    hook = model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["attention_mask"].sum(1).tolist()), with_kwargs=True)
    metrics, logits = evaluate(model, method, task, {"validation": split}, torch.device("cpu"), 8, False)
    hook.remove()
    assert sum(seen, []) == sorted(split.lengths.tolist(), reverse=True)  # longest first, every example once
    model.eval()
    with torch.no_grad():
        one = []
        for i in range(len(split)):
            b = split.batch(torch.tensor([i]), torch.device("cpu"))
            b.pop("labels")
            one.append(model(**b).logits)
    np.testing.assert_allclose(logits["validation"], torch.cat(one).numpy(), rtol=1e-4, atol=1e-5)
    assert metrics["accuracy"] == pytest.approx(
        float((torch.cat(one).argmax(1) == split.labels).float().mean()))


@pytest.mark.parametrize("outcome", ["ok", "exit"])
def test_console_main_freezes_the_gc_after_the_command_also_on_exit(monkeypatch, outcome):
    """``python -m peftbench`` / ``peftbench``: the command runs first, then ``gc.freeze()`` (the
    process's exit skips collecting every object), also when the command exits with an error."""
    import gc

    from peftbench import cli

    calls = []

    def fake_main():
        calls.append("main")
        if outcome == "exit":
            raise SystemExit(1)

    monkeypatch.setattr(cli, "main", fake_main)
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    if outcome == "exit":
        with pytest.raises(SystemExit):
            cli.console_main()
    else:
        cli.console_main()
    assert calls == ["main", "freeze"]
