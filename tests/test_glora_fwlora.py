"""glora (gradient-norm-aware rank allocation) and fwlora (Fisher-weighted LoRA)."""
import json

import numpy as np
import pandas as pd
from conftest import recipe_args
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from peftbench.cli import main
from peftbench.methods import BuildContext, LoopState
from peftbench.methods.fwlora import FWLoRA, lora_update_sq_norm
from peftbench.methods.glora import (GLoRA, allocate_ranks, balance_params, base_weights, lora_modules,
                                     resize_lora_module, transfer_adam_state)
from peftbench.models import Target, find_targets, load_classifier
from peftbench.vocab import get_task


# ---------------------------------------------------------------------------------------------
# a toy model with two adapted Linear layers
# ---------------------------------------------------------------------------------------------
class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 5)
        self.other = nn.Linear(5, 4)

    def forward(self, x):
        return self.other(torch.tanh(self.proj(x)))


TOY_TARGETS = [Target("proj", 0, "query", 5, 6), Target("other", 0, "value", 4, 5)]


def _toy(method_cls, r=2, **options):
    """(method, peft-wrapped toy model); budget chosen so the uniform rank is ``r``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cost = sum(t.d_in + t.d_out for t in TOY_TARGETS)  # 20 parameters per unit of rank
    ctx = BuildContext(task=get_task("stsb"), budget=r * cost / 10.0, backbone_params=1000, targets=TOY_TARGETS,
                       head_modules=[], total_steps=10, steps_per_epoch=5, options=options)
    method = method_cls(ctx)
    assert method.rank() == r
    model = get_peft_model(Toy(), LoraConfig(r=r, lora_alpha=method.options.alpha, lora_dropout=0.0,
                                             target_modules=["proj", "other"]))
    method.modules = lora_modules(model, TOY_TARGETS)
    return method, model


def _state(step=0):
    return LoopState(step=step, epoch=0, total_steps=10, steps_per_epoch=5)


# ---------------------------------------------------------------------------------------------
# glora: allocation
# ---------------------------------------------------------------------------------------------
def test_largest_remainder_sums_exactly_and_respects_caps():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 30))
        caps = [int(c) for c in rng.integers(1, 40, n)]
        scores = list(rng.exponential(size=n) * (rng.random(n) > 0.2))
        total = int(rng.integers(n, sum(caps) + 1))
        ranks = allocate_ranks(scores, total, caps, min_rank=1)
        assert sum(ranks) == total
        assert all(1 <= r <= c for r, c in zip(ranks, caps))
    # proportional when no bound binds: ideal 10·(0.5, 0.3, 0.2) = (5, 3, 2)
    assert allocate_ranks([0.5, 0.3, 0.2], 10, [10, 10, 10]) == [5, 3, 2]
    # largest remainder: ideal (3.5, 3.3, 3.2) -> floors (3, 3, 3), one unit to the largest fraction
    assert allocate_ranks([0.35, 0.33, 0.32], 10, [10, 10, 10]) == [4, 3, 3]
    # cap on the first (ideal 10 > 8): the 2 units it cannot hold go to the others in proportion
    r = allocate_ranks([0.5, 0.3, 0.1, 0.1, 0.0], 20, [8] * 5)
    assert r == [8, 7, 2, 2, 1] and sum(r) == 20  # zero score still gets min_rank 1
    with pytest.raises(ValueError, match="cannot be split"):
        allocate_ranks([1.0, 1.0], 20, [8, 8])


def test_balance_params_keeps_total_rank_and_enters_window():
    costs = [10, 10, 50, 50]
    ranks = [1, 1, 7, 7]  # 720 params; uniform rank 4 would be 480
    out = balance_params(ranks, [1, 1, 7, 7], costs, [32] * 4, lo=0.9 * 480, hi=1.1 * 480)
    assert sum(out) == sum(ranks)  # total rank unchanged
    assert sum(r * c for r, c in zip(out, costs)) == 520  # 5 moves of 40 parameters, stops inside
    assert out[2] + out[3] == 9 and min(out) >= 1
    assert balance_params(ranks, ranks, costs, [32] * 4, lo=0, hi=1e9) == ranks  # already within


# ---------------------------------------------------------------------------------------------
# glora: resizing
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preserve_update", [False, True])
@pytest.mark.parametrize("new_r", [5, 1])
def test_resize_keeps_components_and_forward(new_r, preserve_update):
    method, model = _toy(GLoRA, r=3)
    mod = method.modules[0]
    with torch.no_grad():
        mod.lora_B["default"].weight.normal_()  # pretend B was learned (non-zero)
    a0 = mod.lora_A["default"].weight.detach().clone()
    b0 = mod.lora_B["default"].weight.detach().clone()
    x = torch.randn(7, 6)
    base = mod.get_base_layer()(x).detach()
    delta_old = (mod(x) - base).detach()
    resize_lora_module(mod, new_r, alpha=16.0, preserve_update=preserve_update)
    a1, b1 = mod.lora_A["default"].weight, mod.lora_B["default"].weight
    m = min(3, new_r)
    assert a1.shape == (new_r, 6) and b1.shape == (5, new_r)
    assert mod.r["default"] == new_r and mod.scaling["default"] == 16.0 / new_r
    assert torch.equal(a1[:m], a0[:m])  # kept rows of A bitwise
    c = (16.0 / 3) / (16.0 / new_r)
    assert torch.equal(b1[:, :m], b0[:, :m] * c if preserve_update else b0[:, :m])
    if new_r > 3:
        assert torch.all(b1[:, 3:] == 0)  # new components: B zero, A random
        assert a1[3:].abs().sum() > 0
        delta_new = (mod(x) - base).detach()
        if preserve_update:
            assert torch.allclose(delta_new, delta_old, atol=1e-6)
            assert torch.allclose(mod(x), base + delta_old, atol=1e-6)  # forward unchanged
        else:
            # learned components bitwise; new ones add nothing; only the α/r factor changes
            assert torch.allclose(delta_new, delta_old * (3 / new_r), atol=1e-6)
    assert a1.requires_grad and b1.requires_grad


def test_adamw_state_of_kept_slices_is_carried_over():
    method, model = _toy(GLoRA, r=2)
    opt = torch.optim.AdamW(method.parameter_groups(model, 0.01), lr=1e-2)
    for _ in range(3):
        model(torch.randn(4, 6)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    old = [(m.lora_A["default"].weight, m.lora_B["default"].weight) for m in method.modules]
    old_state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for pair in old for p in pair}
    method.ema = [3.0, 1.0]  # total rank 4 -> (3, 1): proj grows, other shrinks
    holder = {}

    def rebuild(transfer):
        new = torch.optim.AdamW(method.parameter_groups(model, 0.01), lr=1e-2)
        transfer(opt, new)
        holder["opt"] = new

    assert method.reallocate(rebuild) == [3, 1]
    new_opt = holder["opt"]
    for (a_old, b_old), mod in zip(old, method.modules):
        a_new, b_new = mod.lora_A["default"].weight, mod.lora_B["default"].weight
        m = min(a_old.shape[0], a_new.shape[0])
        for p_old, p_new, dim in ((a_old, a_new, 0), (b_old, b_new, 1)):
            so, sn = old_state[id(p_old)], new_opt.state[p_new]
            assert torch.equal(sn["step"], so["step"])
            for key in ("exp_avg", "exp_avg_sq"):
                assert sn[key].shape == p_new.shape
                assert torch.equal(sn[key].narrow(dim, 0, m), so[key].narrow(dim, 0, m))
                assert torch.all(sn[key].narrow(dim, m, p_new.shape[dim] - m) == 0)
    ids = {id(p) for g in new_opt.param_groups for p in g["params"]}
    assert all(id(p) not in ids for pair in old for p in pair)
    model(torch.randn(4, 6)).pow(2).sum().backward()
    new_opt.step()  # the rebuilt optimizer runs on the resized parameters


def test_transfer_rescales_moments_with_preserve_update():
    old, new = nn.Parameter(torch.ones(3, 2)), nn.Parameter(torch.ones(3, 4))
    o1, o2 = torch.optim.AdamW([old]), torch.optim.AdamW([new])
    o1.state[old] = {"step": torch.tensor(5.0), "exp_avg": torch.full((3, 2), 2.0), "exp_avg_sq": torch.full((3, 2), 4.0)}
    transfer_adam_state(o1, o2, [(old, new, 1, 2.0)])
    assert torch.equal(o2.state[new]["exp_avg"][:, :2], torch.full((3, 2), 1.0))
    assert torch.equal(o2.state[new]["exp_avg_sq"][:, :2], torch.full((3, 2), 1.0))
    assert torch.all(o2.state[new]["exp_avg"][:, 2:] == 0)


# ---------------------------------------------------------------------------------------------
# glora: estimators
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["exact", "lora"])
def test_estimators_match_dense_reference(estimator):
    method, model = _toy(GLoRA, r=2, estimator=estimator, beta=0.9)
    with torch.no_grad():
        for m in method.modules:
            m.lora_B["default"].weight.normal_()
    captured = {}

    def hook(mod, inp, out):
        out.retain_grad()
        captured[mod] = (inp[0].detach(), out)

    hs = [m.register_forward_hook(hook) for m in method.modules]
    state = _state(0)
    method.on_step_start(model, state)
    if estimator == "exact":
        assert all(w.requires_grad for w in base_weights(method.modules))
        ids = {id(p) for g in method.parameter_groups(model, 0.0) for p in g["params"]}
        assert not any(id(w) in ids for w in base_weights(method.modules))  # never optimised
    x = torch.randn(2, 3, 6)  # batch × tokens × features: the gradient sums over both
    model(x).pow(2).sum().backward()
    lora_ref = [float(torch.sqrt(m.lora_A["default"].weight.grad.pow(2).sum()
                                 + m.lora_B["default"].weight.grad.pow(2).sum())) for m in method.modules]
    method.after_backward(model, state)
    for h in hs:
        h.remove()
    for k, m in enumerate(method.modules):
        xin, out = captured[m]
        dense = out.grad.reshape(-1, out.shape[-1]).T @ xin.reshape(-1, xin.shape[-1])  # ∂L/∂W = δᵀx
        ref = float(dense.norm()) if estimator == "exact" else lora_ref[k]
        assert method.ema[k] == pytest.approx(0.1 * ref, rel=1e-5)
        assert m.get_base_layer().weight.grad is None
    # end of warm-up: base weights frozen again, ranks re-allocated
    end = _state(method.warmup)
    end.rebuild = lambda transfer: None
    method.after_optimizer_step(model, end)
    assert method.reallocated and not any(w.requires_grad for w in base_weights(method.modules))


# ---------------------------------------------------------------------------------------------
# fwlora: maths
# ---------------------------------------------------------------------------------------------
def test_rxr_penalty_equals_dense_norm():
    torch.manual_seed(1)
    A, B = torch.randn(4, 30, dtype=torch.float64), torch.randn(20, 4, dtype=torch.float64)
    s = 16 / 4
    dense = (s * B @ A).pow(2).sum()
    assert torch.allclose(lora_update_sq_norm(A, B, s), dense, rtol=1e-12)


def test_fwlora_penalty_and_importance_on_toy():
    method, model = _toy(FWLoRA, r=2, warmup_steps=2, warmup_fraction=None, lam=0.5)
    assert method.warmup == 2
    w0 = [w.detach().clone() for w in base_weights(method.modules)]
    opt = torch.optim.AdamW(method.parameter_groups(model, 0.01), lr=1e-2)
    penalties = []
    for step in range(5):
        state = _state(step)
        method.on_step_start(model, state)
        out = model(torch.randn(4, 6))
        loss = out.pow(2).sum()
        extra = method.extra_loss(model, out, {}, state)
        if extra is not None:
            loss = loss + extra
        penalties.append(state.log["penalty"])
        loss.backward()
        method.after_backward(model, state)
        assert all(w.grad is None for w in base_weights(method.modules))
        opt.step()
        state.step += 1
        method.after_optimizer_step(model, state)
        opt.zero_grad()
    assert penalties[:2] == [0.0, 0.0] and all(p > 0 for p in penalties[2:])
    assert sum(method.importance) == pytest.approx(1.0)
    assert all(f > 0 for f in method.fisher)
    assert all(torch.equal(a, b) for a, b in zip(w0, base_weights(method.modules)))
    assert not any(w.requires_grad for w in base_weights(method.modules))
    expected = 0.5 * sum((1 - i) * (m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight).pow(2).sum()
                         for m, i in zip(method.modules, method.importance))
    assert float(method.penalty().detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# end to end through the CLI on the tiny BERT
# ---------------------------------------------------------------------------------------------
def _train(tiny_model_dir, tiny_data, tmp_path, method, task="stsb", budget=1.0, seed=1, options=None, **recipe):
    rec = {"lr": 1e-3, "epochs": 2, "batch_size": 16, "max_train_samples": 96, "max_eval_samples": 64,
           "log_every": 1, "method_options": options or {}, **recipe}
    out = tmp_path / f"{method}-{task}-{seed}"
    main(["train", "--model-name", "tiny", "--model", str(tiny_model_dir), "--task", task, "--method", method,
          "--budget", str(budget), "--seed", str(seed), "--train", str(tiny_data[task]["train"]),
          "--dev", f"validation={tiny_data[task]['validation']}", *recipe_args(rec), "--out", str(out)])
    return out


def _check_common(out, method):
    row = pd.read_parquet(out / "metrics.parquet").iloc[0]
    assert row["method"] == method and row["status"] == "ok" and -1 <= row["dev_main"] <= 1
    assert row["capacity_limited"] in (False, np.False_)
    budget_params = row["budget_params"]  # the budget's parameter count (1 % of the backbone here)
    assert budget_params == pytest.approx(float(row["budget"]) / 100 * row["backbone_params"])
    assert abs(row["adapter_params"] - budget_params) <= 0.1 * budget_params  # ±10 % budget rule
    adapter = load_file(out / "adapter.safetensors")
    assert sum(v.numel() for v in adapter.values()) == row["trainable_params"]
    ranks = pd.read_parquet(out / "ranks.parquet")
    assert len(ranks) == 12 and {"module", "layer", "kind", "rank", "score"} <= set(ranks.columns)
    return row, ranks


def test_glora_cli_reallocates_ranks(tiny_model_dir, tiny_data, tmp_path):
    out = _train(tiny_model_dir, tiny_data, tmp_path, "glora")
    row, ranks = _check_common(out, "glora")
    r0 = row["rank"]
    assert row["reallocated"] and row["warmup_steps"] == 6  # first epoch of 6 steps
    assert ranks["rank"].sum() == 12 * r0  # total rank fixed exactly
    assert ranks["rank"].nunique() > 1  # ranks differ across modules after warm-up
    assert (ranks["rank"] >= 1).all() and (ranks["rank"] <= 32).all()
    assert ranks["score"].sum() == pytest.approx(1.0)
    assert (ranks["grad_norm_ema"] > 0).all()
    tiny_cost = {"query": 64, "key": 64, "value": 64, "attention_output": 64, "intermediate": 96, "output": 96}
    assert row["adapter_params"] == sum(r * tiny_cost[k] for r, k in zip(ranks["rank"], ranks["kind"]))


def test_fwlora_cli_columns_penalty_and_frozen_base(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    seen = {}
    orig = FWLoRA.summary

    def keep_model(self, model):
        seen["model"], seen["method"] = model, self
        return orig(self, model)

    monkeypatch.setattr(FWLoRA, "summary", keep_model)
    out = _train(tiny_model_dir, tiny_data, tmp_path, "fwlora", options={"warmup_steps": 3, "warmup_fraction": None, "lam": 1e-2})
    row, ranks = _check_common(out, "fwlora")
    assert row["warmup_steps"] == 3
    assert {"fisher", "importance"} <= set(ranks.columns)
    assert ranks["importance"].sum() == pytest.approx(1.0)
    assert (ranks["score"] == ranks["importance"]).all() and (ranks["rank"] == row["rank"]).all()
    assert (ranks["fisher"] > 0).all()
    curve = pd.read_parquet(out / "curve.parquet")
    train = curve[curve.kind == "train"].sort_values("step")
    assert (train.loc[train.step <= 3, "penalty"] == 0).all()
    assert (train.loc[train.step > 3, "penalty"] > 0).all()
    # frozen pretrained weights bitwise unchanged after training
    fresh = load_classifier(str(tiny_model_dir), get_task("stsb"))
    fresh_mods = dict(fresh.named_modules())
    mods = lora_modules(seen["model"], find_targets(fresh))
    for t, m in zip(find_targets(fresh), mods):
        assert torch.equal(m.get_base_layer().weight.cpu(), fresh_mods[t.name].weight)
        assert torch.equal(m.get_base_layer().bias.cpu(), fresh_mods[t.name].bias)
        assert not m.get_base_layer().weight.requires_grad
    emb = seen["model"].base_model.model.bert.embeddings.word_embeddings.weight
    assert torch.equal(emb, fresh.bert.embeddings.word_embeddings.weight)
