"""data.resample_per_seed (issue 14, step 4): a capped training set drawn per seed
(Bouthillier et al. 2021, arXiv:2103.03098) when on, one fixed subset when off."""
import numpy as np
import pytest

from peftbench.batches import TokenizedSplit
from peftbench.config import recipe_for, schema_defaults
from peftbench.recipe import RECIPE_KEYS, Recipe
from peftbench.train import train_subset_seed


def _subset(path, recipe, seed):
    return TokenizedSplit(path, recipe.max_train_samples, subset_seed=train_subset_seed(recipe, seed))


def test_default_is_off_and_tracked():
    assert schema_defaults("data")["resample_per_seed"] is False
    rec = Recipe.from_dict({})
    assert rec.resample_per_seed is False
    assert '"resample_per_seed": false' in rec.to_json()  # tracked: part of the train rule's --recipe
    assert "resample_per_seed" not in RECIPE_KEYS  # a data: key, not a training.* layer key


@pytest.mark.parametrize("on", [False, True])
def test_two_seeds_subsets(tiny_data, on):
    path = tiny_data["sst2"]["train"]
    rec = Recipe.from_dict({"max_train_samples": 40, "resample_per_seed": on})
    a, b = _subset(path, rec, 1), _subset(path, rec, 2)
    assert len(a) == len(b) == 40
    if on:
        assert not np.array_equal(a.rows, b.rows)
        assert not np.array_equal(a.idx, b.idx)
    else:
        np.testing.assert_array_equal(a.rows, b.rows)
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
    # the same seed always draws the same subset; off equals the grid's seed-0 subset
    np.testing.assert_array_equal(_subset(path, rec, 2).rows, b.rows)
    np.testing.assert_array_equal(TokenizedSplit(path, 40).rows, _subset(path, Recipe.from_dict(
        {"max_train_samples": 40}), 7).rows)


def test_recipe_for_reads_the_data_section():
    from pathlib import Path

    from peftbench import config as pbconfig

    path = Path(__file__).resolve().parents[1] / "workflow" / "configs" / "glue-deberta.yaml"
    on = pbconfig.load(path, {"data": {"max_train_samples": 10, "resample_per_seed": True}})
    off = pbconfig.load(path, {"data": {"max_train_samples": 10}})
    assert pbconfig.recipe_for(on, "rte", "lora").resample_per_seed is True
    assert pbconfig.recipe_for(off, "rte", "lora").resample_per_seed is False
    assert pbconfig.recipe_for(on, "rte", "lora").to_json() != pbconfig.recipe_for(off, "rte", "lora").to_json()
    with pytest.raises(pbconfig.ConfigError, match="resample_per_seed"):
        pbconfig.load(path, {"data": {"resample_per_seed": "sometimes"}})
