"""glora (gradient-norm-aware rank allocation), fwlora (Fisher-weighted LoRA) and their controls."""
import contextlib
import json
import math

import numpy as np
import pandas as pd
from conftest import recipe_args
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from peftbench.cli import main
from peftbench.methods import BuildContext, LoopState, get_method
from peftbench.methods.fwlora import FWLoRA, FWLoRAOptions, lora_update_sq_norm
from peftbench.methods.fwlora_uniform import FWLoRAUniform
from peftbench.methods.glora import (GLoRA, GLoRAOptions, allocate_ranks, balance_params, base_weights,
                                     lora_modules, refactor_update, resize_lora_module, warmup_length)
from peftbench.methods.glora_shuffled import GLoRAShuffled, permutation
from peftbench.methods.glora_uniform import GLoRAUniform
from peftbench.methods.options import OptionsError
from peftbench.models import Target, find_targets, load_classifier
from peftbench.optim import make_optimizer, make_scheduler, rebuild_optimizer
from peftbench.vocab import get_task


# ---------------------------------------------------------------------------------------------
# a toy model with two (or three) adapted Linear layers
# ---------------------------------------------------------------------------------------------
class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 5)
        self.other = nn.Linear(5, 4)

    def forward(self, x):
        return self.other(torch.tanh(self.proj(x)))


class Toy3(Toy):
    def __init__(self):
        super().__init__()
        self.third = nn.Linear(4, 4)

    def forward(self, x):
        return self.third(torch.tanh(super().forward(x)))


TOY_TARGETS = [Target("proj", 0, "query", 5, 6), Target("other", 0, "value", 4, 5)]
TOY3_TARGETS = TOY_TARGETS + [Target("third", 0, "key", 4, 4)]


def _toy(method_cls, r=2, targets=TOY_TARGETS, model_cls=Toy, total_steps=10, steps_per_epoch=5, seed=0,
         **options):
    """(method, peft-wrapped toy model); budget chosen so the uniform rank is ``r``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cost = sum(t.d_in + t.d_out for t in targets)
    ctx = BuildContext(task=get_task("stsb"), budget=r * cost / 10.0, backbone_params=1000, targets=targets,
                       head_modules=[], total_steps=total_steps, steps_per_epoch=steps_per_epoch, options=options,
                       seed=seed)
    method = method_cls(ctx)
    assert method.rank() == r
    model = get_peft_model(model_cls(), LoraConfig(r=r, lora_alpha=method.options.alpha, lora_dropout=0.0,
                                                   target_modules=[t.name for t in targets]))
    method.modules = lora_modules(model, targets)
    return method, model


def _learned(method, scale=1.0):
    """Pretend every B was learned (non-zero)."""
    with torch.no_grad():
        for m in method.modules:
            m.lora_B["default"].weight.normal_(0.0, scale)


def _delta(mod):
    """The module's dense update ΔW = s B A (d_out × d_in)."""
    return (mod.scaling["default"] * mod.lora_B["default"].weight @ mod.lora_A["default"].weight).detach()


