"""Budgets as percentages or LoRA-rank equivalents (peftbench.budget), the explicit denominator,
and one Budget value through the run key, the CLI, the BuildContext, the rules and the tables."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from peftbench import config as pbconfig
from peftbench.budget import (BUDGET_TOLERANCE, DENOMINATORS, TOKEN_REGEX, Budget, BudgetError, budget_token,
                              default_denominator, per_rank_cost, rank_for_params, uniform_rank)
from peftbench.cli import main
from peftbench.methods import METHODS, BuildContext, get_method
from peftbench.models import (backbone_param_count, embedding_param_count, find_targets, head_module_names,
                              load_classifier)
from peftbench.runkey import RunKey
from peftbench.vocab import get_task

from conftest import recipe_args

ROOT = Path(__file__).resolve().parents[1]
#: tiny BERT (conftest): 2 layers x (4 x (32 + 32) + 2 x (32 + 64)) parameters per unit of LoRA rank
TINY_RANK_COST = 896


# ------------------------------------------------------------------------------------------------
# The Budget value
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, token, kind, value", [
    (0.5, "0.5", "pct", 0.5), ("0.50", "0.5", "pct", 0.5), (1.0, "1", "pct", 1.0), (2, "2", "pct", 2.0),
    ("r8", "r8", "rank", 8), (" r12 ", "r12", "rank", 12), (100, "100", "full", 100.0), ("100", "100", "full", 100.0),
    (0.123456789, "0.123456789", "pct", 0.123456789),
])
def test_every_spelling_has_one_token_kind_and_value(spec, token, kind, value):
    b = Budget.parse(spec)
    assert (b.token, b.kind, b.value) == (token, kind, value)
    assert Budget.parse(b.token) == b and budget_token(spec) == token and str(b) == token
    assert re.fullmatch(TOKEN_REGEX, token)  # the Snakemake wildcard accepts every token


@pytest.mark.parametrize("spec", [0, -1, 150, "r0", "r-2", "R8", "r8.5", "x", "", None, True, float("nan")])
def test_bad_budgets_say_what_is_allowed(spec):
    with pytest.raises(BudgetError, match=r"r<N>|r8"):
        Budget.parse(spec)


def test_budgets_sort_by_kind_then_value_not_as_strings():
    specs = ["r8", 10, "r2", 2, 0.5, 100, "r10"]
    assert [b.token for b in sorted(map(Budget.parse, specs))] == ["0.5", "2", "10", "r2", "r8", "r10", "100"]
    assert Budget.parse("r8").label == "r8 (LoRA rank 8)" and Budget.parse(0.5).label == "0.5%"


def test_rank_budget_is_the_parameter_count_of_uniform_lora_rank_n():
    from peftbench.models import Target

    targets = [Target("a", 0, "query", 768, 768), Target("b", 0, "intermediate", 3072, 768)]
    size = Budget.parse("r8").size(targets, backbone_params=10_000_000)
    assert size.params == 8 * (768 + 768 + 768 + 3072) == 8 * per_rank_cost(targets)
    assert size.denominator == "backbone" and size.denominator_params == 10_000_000
    assert size.pct == pytest.approx(100 * size.params / 10_000_000)
    assert rank_for_params(size.params, targets) == 8  # LoRA's rank for an r8 budget is exactly 8
    # DeBERTa-v3-base: 12 layers x (4 x 1536 + 2 x 3840) = 165,888 per rank; r8 = 1.33M (LoRA r=8 anchor)
    deberta = [Target(f"{k}{i}", i, k, *(d)) for i in range(12) for k, d in
               (("q", (768, 768)), ("k", (768, 768)), ("v", (768, 768)), ("o", (768, 768)),
                ("i", (3072, 768)), ("out", (768, 3072)))]
    assert Budget.parse("r8").size(deberta, 184_000_000).params == 1_327_104


def test_percentage_budget_uses_the_chosen_denominator():
    from peftbench.models import Target

    targets = [Target("a", 0, "query", 32, 32)]
    whole = Budget.parse(2).size(targets, 1_000_000, embedding_params=900_000)
    assert whole.params == pytest.approx(20_000) and whole.denominator == "backbone"
    wo = Budget.parse(2).size(targets, 1_000_000, embedding_params=900_000, denominator="backbone_without_embeddings")
    assert wo.params == pytest.approx(2_000) and wo.denominator_params == 100_000 and wo.pct == pytest.approx(2.0)
    # rank and full budgets need no denominator: budget_pct is quoted against the whole backbone
    r = Budget.parse("r1").size(targets, 1_000_000, 900_000, denominator="backbone_without_embeddings")
    assert r.params == 64 and r.denominator == "backbone"
    with pytest.raises(BudgetError, match="embedding parameter count"):
        Budget.parse(2).size(targets, 1_000_000, denominator="backbone_without_embeddings")
    with pytest.raises(BudgetError, match="not one of backbone, backbone_without_embeddings"):
        Budget.parse(2).size(targets, 1_000_000, denominator="embeddings")


def test_uniform_rank_is_rank_for_params_of_the_percentage():
    from peftbench.models import Target

    targets = [Target("a", 0, "query", 64, 64)]
    assert uniform_rank(1.0, 100_000, targets) == rank_for_params(1_000, targets) == 8
    assert rank_for_params(10**9, targets) == 64  # capped at min(d_in, d_out)
    with pytest.raises(ValueError, match="positive parameter count"):
        rank_for_params(0, targets)


def test_schema_default_denominator_is_documented():
    schema = pbconfig.load_schema()["properties"]["grid"]["properties"]
    assert default_denominator() == schema["budget_denominator"]["default"] == "backbone"
    for name in DENOMINATORS:  # the description names every allowed value
        assert name in schema["budget_denominator"]["description"]


# ------------------------------------------------------------------------------------------------
# BuildContext: methods see one parameter count
# ------------------------------------------------------------------------------------------------

def build(name, budget, tiny_model_dir, tiny_svd, denominator=None):
    task = get_task("sst2")
    torch.manual_seed(0)
    model = load_classifier(str(tiny_model_dir), task)
    budget = RunKey.of("tiny", task.name, name, budget, 0).budget  # as the train CLI does: full -> "100"
    ctx = BuildContext(task=task, budget=budget, backbone_params=backbone_param_count(model),
                       targets=find_targets(model), head_modules=head_module_names(model), total_steps=20,
                       steps_per_epoch=10, seed=0, svd_path=tiny_svd, budget_denominator=denominator,
                       embedding_params=embedding_param_count(model))
    method = get_method(name)(ctx)
    return method, method.build(model), ctx


def test_embedding_count_of_the_tiny_bert(tiny_model_dir):
    model = load_classifier(str(tiny_model_dir), get_task("sst2"))
    # word (30522 x 32), position (128 x 32) and token-type (2 x 32) embeddings
    assert embedding_param_count(model) == (30522 + 128 + 2) * 32


@pytest.mark.parametrize("name", ["lora", "glora", "fwlora", "phased", "spectral_a"])
@pytest.mark.parametrize("n", [2, 8])
def test_rank_budget_gives_lora_family_rank_n(name, n, tiny_model_dir, tiny_svd):
    method, model, ctx = build(name, f"r{n}", tiny_model_dir, tiny_svd)
    assert ctx.budget == Budget.rank(n) and ctx.budget_params == n * TINY_RANK_COST
    assert method.summary(model)["rank"] == n
    assert method.budget_count(model) == n * TINY_RANK_COST


def test_adalora_at_r8_prunes_from_12_to_8(tiny_model_dir, tiny_svd):
    method, model, ctx = build("adalora", "r8", tiny_model_dir, tiny_svd)
    s = method.schedule()
    assert (s["init_r"], s["target_r"]) == (12, 8)  # the AdaLoRA paper's 12 -> 8 (init_ratio 1.5)
    # the final allocation (P, Λ, Q at rank 8) is within the budget family of r8
    assert abs(method.budget_count(model) - ctx.budget_params) <= BUDGET_TOLERANCE * ctx.budget_params


#: Known misses of the integer-rank quantisation on the tiny BERT: lora_attn at r2 has 8 attention
#: matrices costing 512 per unit of rank; 1792 / 512 = 3.5 rounds to rank 4 = 2048 (+14 %). On real
#: models (d = 384 or 768) the steps are far finer.
KNOWN_MISSES = {("lora_attn", "r2")}


@pytest.mark.parametrize("budget", ["r2", "r8"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_is_matched_to_the_rank_budget_count(name, budget, tiny_model_dir, tiny_svd, request):
    """The contract of test_methods_contract at rank budgets: every method is sized by the same
    ctx.budget_params (N x Σ(d_in + d_out)) and meets it (±10 %, or below it when capacity-limited)."""
    if (name, budget) in KNOWN_MISSES:
        request.applymarker(pytest.mark.xfail(strict=True, reason="integer-rank quantisation, see KNOWN_MISSES"))
    method, model, ctx = build(name, budget, tiny_model_dir, tiny_svd)
    assert ctx.budget_params == (ctx.backbone_params if METHODS[name].budget_free else
                                 int(budget[1:]) * TINY_RANK_COST)
    if METHODS[name].budget_free:
        assert ctx.budget_params == ctx.backbone_params
        return
    used = method.budget_count(model)
    if method.summary(model).get("capacity_limited"):
        assert used < (1 + BUDGET_TOLERANCE) * ctx.budget_params
    else:
        assert abs(used - ctx.budget_params) <= BUDGET_TOLERANCE * ctx.budget_params, (name, used, ctx.budget_params)


def test_denominator_without_embeddings_shrinks_the_percentage_budget(tiny_model_dir, tiny_svd):
    _, _, whole = build("lora", 50, tiny_model_dir, tiny_svd)
    _, _, wo = build("lora", 50, tiny_model_dir, tiny_svd, denominator="backbone_without_embeddings")
    emb = (30522 + 128 + 2) * 32
    assert whole.budget_params == pytest.approx(0.5 * whole.backbone_params)
    assert wo.budget_params == pytest.approx(0.5 * (wo.backbone_params - emb))
    assert wo.budget_size.denominator == "backbone_without_embeddings"


def test_build_context_rejects_a_bad_budget_or_denominator(tiny_model_dir):
    kw = dict(task=get_task("sst2"), backbone_params=1000, targets=[], head_modules=[], total_steps=1,
              steps_per_epoch=1)
    with pytest.raises(BudgetError, match="r<N>"):
        BuildContext(budget="eight", **kw)
    with pytest.raises(BudgetError, match="not one of"):
        BuildContext(budget="r8", budget_denominator="vocab", **kw)


# ------------------------------------------------------------------------------------------------
# The train CLI: --budget r8, --budget-denominator, the recorded columns
# ------------------------------------------------------------------------------------------------

def _train(tiny_model_dir, tiny_data, out, budget, *extra, method="lora"):
    rec = {"lr": 1e-3, "epochs": 1, "batch_size": 16, "max_train_samples": 32, "max_eval_samples": 32}
    main(["train", "--model-name", "tiny", "--model", str(tiny_model_dir), "--task", "stsb", "--method", method,
          "--budget", budget, "--seed", "1", "--train", str(tiny_data["stsb"]["train"]),
          "--dev", f"validation={tiny_data['stsb']['validation']}", *recipe_args(rec), *extra, "--out", str(out)])
    return pd.read_parquet(out / "metrics.parquet").iloc[0], out


def test_train_cli_at_a_rank_budget_records_the_budget(tiny_model_dir, tiny_data, tmp_path):
    row, out = _train(tiny_model_dir, tiny_data, tmp_path / "br2", "r2")
    assert row["budget"] == "r2" and row["rank"] == 2
    assert row["budget_params"] == 2 * TINY_RANK_COST == row["adapter_params"] == row["budget_used_params"]
    assert row["budget_denominator"] == "backbone" and row["denominator_params"] == row["backbone_params"]
    assert row["budget_pct"] == pytest.approx(100 * 2 * TINY_RANK_COST / row["backbone_params"])
    for f in ("curve.parquet", "ranks.parquet"):  # every table carries the token
        assert set(pd.read_parquet(out / f)["budget"]) == {"r2"}


def test_train_cli_records_the_denominator_of_a_percentage_budget(tiny_model_dir, tiny_data, tmp_path):
    row, _ = _train(tiny_model_dir, tiny_data, tmp_path / "b20", "20", "--budget-denominator",
                    "backbone_without_embeddings")
    emb = (30522 + 128 + 2) * 32
    assert row["budget"] == "20" and row["budget_denominator"] == "backbone_without_embeddings"
    assert row["denominator_params"] == row["backbone_params"] - emb
    assert row["budget_params"] == pytest.approx(0.2 * (row["backbone_params"] - emb))
    assert row["budget_pct"] == pytest.approx(20.0)
    assert row["rank"] == round(row["budget_params"] / TINY_RANK_COST)


def test_train_cli_rejects_a_bad_budget(tiny_model_dir, tiny_data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _train(tiny_model_dir, tiny_data, tmp_path / "bad", "r0")
    assert "r<N>" in capsys.readouterr().err


def test_aggregate_reads_rank_budget_directories(tiny_model_dir, tiny_data, tmp_path):
    from peftbench.aggregate import aggregate

    d = tmp_path / "runs" / "tiny" / "stsb" / "lora" / "br2" / "s1"
    _train(tiny_model_dir, tiny_data, d, "r2")
    missing = tmp_path / "runs" / "tiny" / "stsb" / "lora" / "b0.5" / "s1"
    aggregate([d, missing], tmp_path / "tables")
    runs = pd.read_parquet(tmp_path / "tables" / "runs.parquet")
    assert list(runs["budget"]) == ["0.5", "r2"] and list(runs["status"]) == ["missing", "ok"]


# ------------------------------------------------------------------------------------------------
# Config and rules
# ------------------------------------------------------------------------------------------------

@pytest.fixture()
def cfg():
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def test_grid_budgets_mix_percentages_and_rank_equivalents(cfg):
    cfg["grid"]["budgets"] = [0.5, "r8", "r1"]
    out = pbconfig.validate(cfg)
    assert out["grid"]["budgets"] == [0.5, "r8", "r1"] and out["grid"]["budget_denominator"] == "backbone"
    over = pbconfig.merge(cfg, {"grid": {"budgets": ["0.6", "r2"], "budget_denominator": "backbone_without_embeddings"}})
    out = pbconfig.validate(over)  # --config strings, as Snakemake 9 passes them
    assert out["grid"]["budgets"] == [0.6, "r2"]
    assert out["grid"]["budget_denominator"] == "backbone_without_embeddings"


@pytest.mark.parametrize("budgets, message", [
    (["r0"], r"grid\.budgets\.0: budget 'r0'.*r<N>"),
    (["eight"], r"grid\.budgets\.0: budget 'eight'"),
    ([0.5, "0.5"], r"grid\.budgets\.1: '0\.5' is the same budget as grid\.budgets\.0"),
    (["100"], r"grid\.budgets\.0: .*full budget"),
    ([0.5, 120], r"grid\.budgets\.1"),
])
def test_bad_grid_budgets_name_key_and_value(cfg, budgets, message):
    cfg["grid"]["budgets"] = budgets
    with pytest.raises(pbconfig.ConfigError, match=message):
        pbconfig.validate(cfg)


def test_bad_denominator_names_key_and_allowed_values(cfg):
    cfg["grid"]["budget_denominator"] = "embeddings"
    with pytest.raises(pbconfig.ConfigError, match=r"grid\.budget_denominator: 'embeddings'.*backbone_without_embeddings"):
        pbconfig.validate(cfg)


def test_rules_write_rank_budgets_as_br_and_pass_the_denominator_to_percentage_runs(tmp_path, cfg):
    """A dry run of the real Snakefile: paths b2 / br2, `--budget r2`, and `--budget-denominator`
    (a tracked param) only where the budget is a percentage."""
    cfg["models"] = {"tiny": str(tmp_path / "no-model-needed-for-a-dry-run")}
    cfg["grid"].update(models=["tiny"], tasks=["stsb"], methods=["full", "lora"], seeds=[1], budgets=[2, "r2"],
                       budget_denominator="backbone_without_embeddings")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(tmp_path),
                           "--configfile", str(tmp_path / "config.yaml"), "--cores", "1", "-n", "-p",
                           "results/tables/runs.parquet"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    shells = [ln for ln in proc.stdout.splitlines() if "peftbench train" in ln]
    by_out = {ln.split("--out ")[1].split()[0]: ln for ln in shells}
    assert set(by_out) == {"results/runs/tiny/stsb/full/b100/s1", "results/runs/tiny/stsb/lora/b2/s1",
                           "results/runs/tiny/stsb/lora/br2/s1"}
    assert "--budget r2 " in by_out["results/runs/tiny/stsb/lora/br2/s1"]
    assert "--budget-denominator backbone_without_embeddings" in by_out["results/runs/tiny/stsb/lora/b2/s1"]
    assert "--budget-denominator" not in by_out["results/runs/tiny/stsb/lora/br2/s1"]
    assert "--budget-denominator" not in by_out["results/runs/tiny/stsb/full/b100/s1"]
