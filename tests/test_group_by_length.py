"""The ``group_by_length`` recipe key: length-grouped batches (Hugging Face's mega-batch scheme),
the config plumbing, and a training run with it on (behaviour only; its speed is benchmarked by
``peftbench bench --group-by-length``)."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from peftbench.batches import TokenizedSplit
from test_stages import _train


def _padded_tokens(split: TokenizedSplit, batches: list[torch.Tensor]) -> int:
    return sum(len(b) * int(split.lengths[b].max()) for b in batches)


@pytest.fixture(scope="module")
def sst2(tiny_data) -> TokenizedSplit:
    return TokenizedSplit(tiny_data["sst2"]["train"])


def test_without_grouping_batches_are_slices_of_one_permutation(sst2):
    """The default reproduces the batches every run before the key existed drew."""
    batches = sst2.epoch_batches(16, torch.Generator().manual_seed(7))
    perm = torch.randperm(len(sst2), generator=torch.Generator().manual_seed(7))
    assert len(batches) == math.ceil(len(sst2) / 16)
    for b, batch in enumerate(batches):
        assert torch.equal(batch, perm[b * 16:(b + 1) * 16])


@pytest.mark.parametrize("batch_size", [1, 16, 33, 5000])
def test_grouped_batches_cover_every_example_once(sst2, batch_size):
    batches = sst2.epoch_batches(batch_size, torch.Generator().manual_seed(0), group_by_length=True)
    assert len(batches) == math.ceil(len(sst2) / batch_size)
    assert all(1 <= len(b) <= batch_size for b in batches)
    assert torch.equal(torch.sort(torch.cat(batches)).values, torch.arange(len(sst2)))


def test_grouping_pads_far_less_than_random_batches(sst2):
    real = int(sst2.lengths.sum())
    rand = _padded_tokens(sst2, sst2.epoch_batches(32, torch.Generator().manual_seed(0)))
    grouped = _padded_tokens(sst2, sst2.epoch_batches(32, torch.Generator().manual_seed(0), group_by_length=True))
    assert len(sst2) == 2000
    assert rand / real > 1.5          # random batches of SST-2 sentences are mostly padding
    assert grouped / real < 1.15      # grouped ones nearly are not
    assert grouped < 0.6 * rand


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_batches_are_hugging_faces_length_grouped_batches(sst2, seed):
    """The same batches (as sets of examples) as ``get_length_grouped_indices`` sliced into batches,
    once its swap of the longest example into the first batch is undone; only their order differs."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    bs = 32
    lengths = sst2.lengths.tolist()
    ours = sst2.epoch_batches(bs, torch.Generator().manual_seed(seed), group_by_length=True)
    hf = get_length_grouped_indices(lengths, bs, generator=torch.Generator().manual_seed(seed))
    mega = min(len(lengths) // (4 * bs), 50) * bs
    perm = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed))
    maxima = [int(sst2.lengths[m].max()) for m in perm.split(mega)]
    k = maxima.index(max(maxima))
    hf[0], hf[k * mega] = hf[k * mega], hf[0]  # undo "the biggest batch first"
    as_sets = lambda batches: sorted(sorted(int(i) for i in b) for b in batches)  # noqa: E731
    assert as_sets(ours) == as_sets([hf[i:i + bs] for i in range(0, len(hf), bs)])
    # and the batch order is shuffled, not mega-batch by mega-batch from long to short
    firsts = [int(sst2.lengths[b].max()) for b in ours[:len(ours) // 2]]
    assert firsts != sorted(firsts, reverse=True)


def test_grouping_is_deterministic_per_seed_and_varies_across_seeds(sst2):
    a = sst2.epoch_batches(32, torch.Generator().manual_seed(3), group_by_length=True)
    b = sst2.epoch_batches(32, torch.Generator().manual_seed(3), group_by_length=True)
    c = sst2.epoch_batches(32, torch.Generator().manual_seed(4), group_by_length=True)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_batch_size_below_one_is_rejected(sst2):
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        sst2.epoch_batches(0, torch.Generator().manual_seed(0), group_by_length=True)


def _cfg() -> dict:
    return {"models": {"tiny": "x"}, "grid": {"models": ["tiny"], "tasks": ["sst2", "stsb"], "methods": ["lora"],
                                              "budgets": [0.5], "seeds": [0]}}


def test_config_default_per_task_override_and_tracking():
    from peftbench import config as pbconfig

    c = pbconfig.validate(_cfg())
    off = pbconfig.recipe_for(c, "sst2", "lora")
    assert off.group_by_length is False and json.loads(off.to_json())["group_by_length"] is False
    cfg = _cfg()
    cfg["training"] = {"tasks": {"sst2": {"group_by_length": True}}}
    c = pbconfig.validate(cfg)
    on = pbconfig.recipe_for(c, "sst2", "lora")
    assert on.group_by_length is True and pbconfig.recipe_for(c, "stsb", "lora").group_by_length is False
    assert on.to_json() != off.to_json()  # tracked: a run with it on is a different run


def test_config_rejects_a_non_boolean_group_by_length():
    from peftbench import config as pbconfig

    cfg = _cfg()
    cfg["training"] = {"defaults": {"group_by_length": "sometimes"}}
    with pytest.raises(pbconfig.ConfigError, match="group_by_length"):
        pbconfig.validate(cfg)


def test_training_with_grouped_batches(tiny_model_dir, tiny_data, tmp_path):
    """Same steps and examples as random batching, a different (but valid) result."""
    g_dir = _train(tiny_model_dir, tiny_data, tmp_path / "g", "lora", task="sst2", group_by_length=True)
    p_dir = _train(tiny_model_dir, tiny_data, tmp_path / "p", "lora", task="sst2")
    grouped = pd.read_parquet(g_dir / "metrics.parquet").iloc[0]
    plain = pd.read_parquet(p_dir / "metrics.parquet").iloc[0]
    assert grouped["status"] == "ok" and 0 <= grouped["dev_main"] <= 1
    assert grouped["steps"] == plain["steps"] == 2 * 6 and grouped["train_examples"] == 96
    g_loss = pd.read_parquet(g_dir / "curve.parquet").query("kind == 'train'")["loss"].to_numpy()
    p_loss = pd.read_parquet(p_dir / "curve.parquet").query("kind == 'train'")["loss"].to_numpy()
    assert len(g_loss) == len(p_loss) and (g_loss != p_loss).any()  # other batches, other losses


def test_bench_passes_grouping_to_both_systems(tiny_model_dir, glue_dir, tmp_path, monkeypatch):
    import transformers.trainer as hf_trainer

    from peftbench.cli import main

    made = []
    real = hf_trainer.LengthGroupedSampler

    class Spy(real):
        def __init__(self, *a, **k):
            made.append(k.get("batch_size", a[0] if a else None))
            super().__init__(*a, **k)

    monkeypatch.setattr(hf_trainer, "LengthGroupedSampler", Spy)
    out = tmp_path / "bench.parquet"
    main(["bench", "--model", str(tiny_model_dir), "--task", "sst2", "--glue-dir", str(glue_dir),
          "--methods", "lora", "--precisions", "fp32", "--peak-seconds", "0.01", "--rank", "4", "--batch-size", "16",
          "--max-length", "32", "--max-train-samples", "64", "--max-eval-samples", "32", "--work-dir",
          str(tmp_path / "work"), "--no-compile", "--group-by-length", "--no-isolate",  # the spy lives in this process
          "--out", str(out)])
    df = pd.read_parquet(out)
    assert set(df.system) == {"hf_trainer", "peftbench"} and df.group_by_length.all()
    # the Trainer drew length-grouped training batches of the bench's batch size (its evaluation
    # sampler groups too, at the eval batch size; order does not change a metric)
    assert made[0] == 16