def _truncate(w, m):
    """Best rank-m approximation of a dense matrix (Eckart-Young reference)."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return (u[:, :m] * s[:m]) @ vh[:m]


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    """Any tensor -> Python conversion (a host sync on a GPU) inside the block raises."""
    def boom(*a, **k):
        raise AssertionError("host read of a tensor inside a per-step hook")

    with monkeypatch.context() as mp:
        for name in ("__float__", "__int__", "__bool__", "item", "tolist", "numpy"):
            mp.setattr(torch.Tensor, name, boom)
        yield


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
# glora: re-factorisation and optimizer state
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("new_r", [6, 4, 2, 1, 0])
def test_refactor_keeps_the_top_singular_components(new_r):
    torch.manual_seed(3)
    A, B = torch.randn(4, 12, dtype=torch.float64), torch.randn(10, 4, dtype=torch.float64)
    rho = float(A.norm()) / 2.0  # RMS row norm of A (r = 4)
    a, b = refactor_update(A, B, new_r, c=1.5)
    m = min(4, new_r)
    assert a.shape == (new_r, 12) and b.shape == (10, new_r) and a.dtype == A.dtype
    # B'A' = c · best rank-m approximation of B A (all of it when growing)
    torch.testing.assert_close(b @ a, 1.5 * _truncate(B @ A, m), rtol=0, atol=1e-10)
    # kept rows of A: orthonormal directions at the old rows' RMS norm
    torch.testing.assert_close(a[:m] @ a[:m].T, rho ** 2 * torch.eye(m, dtype=torch.float64), rtol=0, atol=1e-10)
    if new_r > 4:  # components beyond the old rank: LoRA's init (A Kaiming-uniform, B zero)
        assert torch.all(b[:, 4:] == 0)
        assert 0 < a[4:].abs().max() <= 1 / math.sqrt(12)
    # a low-rank update survives any truncation that still holds its rank
    B1 = B[:, :1] @ torch.ones(1, 4, dtype=torch.float64)  # B A has rank 1
    if new_r >= 1:
        a1, b1 = refactor_update(A, B1, new_r)
        torch.testing.assert_close(b1 @ a1, B1 @ A, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="rank must be ≥ 0"):
        refactor_update(A, B, -1)


@pytest.mark.parametrize("new_r", [5, 3, 1])
def test_resize_module_keeps_the_update_under_the_alpha_over_r_rule(new_r):
    method, model = _toy(GLoRA, r=3)
    mod = method.modules[0]
    _learned(method)
    delta = _delta(mod)
    resize_lora_module(mod, new_r, alpha=16.0)  # preserve_update (default): ΔW kept / truncated
    assert mod.r["default"] == new_r and mod.scaling["default"] == 16.0 / new_r
    assert mod.lora_A["default"].weight.shape == (new_r, 6) and mod.lora_A["default"].weight.requires_grad
    assert mod.lora_B["default"].weight.shape == (5, new_r) and mod.lora_B["default"].weight.requires_grad
    torch.testing.assert_close(_delta(mod).double(), _truncate(delta, min(3, new_r)), rtol=0, atol=1e-5)
    method2, _ = _toy(GLoRA, r=3)
    _learned(method2)
    mod2 = method2.modules[0]
    delta2 = _delta(mod2)
    resize_lora_module(mod2, new_r, alpha=16.0, preserve_update=False)  # α/r rescales the kept update
    torch.testing.assert_close(_delta(mod2).double(), _truncate(delta2, min(3, new_r)) * 3 / new_r, rtol=0, atol=1e-5)


def test_defaults_are_the_seeds():
    g, f = GLoRAOptions(), FWLoRAOptions()
    assert (g.beta, g.estimator, g.min_rank, g.preserve_update, g.warmup_steps, g.warmup_fraction) == \
        (0.9, "exact", 0, True, None, None)
    assert (f.lam, f.beta, f.warmup_steps, f.warmup_fraction) == (1e-4, 0.98, 500, None)
    assert g.min_warmup_steps == f.min_warmup_steps == 20
    for name in ("glora", "glora_shuffled", "glora_uniform", "fwlora", "fwlora_uniform"):
        cls = get_method(name)
        assert cls.compilable and cls.identity_at_init
        assert cls.graph_variants == (2 if name.startswith("fwlora") else 3)  # + GLoRA's re-allocated modules
        assert cls.options_cls is (FWLoRAOptions if name.startswith("fwlora") else GLoRAOptions)
    assert GLoRAOptions.from_dict({"min_rank": 0}).min_rank == 0
    with pytest.raises(OptionsError, match=r"method_options\.glora\.min_rank: -1 — must be ≥ 0"):
        GLoRAOptions.from_dict({"min_rank": -1}, where="method_options.glora")
    with pytest.raises(OptionsError, match=r"min_warmup_steps: 0 — must be ≥ 1"):
        FWLoRAOptions.from_dict({"min_warmup_steps": 0})


def _reallocate(method, model, ema, lr=1e-2):
    """Three AdamW steps, then re-allocation with ``ema`` through the loop's own rebuild_optimizer."""
    opt = make_optimizer(method, model, lr, 0.01, torch.device("cpu"))
    state = LoopState(step=0, epoch=0, total_steps=10, steps_per_epoch=5, optimizer=opt,
                      scheduler=make_scheduler(opt, 0, 10))
    state.rebuild = lambda transfer=None: rebuild_optimizer(state, method, model, lr, 0.01, 0, 10,
                                                            torch.device("cpu"), transfer)
    for _ in range(3):
        model(torch.randn(4, 6)).pow(2).sum().backward()
        state.optimizer.step()
        state.scheduler.step()
        state.step += 1
        state.optimizer.zero_grad()
    method.ema = torch.tensor(ema)
    return state


def test_reallocation_leaves_the_model_output_unchanged():
    method, model = _toy(GLoRA, r=2)
    state = _reallocate(method, model, [3.0, 1.0])
    _learned(method)
    with torch.no_grad():  # the shrinking matrix's update has rank 1, so rank 1 holds it exactly
        b = method.modules[1].lora_B["default"].weight
        b.copy_(b[:, :1].expand_as(b))
    x = torch.randn(7, 6)
    before = model(x).detach()
    method.reallocate(state.rebuild_optimizer)
    assert method.ranks == [3, 1]  # proj grows 2 -> 3, other shrinks 2 -> 1
    torch.testing.assert_close(model(x).detach(), before, rtol=1e-5, atol=1e-6)


def test_resized_factors_start_with_fresh_adamw_state_unchanged_keep_theirs():
    method, model = _toy(GLoRA, r=2, targets=TOY3_TARGETS, model_cls=Toy3)
    state = _reallocate(method, model, [3.0, 2.0, 1.0])
    old = [(m.lora_A["default"].weight, m.lora_B["default"].weight) for m in method.modules]
    old_state = {id(p): {k: v.clone() for k, v in state.optimizer.state[p].items()} for pair in old for p in pair}
    assert method.reallocate(state.rebuild_optimizer) == [3, 2, 1]
    new = [(m.lora_A["default"].weight, m.lora_B["default"].weight) for m in method.modules]
    opt = state.optimizer
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in ids for pair in new for p in pair)
    assert all(id(p) not in ids for k in (0, 2) for p in old[k])  # replaced factors left the optimizer
    assert new[1][0] is old[1][0] and new[1][1] is old[1][1]  # rank unchanged: same parameters ...
    for p in new[1]:  # ... and their AdamW state
        assert torch.equal(opt.state[p]["step"], old_state[id(p)]["step"])
        assert torch.equal(opt.state[p]["exp_avg"], old_state[id(p)]["exp_avg"])
    for k in (0, 2):  # re-factorised: a new basis, fresh state (no step, no moments)
        assert all(p not in opt.state or not opt.state[p] for p in new[k])
    model(torch.randn(4, 6)).pow(2).sum().backward()
    opt.step()
    assert all(float(opt.state[p]["step"]) == 1.0 for k in (0, 2) for p in new[k])  # bias correction from 1
    assert float(opt.state[new[1][0]]["step"]) == 4.0


def test_rank_zero_matrix_has_no_adapter_and_no_parameters():
    method, model = _toy(GLoRA, r=2, targets=TOY3_TARGETS, model_cls=Toy3, param_tolerance=None)
    _learned(method)
    state = _reallocate(method, model, [5.0, 1.0, 0.0])
    assert method.reallocate(state.rebuild_optimizer) == [5, 1, 0]  # total rank 6 kept; zero score -> rank 0
    mod = method.modules[2]
    a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
    assert a.shape == (0, 4) and b.shape == (4, 0) and not a.requires_grad and not b.requires_grad
    assert mod.r["default"] == 0 and mod.scaling["default"] == 0.0
    x = torch.randn(3, 4)
    torch.testing.assert_close(mod(x), mod.get_base_layer()(x), rtol=0, atol=0)  # no contribution
    ids = {id(p) for g in state.optimizer.param_groups for p in g["params"]}
    assert id(a) not in ids and id(b) not in ids
    counts = method.param_counts(model)
    assert counts["adapter_params"] == 5 * (6 + 5) + 1 * (5 + 4) + 0
    assert not any("third" in n for n in method.state_to_save(model))
    df = method.tables(model)["ranks"]
    assert df["rank"].tolist() == [5.0, 1.0, 0.0] and df["rank"].sum() == 2 * 3
    model(torch.randn(4, 6)).pow(2).sum().backward()  # trains on with the empty adapter
    state.optimizer.step()
    # a checkpoint restores the allocation, the empty factors included
    method2 = _roundtrip(method, model, lambda: _toy(GLoRA, r=2, targets=TOY3_TARGETS, model_cls=Toy3,
                                                     param_tolerance=None))
    assert method2.ranks == [5, 1, 0] and method2.modules[2].lora_A["default"].weight.shape == (0, 4)


def _roundtrip(method, model, make):
    """Restore ``method``'s checkpoint state into a fresh ``make()`` pair the way the Checkpointer
    does (method state first, then the trainable parameters by name); the outputs must match."""
    saved = json.loads(json.dumps(method.checkpoint_state(model)))
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    method2, model2 = make()
    method2.restore_checkpoint_state(model2, saved)
    named = dict(model2.named_parameters())
    assert {n for n, p in named.items() if p.requires_grad} == set(params)
    with torch.no_grad():
        for n, t in params.items():
            named[n].copy_(t)
    x = torch.randn(5, 6)
    torch.testing.assert_close(model2(x), model(x), rtol=0, atol=0)
    assert method2.ranks == method.ranks and method2.scores() == method.scores()
    return method2


# ---------------------------------------------------------------------------------------------
# warm-up length
# ---------------------------------------------------------------------------------------------
def test_warmup_never_falls_to_one_batch_nor_past_half_the_run():
    assert warmup_length(1, 10, 20) == 5      # short run: floor min(20, 10 // 2)
    assert warmup_length(1, 100, 20) == 20    # floor
    assert warmup_length(500, 100, 20) == 50  # at most half the run
    assert warmup_length(500, 5000, 20) == 500
    assert warmup_length(3, 12, 1) == 3       # floor lowered on request
    assert warmup_length(0, 1, 20) == 1       # degenerate run: still one step

    def ctx(total, per_epoch, **options):
        return BuildContext(task=get_task("stsb"), budget=2.0, backbone_params=1000, targets=TOY_TARGETS,
                            head_modules=[], total_steps=total, steps_per_epoch=per_epoch, options=options)

    # FW-LoRA at its seed's K = 500, capped by the run
    assert FWLoRA(ctx(10, 5)).warmup == 5       # was round(0.1 · 10) = 1
    assert FWLoRA(ctx(100, 50)).warmup == 50
    assert FWLoRA(ctx(4000, 100)).warmup == 500
    assert FWLoRA(ctx(4000, 100, warmup_fraction=0.01)).warmup == 40  # smaller of the two
    assert FWLoRA(ctx(4000, 100, warmup_steps=2)).warmup == 20  # below the floor
    # GLoRA: the first epoch, at least 20 steps when the run allows it
    assert GLoRA(ctx(100, 2)).warmup == 20
    assert GLoRA(ctx(100, 30)).warmup == 30
    assert GLoRA(ctx(40, 30)).warmup == 20  # at most half the run
    assert GLoRA(ctx(1000, 30, warmup_fraction=0.1)).warmup == 100


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
        assert float(method.ema[k]) == pytest.approx(0.1 * ref, rel=1e-5)
        assert m.get_base_layer().weight.grad is None
        assert not m.get_base_layer().weight.requires_grad  # frozen again outside the step
    # end of warm-up: base weights frozen again, ranks re-allocated
    end = _state(method.warmup)
    end.rebuild = lambda transfer: None
    method.after_optimizer_step(model, end)
    assert method.reallocated and not any(w.requires_grad for w in base_weights(method.modules))


@pytest.mark.parametrize("estimator", ["exact", "lora"])
def test_glora_hooks_keep_the_ema_on_the_device(estimator, monkeypatch):
    """No tensor is read on the host in a warm-up step; the device EMA equals a float reference."""
    method, model = _toy(GLoRA, r=2, estimator=estimator)
    assert method.warmup == 5
    _learned(method, 0.1)
    opt = torch.optim.AdamW(method.parameter_groups(model, 0.0), lr=1e-2)
    ref = [0.0, 0.0]
    for step in range(3):
        state = _state(step)
        with no_host_reads(monkeypatch):
            method.on_step_start(model, state)
        loss = model(torch.randn(4, 6)).pow(2).sum()
        if estimator == "exact":
            grads = torch.autograd.grad(loss, base_weights(method.modules), retain_graph=True)
        loss.backward()
        if estimator == "exact":
            norms = [math.sqrt(float(g.double().pow(2).sum())) for g in grads]
        else:
            norms = [math.sqrt(float(m.lora_A["default"].weight.grad.double().pow(2).sum())
                               + float(m.lora_B["default"].weight.grad.double().pow(2).sum())) for m in method.modules]
        with no_host_reads(monkeypatch):
            method.after_backward(model, state)
        opt.step()
        state.step += 1
        with no_host_reads(monkeypatch):
            method.after_optimizer_step(model, state)
        opt.zero_grad()
        ref = [0.9 * e + 0.1 * n for e, n in zip(ref, norms)]
        assert torch.is_tensor(method.ema) and method.ema.dtype == torch.float32 and method.ema.shape == (2,)
        np.testing.assert_allclose(method.ema.numpy(), ref, rtol=1e-6)
    assert not method.reallocated and method.n_updates == 3


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
    method, model = _toy(FWLoRA, r=2, warmup_steps=2, warmup_fraction=None, lam=0.5, min_warmup_steps=1)
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
    assert all(torch.is_tensor(p) and p.ndim == 0 and not p.requires_grad for p in penalties[2:])
    assert sum(method.importance) == pytest.approx(1.0)
    assert all(f > 0 for f in method.fisher)
    assert all(torch.equal(a, b) for a, b in zip(w0, base_weights(method.modules)))
    assert not any(w.requires_grad for w in base_weights(method.modules))
    expected = 0.5 * sum((1 - i) * (m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight).pow(2).sum()
                         for m, i in zip(method.modules, method.importance))
    assert float(method.penalty().detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


@pytest.mark.parametrize("method_cls", [FWLoRA, FWLoRAUniform])
def test_fwlora_hooks_stay_on_the_device(method_cls, monkeypatch):
    """Fisher EMAs and the penalty are device tensors, read on the host only at the end of the
    warm-up; values equal a float reference; the control weights every matrix by 1/M."""
    method, model = _toy(method_cls, r=2, warmup_steps=3, lam=0.5, min_warmup_steps=1)
    assert method.warmup == 3
    _learned(method, 0.1)
    opt = torch.optim.AdamW(method.parameter_groups(model, 0.0), lr=1e-2)
    ref = [0.0, 0.0]
    for step in range(5):
        state = _state(step)
        with no_host_reads(monkeypatch):
            method.on_step_start(model, state)
            out = model(torch.randn(4, 6))
            extra = method.extra_loss(model, out, {}, state)
        loss = out.pow(2).sum() + (extra if extra is not None else 0.0)
        if step < 3:
            grads = torch.autograd.grad(loss, base_weights(method.modules), retain_graph=True)
            ref = [0.98 * f + 0.02 * float(g.double().pow(2).sum()) for f, g in zip(ref, grads)]
            assert extra is None and state.log["penalty"] == 0.0
        else:
            imp = method.importance
            dense = sum((1 - i) * _delta(m).double().pow(2).sum() for m, i in zip(method.modules, imp))
            pen = state.log["penalty"]
            assert torch.is_tensor(pen) and pen.ndim == 0 and not pen.requires_grad
            assert float(pen) == pytest.approx(0.5 * float(dense), rel=1e-5)
        loss.backward()
        with no_host_reads(monkeypatch):
            method.after_backward(model, state)
        opt.step()
        state.step += 1
        if state.step == method.warmup:  # the one host read: F_m -> I_m
            method.after_optimizer_step(model, state)
            assert torch.is_tensor(method.fisher)
            np.testing.assert_allclose(method.fisher.numpy(), ref, rtol=1e-5)
            expected = [1 / 2, 1 / 2] if method_cls is FWLoRAUniform else [f / sum(ref) for f in ref]
            assert method.importance == pytest.approx(expected, rel=1e-5)
        else:
            with no_host_reads(monkeypatch):
                method.after_optimizer_step(model, state)
        opt.zero_grad()
    assert not any(w.requires_grad or w.grad is not None for w in base_weights(method.modules))
    assert method.summary(model)["final_penalty"] > 0


# ---------------------------------------------------------------------------------------------
# mechanism controls
# ---------------------------------------------------------------------------------------------
def _method(cls, n=12, r0=4, seed=0, **options):
    """A method on ``n`` synthetic 64 × 64 targets at uniform rank ``r0`` (no model needed)."""
    targets = [Target(f"m{k}", k // 6, "query", 64, 64) for k in range(n)]
    ctx = BuildContext(task=get_task("stsb"), budget=r0 * n * 128 / 1e4, backbone_params=10**6, targets=targets,
                       head_modules=[], total_steps=100, steps_per_epoch=10, options=options, seed=seed)
    method = cls(ctx)
    assert method.r0 == r0
    return method


def test_shuffled_control_permutes_glora_scores_and_ranks():
    measured = list(np.random.default_rng(0).exponential(size=12))
    glora, shuffled = _method(GLoRA), _method(GLoRAShuffled, seed=7)
    perm = permutation(12, 7)
    assert sorted(perm) == list(range(12)) and perm != list(range(12))
    assert permutation(12, 7) == perm and permutation(12, 8) != perm  # fixed by the run's seed
    s_g, s_sh = glora.allocation_scores(measured), shuffled.allocation_scores(measured)
    assert s_sh == pytest.approx([s_g[p] for p in perm], rel=1e-12)
    r_g, r_sh = glora.target_ranks(s_g), shuffled.target_ranks(s_sh)
    assert r_sh == [r_g[p] for p in perm]  # a permutation of GLoRA's ranks for the same scores
    assert sorted(r_sh) == sorted(r_g) and sum(r_sh) == sum(r_g) == 12 * 4 and r_sh != r_g


def test_uniform_control_allocates_lora_ranks_and_refactors_every_module():
    measured = list(np.random.default_rng(0).exponential(size=12))
    uniform = _method(GLoRAUniform)
    assert uniform.allocation_scores(measured) == [1 / 12] * 12
    assert uniform.target_ranks(uniform.allocation_scores(measured)) == [4] * 12  # the uniform allocation
    method, model = _toy(GLoRAUniform, r=2, targets=TOY3_TARGETS, model_cls=Toy3)
    state = _reallocate(method, model, [3.0, 2.0, 1.0])
    _learned(method)
    old = [p for m in method.modules for p in (m.lora_A["default"].weight, m.lora_B["default"].weight)]
    x = torch.randn(7, 6)
    before = model(x).detach()
    assert method.reallocate(state.rebuild_optimizer) == [2, 2, 2]
    new = [p for m in method.modules for p in (m.lora_A["default"].weight, m.lora_B["default"].weight)]
    assert all(p is not q for p, q in zip(new, old))  # every module re-factorised ...
    assert all(p not in state.optimizer.state or not state.optimizer.state[p] for p in new)  # ... fresh AdamW
    torch.testing.assert_close(model(x).detach(), before, rtol=1e-5, atol=1e-6)  # ΔW unchanged at rank r0
    assert method.tables(model)["ranks"]["score"].tolist() == pytest.approx([1 / 3] * 3)
    _roundtrip(method, model, lambda: _toy(GLoRAUniform, r=2, targets=TOY3_TARGETS, model_cls=Toy3))


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
    assert (ranks["rank"] >= 0).all() and (ranks["rank"] <= 32).all()  # rank 0 allowed (min_rank 0)
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
    out = _train(tiny_model_dir, tiny_data, tmp_path, "fwlora", options={"warmup_steps": 3, "warmup_fraction": None,
                                                                     "lam": 1e-2, "min_warmup_steps": 1})
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


def test_controls_cli_share_glora_warmup_and_change_only_the_scores(tiny_model_dir, tiny_data, tmp_path):
    outs = {m: _train(tiny_model_dir, tiny_data, tmp_path, m) for m in ("glora", "glora_shuffled", "glora_uniform")}
    ranks = {}
    for m, out in outs.items():
        row, ranks[m] = _check_common(out, m)
        assert row["reallocated"] and row["warmup_steps"] == 6 and ranks[m]["rank"].sum() == 12 * row["rank"]
    # same seed, same warm-up: the measured EMAs are identical, only the allocation scores differ
    for m in ("glora_shuffled", "glora_uniform"):
        np.testing.assert_array_equal(ranks[m]["grad_norm_ema"], ranks["glora"]["grad_norm_ema"])
    perm = permutation(12, 1)
    np.testing.assert_allclose(ranks["glora_shuffled"]["score"], ranks["glora"]["score"].to_numpy()[perm], rtol=1e-12)
    assert (ranks["glora_uniform"]["rank"] == ranks["glora_uniform"]["initial_rank"]).all()
    assert ranks["glora_uniform"]["score"].tolist() == pytest.approx([1 / 12] * 12)
    # on this seed the shuffled allocation gives some matrices rank 0: they train with no adapter,
    # and adapter.safetensors still holds exactly the trainable count (_check_common)
    assert (ranks["glora_shuffled"]["rank"] == 0).any()


def test_fwlora_uniform_cli(tiny_model_dir, tiny_data, tmp_path):
    out = _train(tiny_model_dir, tiny_data, tmp_path, "fwlora_uniform", options={"lam": 1e-2})
    row, ranks = _check_common(out, "fwlora_uniform")
    assert row["warmup_steps"] == 6  # K = 500 capped at half the 12-step run
    assert ranks["importance"].tolist() == pytest.approx([1 / 12] * 12) and (ranks["fisher"] > 0).all()
    train = pd.read_parquet(out / "curve.parquet").query("kind == 'train'")
    assert (train.loc[train.step <= 6, "penalty"] == 0).all() and (train.loc[train.step > 6, "penalty"] > 0).all()
