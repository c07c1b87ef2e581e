"""dynacsg (dynamic conditional spectral gates) and phased (phase-wise LoRA switching) on a tiny BERT."""
import contextlib
import copy
import json
import math

import numpy as np
import pandas as pd
from conftest import recipe_args
import pytest
import torch

from peftbench.cli import main
from peftbench.methods import BuildContext, LoopState, get_method
from peftbench.methods.dynacsg import (DynamicSpectralLinear, GateHyperNetwork, choose_size, gumbel_sigmoid_st,
                                       spectral_correction)
from peftbench.methods.phased import STRATEGIES, boundary_steps, phase_at
from peftbench.methods.options import OptionsError
from peftbench.models import backbone_param_count, find_targets, head_module_names, is_head_param, load_classifier
from peftbench.svd import compute_svd, load_factors
from peftbench.vocab import get_task
from peftbench.train import gradient_norms, train_step


@pytest.fixture(scope="module")
def tiny_svd(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("svd")
    compute_svd(str(tiny_model_dir), "tiny", 64, out / "factors.safetensors", out / "spectrum.parquet", device="cpu")
    return out / "factors.safetensors"


def _ctx(model, method, budget=2.0, total_steps=12, options=None, svd=None):
    return BuildContext(task=get_task("stsb"), budget=budget, backbone_params=backbone_param_count(model),
                        targets=find_targets(model), head_modules=head_module_names(model), total_steps=total_steps,
                        steps_per_epoch=total_steps, options=options or {}, seed=0, svd_path=svd)


def _build(tiny_model_dir, key, **kw):
    torch.manual_seed(0)
    model = load_classifier(str(tiny_model_dir), get_task("stsb"))
    ctx = _ctx(model, key, **kw)
    method = get_method(key)(ctx)
    model = method.build(model)
    model.train()
    return model, method, ctx


def _batch(n=2, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (n, T), generator=g)
    ids[:, 0] = 101
    return {"input_ids": ids, "attention_mask": torch.ones(n, T, dtype=torch.long),
            "labels": torch.rand(n, generator=g) * 5}


def _train(tiny_model_dir, tiny_data, tmp_path, method, svd=None, task="stsb", budget=2.0, **recipe):
    rec = {"lr": 1e-3, "epochs": 2, "batch_size": 16, "max_train_samples": 96, "max_eval_samples": 64,
           "log_every": 2, **recipe}
    out = tmp_path / f"{method}-{task}"
    args = ["train", "--model-name", "tiny", "--model", str(tiny_model_dir), "--task", task, "--method", method,
            "--budget", str(budget), "--seed", "1", "--train", str(tiny_data[task]["train"]),
            "--dev", f"validation={tiny_data[task]['validation']}", *recipe_args(rec), "--out", str(out)]
    if svd is not None:
        args += ["--svd", str(svd)]
    main(args)
    return out


# ---------------------------------------------------------------- dynacsg ------------------------------------
def test_per_example_correction_matches_dense_reference(tiny_model_dir, tiny_svd):
    model, method, ctx = _build(tiny_model_dir, "dynacsg", svd=tiny_svd)
    t = ctx.targets[4]  # intermediate: 32 -> 64
    lin = method.linears[t.name]
    assert isinstance(lin, DynamicSpectralLinear)
    r, alpha = method.rank, method.options.alpha
    U, S, Vh = load_factors(tiny_svd, t.name)
    U, S, Vh = U[:, :r], S[:r], Vh[:r]
    x = torch.randn(2, 5, t.d_in)
    g = torch.stack([torch.ones(r), (torch.arange(r) % 3 == 0).float()])  # 2 examples, different gates
    lin.gate = g
    y = lin(x)
    W, bias = lin.base.weight.detach(), lin.base.bias.detach()
    for b in range(2):  # materialise W_b = W + α U diag(S ⊙ g_b) Vh (test only)
        Wb = W + alpha * U @ torch.diag(S * g[b]) @ Vh
        assert torch.allclose(y[b], x[b] @ Wb.T + bias, atol=1e-5)
    # Ŝ = S(1 + αg): with all gates on, the top-r part of W is scaled by (1 + α)
    full = spectral_correction(x, U, S, Vh, torch.ones(2, r), alpha)
    assert torch.allclose(full, alpha * x @ (U @ torch.diag(S) @ Vh).T, atol=1e-5)
    with pytest.raises(ValueError):
        spectral_correction(x, U, S, Vh, torch.ones(3, r), alpha)


@contextlib.contextmanager
def _gates_seen(method):
    """``{target name: gate}``: the gate each wrapped linear multiplied by in the last forward
    (recorded as it runs: the layer hooks clear ``lin.gate`` once the layer is done)."""
    seen = {}
    handles = [lin.register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, m.gate))
               for n, lin in method.linears.items()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def test_eval_gates_deterministic_and_train_gates_straight_through(tiny_model_dir, tiny_svd):
    model, method, ctx = _build(tiny_model_dir, "dynacsg", svd=tiny_svd)
    batch = _batch()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.eval()
    with torch.no_grad(), _gates_seen(method) as seen:
        model(**inputs)
        g1 = {n: g.clone() for n, g in seen.items()}
        model(**inputs)
        g2 = {n: g.clone() for n, g in seen.items()}
    assert g1.keys() == set(method.linears)
    assert all(lin.gate is None for lin in method.linears.values())  # cleared after each layer
    for n in g1:
        assert g1[n].shape == (2, method.rank)
        assert set(g1[n].unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(g1[n], g2[n])
    # eval mask = 1[logit > 0] of the hypernetwork on the [CLS] state entering the layer
    with torch.no_grad():
        hs = model(**inputs, output_hidden_states=True).hidden_states
        logits0 = method.hyper(hs[0][:, 0, :], 0)
    q0 = ctx.targets[0].name
    assert torch.equal(g1[q0], (logits0[:, 0, :] > 0).float())

    model.train()
    state = LoopState(step=0, epoch=0, total_steps=12, steps_per_epoch=12)
    method.on_step_start(model, state)
    with _gates_seen(method) as seen:
        out = model(**batch)
    for g in seen.values():
        assert set(g.detach().unique().tolist()) <= {0.0, 1.0}  # forward values are hard
        assert g.requires_grad
    pen = method.extra_loss(model, out, batch, state)
    assert pen.item() > 0 and state.log["gate_penalty"] > 0
    out.loss.backward()  # task loss only: gradient reaches the hypernetwork through the gates
    for name in ("fc1.weight", "fc2.weight", "layer_embedding.weight"):
        grad = dict(method.hyper.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # the encoder itself stays frozen
    assert all(not p.requires_grad for n, p in model.named_parameters()
               if "dynacsg" not in n and "classifier" not in n and "pooler" not in n)


def test_penalty_is_lambda_times_expected_open_gates(tiny_model_dir, tiny_svd):
    model, method, ctx = _build(tiny_model_dir, "dynacsg", svd=tiny_svd, options={"lam": 0.01})
    for mod in model.modules():  # no dropout: the reference forward sees the same contexts
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    batch = _batch(n=3)
    state = LoopState(step=0, epoch=0, total_steps=12, steps_per_epoch=12)
    method.on_step_start(model, state)
    with torch.no_grad():
        hs = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=True).hidden_states
        expected = sum(torch.sigmoid(method.hyper(hs[l][:, 0, :], l)).sum(dim=(1, 2)) for l in range(2)).mean()
    method.on_step_start(model, state)
    out = model(**batch)
    pen = method.extra_loss(model, out, batch, state)
    assert pen.item() > 0
    assert pen.item() == pytest.approx(0.01 * expected.item(), rel=1e-5)
    pen.backward()
    assert method.hyper.fc2.bias.grad.abs().sum() > 0


def test_gumbel_sigmoid_is_hard_forward_soft_backward():
    logits = torch.randn(4, 8, requires_grad=True)
    g = gumbel_sigmoid_st(logits, 0.5, torch.Generator().manual_seed(0))
    assert set(g.detach().unique().tolist()) <= {0.0, 1.0}
    (g * torch.arange(8.0)).sum().backward()
    assert logits.grad.abs().sum() > 0


def test_dynacsg_parameter_count_matches_budget(tiny_model_dir, tiny_svd):
    # seed default: r = 8 gates per matrix, only the hypernetwork's width is solved for the budget
    model, method, ctx = _build(tiny_model_dir, "dynacsg", svd=tiny_svd)
    n = method.param_counts(model)["adapter_params"]
    assert method.rank == 8 and n == GateHyperNetwork.count(32, 2, 6, 8, method.hidden) and method.hidden > 64
    assert abs(n - ctx.budget_params) <= 0.1 * ctx.budget_params
    s = method.summary(model)
    assert s["capacity_limited"] is False and s["outside_budget"] is False and s["gates_per_matrix"] == 8
    # rank: null derives r from the budget as well
    model, method, ctx = _build(tiny_model_dir, "dynacsg", svd=tiny_svd, options={"rank": None})
    counts = method.param_counts(model)
    n = GateHyperNetwork.count(32, 2, 6, method.rank, method.hidden)
    assert counts["adapter_params"] == n == sum(p.numel() for p in method.hyper.parameters())
    assert counts["head_params"] == sum(p.numel() for name, p in model.named_parameters()
                                        if p.requires_grad and ("classifier" in name or "pooler" in name))
    assert method.rank == 32  # capped at min(d) = 32 of the tiny model, so the hidden width grew
    assert abs(n - ctx.budget_params) <= 0.1 * ctx.budget_params
    assert method.summary(model)["capacity_limited"] is False
    # MiniLM-sized: d=384, 6 layers, 6 matrices per layer, 64 stored singular values, 0.5 % of 22.6M
    B = 0.005 * 22_600_000
    r, H = choose_size(B, 384, 6, 6, 64, 64)
    assert abs(GateHyperNetwork.count(384, 6, 6, r, H) - B) <= 0.1 * B and r == 64
    r, H = choose_size(B, 384, 6, 6, 64, 64, grow_hidden=False)
    assert (r, H) == (64, 64) and GateHyperNetwork.count(384, 6, 6, r, H) < 0.9 * B  # capacity limited
    r, H = choose_size(0.001 * 22_600_000, 384, 6, 6, 64, 64)  # tiny budget: width shrinks
    assert abs(GateHyperNetwork.count(384, 6, 6, r, H) - 22_600) <= 2260 and H < 64


def test_dynacsg_cli_writes_active_gates(tiny_model_dir, tiny_data, tiny_svd, tmp_path):
    out = _train(tiny_model_dir, tiny_data, tmp_path, "dynacsg", svd=tiny_svd)
    row = pd.read_parquet(out / "metrics.parquet").iloc[0]
    ranks = pd.read_parquet(out / "ranks.parquet")
    assert len(ranks) == 12 and {"rank", "gates", "active_frac"} <= set(ranks.columns)
    r = row["gates_per_matrix"]
    assert ranks["rank"].between(0, r).all() and (ranks["gates"] == r).all()
    assert row["mean_active_gates"] == pytest.approx(ranks["rank"].mean())
    assert row["mean_active_gates_per_layer"] == pytest.approx(ranks.groupby("layer")["rank"].sum().mean())
    assert row["latency_ratio"] > 0 and row["capacity_limited"] in (False, 0)
    assert abs(row["adapter_params"] - 0.02 * row["backbone_params"]) <= 0.1 * 0.02 * row["backbone_params"]
    curve = pd.read_parquet(out / "curve.parquet")
    assert (curve.loc[curve.kind == "train", "gate_penalty"] > 0).all()


def _build_task(tiny_model_dir, key, task="sst2", budget=2.0, svd=None, **options):
    """(model, reference, method) of ``key`` on ``task`` (the reference: the same pretrained model)."""
    torch.manual_seed(0)
    model = load_classifier(str(tiny_model_dir), get_task(task))
    reference = copy.deepcopy(model)
    ctx = BuildContext(task=get_task(task), budget=budget, backbone_params=backbone_param_count(model),
                       targets=find_targets(model), head_modules=head_module_names(model), total_steps=12,
                       steps_per_epoch=12, options=options, seed=0, svd_path=svd)
    method = get_method(key)(ctx)
    return method.build(model), reference, method


def _cls_batch(n=4, T=9, seed=0):
    b = _batch(n=n, T=T, seed=seed)
    b["labels"] = torch.arange(n) % 2
    return b


def _forbid_host_reads(mp):
    """Make every tensor → host read (float(), .item(), .tolist(), .cpu(), .numpy()) raise."""

    def boom(*a, **k):
        raise AssertionError("host sync in a training hook")

    for name in ("__float__", "item", "tolist", "cpu", "numpy"):
        mp.setattr(torch.Tensor, name, boom)


def test_dynacsg_seed_defaults_close_every_gate_at_init(tiny_model_dir, tiny_svd):
    """Seed 002: r_b = 8, λ = 1e-4, threshold offset −3: identity at init, and the expected-L0
    penalty starts far below the task loss (it used to be ~3× the task loss, and the gates collapsed)."""
    model, reference, method = _build_task(tiny_model_dir, "dynacsg", svd=tiny_svd)
    o = method.options
    assert (o.rank, o.lam, o.init_logit) == (8, 1e-4, -3.0) and method.rank == 8
    assert torch.equal(method.hyper.fc2.bias.detach(), torch.full((6 * 8,), -3.0))
    batch = _cls_batch()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.eval(), reference.eval()
    with torch.no_grad():
        with _gates_seen(method) as seen:
            torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits, rtol=0, atol=1e-6)
        assert len(seen) == len(method.linears) and all(float(g.sum()) == 0 for g in seen.values())  # all closed
        hs = model(**inputs, output_hidden_states=True).hidden_states
        logits = torch.stack([method.hyper(hs[l][:, 0, :], l) for l in range(2)])
    margin = float((logits + 3).abs().max())
    assert margin < 1.0  # |W2 h| at init stays far below the offset
    model.train()
    state = LoopState(step=0, epoch=0, total_steps=12, steps_per_epoch=12)
    method.on_step_start(model, state)
    out = model(**batch)
    pen = float(method.extra_loss(model, out, batch, state).detach())
    assert 0 < pen < 0.1 * float(out.loss.detach()) and pen < 0.1 * math.log(2)
    assert pen == pytest.approx(1e-4 * 2 * 6 * 8 * torch.sigmoid(torch.tensor(-3.0)).item(), rel=0.5)
    assert float(state.log["mean_k"]) == 0.0
    # DeBERTa-v3-base: 72 matrices × 8 gates; even with logits `margin` above the offset, < 0.1 × task loss
    assert 1e-4 * 72 * 8 * torch.sigmoid(torch.tensor(-3.0 + margin)).item() < 0.1 * math.log(2)
    with pytest.raises(OptionsError, match="init_logit"):
        get_method("dynacsg").options_cls.from_dict({"init_logit": 0.5}, where="method_options.dynacsg")


def test_dynacsg_logs_mean_k_on_the_device(tiny_model_dir, tiny_svd, monkeypatch):
    """⟨k⟩ (open gates per matrix under the inference mask) is logged every step as a device
    tensor; no hook reads a tensor on the host (training forward, penalty, dev-gate collection)."""
    model, _, method = _build_task(tiny_model_dir, "dynacsg", svd=tiny_svd)
    with torch.no_grad():  # logits = b2 exactly: gates 0..2 of every matrix open, the rest closed
        method.hyper.fc2.weight.zero_()
        method.hyper.fc2.bias.copy_(torch.tensor([20.0] * 3 + [-20.0] * 5).repeat(6))
    batch = _cls_batch()
    state = LoopState(step=0, epoch=0, total_steps=12, steps_per_epoch=12)
    model.train()
    method.on_step_start(model, state)
    with monkeypatch.context() as mp:
        _forbid_host_reads(mp)
        out = model(**batch)
        method.extra_loss(model, out, batch, state)
    assert {"gate_penalty", "expected_gate_frac", "mean_k", "mean_k_sampled"} <= set(state.log)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in state.log.values())
    assert float(state.log["mean_k"]) == 3.0 and float(state.log["mean_k_sampled"]) == 3.0  # |noise| < 20
    assert float(state.log["expected_gate_frac"]) == pytest.approx(3 / 8, rel=1e-6)
    model.eval()
    method.on_eval_start(model)
    with monkeypatch.context() as mp, torch.no_grad():
        _forbid_host_reads(mp)
        model(**{k: v for k, v in batch.items() if k != "labels"})
    method.on_eval_end(model)  # one transfer per evaluation, here
    assert method.active_per_matrix() == [3.0] * 12


def test_dynacsg_cli_logs_mean_k_every_logged_step(tiny_model_dir, tiny_data, tiny_svd, tmp_path):
    out = _train(tiny_model_dir, tiny_data, tmp_path, "dynacsg", svd=tiny_svd, task="sst2", epochs=1)
    curve = pd.read_parquet(out / "curve.parquet")
    train = curve[curve.kind == "train"]
    assert len(train) == 3  # 6 steps, logged every 2
    for col in ("mean_k", "mean_k_sampled", "gate_penalty", "expected_gate_frac"):
        assert train[col].notna().all(), col
    assert train["mean_k"].between(0, 8).all() and (train["gate_penalty"] < 0.1 * train["loss"]).all()
    row = pd.read_parquet(out / "metrics.parquet").iloc[0]
    assert row["gates_per_matrix"] == 8 and not row["outside_budget"]


def test_dynacsg_rank_beyond_the_stored_factors_is_an_error(tiny_model_dir, tmp_path):
    compute_svd(str(tiny_model_dir), "tiny", 4, tmp_path / "f.safetensors", tmp_path / "s.parquet", device="cpu")
    for key in ("dynacsg", "dynacsg_static"):
        with pytest.raises(ValueError, match=rf"method_options\.{key}\.rank: 8 .* stored only 4 .*svd\.top_k"):
            _build_task(tiny_model_dir, key, svd=tmp_path / "f.safetensors")


# ---------------------------------------------------------------- dynacsg_static (the static-gate control) ---
def test_static_gates_learn_one_logit_vector_per_matrix(tiny_model_dir, tiny_svd, monkeypatch):
    model, reference, method = _build_task(tiny_model_dir, "dynacsg_static", svd=tiny_svd)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.rsplit(".", 1)[-1] for n in trainable if not is_head_param(n)} == {"logit"}
    assert not hasattr(model, "dynacsg_hypernet")
    s = method.summary(model)
    assert method.param_counts(model)["adapter_params"] == 12 * 8 == s["planned_adapter_params"]  # r logits each
    assert s["capacity_limited"] and s["outside_budget"] and s["gates_per_matrix"] == 8 and s["target_k"] == -1
    batch = _cls_batch()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.eval(), reference.eval()
    with torch.no_grad():  # logits start at −3: every gate closed, the pretrained model
        torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits, rtol=0, atol=1e-6)
    model.train()
    state = LoopState(step=0, epoch=0, total_steps=12, steps_per_epoch=12)
    method.on_step_start(model, state)
    with monkeypatch.context() as mp:
        _forbid_host_reads(mp)
        out = model(**batch)
        pen = method.extra_loss(model, out, batch, state)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in state.log.values())
    mods = method.wrappers(model)
    for m in mods:  # one independent straight-through sample per example, hard 0/1
        assert m.last_sampled.shape == (4, 8) and set(m.last_sampled.unique().tolist()) <= {0.0, 1.0}
    assert float(pen.detach()) == pytest.approx(1e-4 * 96 * torch.sigmoid(torch.tensor(-3.0)).item(), rel=1e-5)
    assert float(state.log["mean_k"]) == 0.0
    out.loss.backward()  # the task loss alone reaches every matrix's logits through the gates
    assert all(m.logit.grad is not None and m.logit.grad.abs().sum() > 0 for m in mods)
    # eval: the correction is α U diag(S ⊙ 1[logit > 0]) Vᵀ, the same for every input
    mod, t = mods[4], method.ctx.targets[4]
    with torch.no_grad():
        mod.logit.copy_(torch.tensor([1.0, -1, 2, -2, 3, -3, 4, -4]))
    mod.eval()
    U, S, Vh = load_factors(tiny_svd, t.name)
    mask = torch.tensor([1.0, 0, 1, 0, 1, 0, 1, 0])
    W = mod.base.weight.detach() + 0.1 * U[:, :8] @ torch.diag(S[:8] * mask) @ Vh[:8]
    x = torch.randn(3, 5, t.d_in)
    with torch.no_grad():
        torch.testing.assert_close(mod(x), x @ W.T + mod.base.bias.detach(), atol=1e-5, rtol=1e-5)
    for bad in ({"target_k": 0}, {"rank": None}, {"init_logit": 1.0}):
        with pytest.raises(OptionsError):
            get_method("dynacsg_static").options_cls.from_dict(bad, where="method_options.dynacsg_static")


def test_static_target_k_opens_exactly_k_gates(tiny_model_dir, tiny_svd):
    """target_k = K: the inference mask keeps the K largest logits of every matrix (⟨k⟩ = K), the
    training threshold sits between the K-th and the next logit, and λ is not used."""
    model, _, method = _build_task(tiny_model_dir, "dynacsg_static", svd=tiny_svd, target_k=3)
    mods = method.wrappers(model)
    assert all(m.mask().tolist() == [1.0] * 3 + [0.0] * 5 for m in mods)  # equal logits: the top singular values
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in mods:
            m.logit.copy_(torch.randn(8, generator=g))
    for m in mods:
        top = set(torch.topk(m.logit.detach(), 3).indices.tolist())
        assert {i for i, v in enumerate(m.mask().tolist()) if v} == top
        assert {i for i, v in enumerate(m.shifted_logits().tolist()) if v > 0} == top
    batch = _cls_batch()
    state = LoopState(step=0, epoch=0, total_steps=12, steps_per_epoch=12)
    model.train()
    method.on_step_start(model, state)
    out = model(**batch)
    assert method.extra_loss(model, out, batch, state) is None and "gate_penalty" not in state.log
    assert float(state.log["mean_k"]) == 3.0
    s = method.summary(model)
    assert s["mean_active_gates"] == 3.0 and s["mean_active_gates_per_layer"] == 18.0 and s["target_k"] == 3
    every_model, _, every = _build_task(tiny_model_dir, "dynacsg_static", svd=tiny_svd, target_k=8)
    every_model.train()
    assert all(m.gates(2).tolist() == [[1.0] * 8] * 2 for m in every.wrappers(every_model))


def test_dynacsg_static_cli_matches_target_k(tiny_model_dir, tiny_data, tiny_svd, tmp_path):
    out = _train(tiny_model_dir, tiny_data, tmp_path, "dynacsg_static", svd=tiny_svd, task="sst2", epochs=1,
                 method_options={"target_k": 2})
    row = pd.read_parquet(out / "metrics.parquet").iloc[0]
    assert row["status"] == "ok" and row["mean_active_gates"] == 2.0 and row["adapter_params"] == 96
    assert row["capacity_limited"] and row["outside_budget"]
    ranks = pd.read_parquet(out / "ranks.parquet")
    assert (ranks["rank"] == 2).all() and (ranks["allocated_rank"] == 8).all()
    curve = pd.read_parquet(out / "curve.parquet")
    train = curve[curve.kind == "train"]
    assert (train["mean_k"] == 2.0).all() and train["mean_k_sampled"].between(0, 8).all()


@pytest.mark.parametrize("method", ["dynacsg", "dynacsg_static"])
def test_gated_methods_compile(tiny_model_dir, tiny_data, tiny_svd, tmp_path, method):
    """Dynamo (backend ``eager``) traces the gated training forward, hooks included, and the
    compiled run's losses and dev metric equal the eager run's."""
    assert get_method(method).compilable
    common = dict(task="sst2", length_buckets=2, max_train_samples=48, epochs=1, dropout_kernel="torch")
    a = _train(tiny_model_dir, tiny_data, tmp_path / "a", method, svd=tiny_svd, **common)
    b = _train(tiny_model_dir, tiny_data, tmp_path / "b", method, svd=tiny_svd, compile=True,
               compile_backend="eager", **common)
    ma, mb = (pd.read_parquet(d / "metrics.parquet").iloc[0] for d in (a, b))
    assert not ma["compiled"] and mb["compiled"]
    ca, cb = (pd.read_parquet(d / "curve.parquet") for d in (a, b))
    for col in ("loss", "mean_k"):
        np.testing.assert_allclose(ca.loc[ca.kind == "train", col], cb.loc[cb.kind == "train", col],
                                   rtol=1e-5, atol=1e-6)
    assert ma["dev_main"] == pytest.approx(mb["dev_main"], abs=1e-6)
    if method == "dynacsg":  # one graph: the layer pre-hooks are traced, not broken out
        model, _, _ = _build_task(tiny_model_dir, method, svd=tiny_svd)
        model.train()
        explained = torch._dynamo.explain(model)(**_cls_batch())
        assert explained.graph_break_count == 0 and explained.graph_count == 1


# ---------------------------------------------------------------- phased -------------------------------------
def _loop_step(model, method, state, batch, grad_rows):
    """One step of the training loop (peftbench.train.train_step), with its gradient norms."""
    step = state.step
    _, grads = train_step(model, method, batch, state, 1.0, record_gradnorms=True)
    grad_rows.append((step, grads))


def test_phased_inactive_params_bitwise_frozen(tiny_model_dir):
    from transformers import get_linear_schedule_with_warmup

    model, method, ctx = _build(tiny_model_dir, "phased", total_steps=6)  # both [0,2) mlp [2,4) attn [4,6)
    assert method.boundaries == [2, 4]
    opt = torch.optim.AdamW(method.parameter_groups(model, 0.1), lr=1e-2)
    sched = get_linear_schedule_with_warmup(opt, 0, 6)
    state = LoopState(step=0, epoch=0, total_steps=6, steps_per_epoch=6, optimizer=opt, scheduler=sched)
    batch = _batch(n=4)
    attn = [p for j, ps in enumerate(method._params) if ctx.targets[j].kind not in ("intermediate", "output") for p in ps]
    mlp = [p for j, ps in enumerate(method._params) if ctx.targets[j].kind in ("intermediate", "output") for p in ps]
    in_opt = [id(q) for g in opt.param_groups for q in g["params"]]
    assert {id(p) for p in attn + mlp} <= set(in_opt)  # every factor stays in AdamW, frozen or not
    grads_at_backward = []  # (grad is None) of every factor right after backward, before any hook
    hook = method.after_backward

    def spy(model_, state_):
        grads_at_backward.append({id(p): p.grad is None for p in attn + mlp})
        hook(model_, state_)

    method.after_backward = spy
    rows = []
    for _ in range(2):  # phase 0: everything trains
        _loop_step(model, method, state, batch, rows)
    assert all(opt.state[p]["step"] == 2 for p in attn + mlp)
    assert not any(any(g.values()) for g in grads_at_backward)
    for phase, frozen, live in ((1, attn, mlp), (1, attn, mlp), (2, mlp, attn)):
        before = [p.detach().clone() for p in frozen]
        st = [copy.deepcopy(opt.state[p]) for p in frozen]
        live_before = [p.detach().clone() for p in live]
        head_before = model.base_model.model.classifier.modules_to_save.default.weight.detach().clone()
        _loop_step(model, method, state, batch, rows)
        assert state.log["phase"] == phase
        # no backward work for the frozen factors: autograd never produced their gradient
        assert all(grads_at_backward[-1][id(p)] for p in frozen) and not any(p.requires_grad for p in frozen)
        assert not any(grads_at_backward[-1][id(p)] for p in live) and all(p.requires_grad for p in live)
        for p, b, s in zip(frozen, before, st):
            assert torch.equal(p.detach(), b)  # bitwise unchanged, no weight decay
            assert float(opt.state[p]["step"]) == float(s["step"])
            assert torch.equal(opt.state[p]["exp_avg"], s["exp_avg"])
            assert torch.equal(opt.state[p]["exp_avg_sq"], s["exp_avg_sq"])
            assert p.grad is None
        assert any(not torch.equal(p.detach(), b) for p, b in zip(live, live_before))
        assert not torch.equal(model.base_model.model.classifier.modules_to_save.default.weight, head_before)
    assert [id(q) for g in opt.param_groups for q in g["params"]] == in_opt  # never rebuilt
    # the attention factors frozen through phase 1 resumed from their phase-0 moments in phase 2
    assert all(float(opt.state[p]["step"]) == 3 for p in attn) and all(float(opt.state[p]["step"]) == 4 for p in mlp)
    # counts and saved tensors include the factors frozen in the last phase
    assert method.param_counts(model)["adapter_params"] == sum(p.numel() for p in attn + mlp)
    saved = method.state_to_save(model)
    assert sum(v.numel() for k, v in saved.items() if "lora_" in k) == sum(p.numel() for p in attn + mlp)
    # logged norms: zero for attention in the mlp phase (steps 2, 3), zero for mlp in the attn phase (step 4)
    norms = {step: {(g, l): v for g, l, v in r} for step, r in rows}
    assert norms[2][("attention", -1)] == 0.0 and norms[2][("mlp", -1)] > 0 and norms[2][("head", -1)] > 0
    assert norms[4][("mlp", -1)] == 0.0 and norms[4][("attention", -1)] > 0
    assert norms[0][("mlp", -1)] > 0 and norms[0][("attention", -1)] > 0
    assert method.phase_steps == [2, 2, 1]


def test_late_phase_skips_the_backward_through_the_lower_layers(tiny_model_dir):
    """early->late: in the late phase nothing below the upper half needs a gradient, so autograd
    records no graph there (the backward stops at the first late layer)."""
    model, method, ctx = _build(tiny_model_dir, "phased", total_steps=4, options={"strategy": "early->late"})
    assert method.boundaries == [2]
    batch = _batch()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    for step, lower_needs_grad in ((0, True), (2, False)):
        method.on_step_start(model, LoopState(step=step, epoch=0, total_steps=4, steps_per_epoch=4))
        hs = model(**inputs, output_hidden_states=True).hidden_states  # embeddings, layer 0, layer 1
        assert not hs[0].requires_grad
        assert hs[1].requires_grad is lower_needs_grad
        assert hs[2].requires_grad
    early = [p for j, ps in enumerate(method._params) if ctx.targets[j].layer == 0 for p in ps]
    assert early and not any(p.requires_grad for p in early)


def test_phase_boundaries_as_absolute_steps(tiny_model_dir):
    from peftbench.methods.options import OptionsError

    model = load_classifier(str(tiny_model_dir), get_task("stsb"))
    m = get_method("phased")(_ctx(model, "phased", total_steps=10, options={"bound_steps": [3, 7]}))
    assert m.boundaries == m.phase_boundaries == [3, 7] and m.bounds == [0.3, 0.7]
    state = LoopState(step=0, epoch=0, total_steps=10, steps_per_epoch=10)
    phases = []
    for s in range(10):
        state.step = s
        m.on_step_start(model, state)
        phases.append(state.log["phase"])
    assert phases == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    # the last boundary must leave a last phase: checked when the run's step count is known
    with pytest.raises(ValueError, match=r"method_options\.phased\.bound_steps: \[3, 10\].*10 optimizer steps"):
        get_method("phased")(_ctx(model, "phased", total_steps=10, options={"bound_steps": [3, 10]}))
    for bad, key in (({"bounds": [0.2, 0.5], "bound_steps": [2, 5]}, "bound_steps.*mutually exclusive"),
                     ({"bound_steps": [5, 5]}, "bound_steps"), ({"bound_steps": [0, 5]}, "bound_steps"),
                     ({"bound_steps": [3]}, "bound_steps"), ({"strategy": "early->attn"}, "strategy.*mlp/late")):
        with pytest.raises(OptionsError, match=key):
            get_method("phased").options_cls.from_dict(bad, where="method_options.phased")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_phase_boundaries_every_strategy(tiny_model_dir, strategy):
    model = load_classifier(str(tiny_model_dir), get_task("stsb"))
    for total in (12, 10, 7):
        ctx = _ctx(model, "phased", total_steps=total, options={"strategy": strategy})
        m = get_method("phased")(ctx)
        n = len(strategy.split("->"))
        expected = [round(total / 3), round(2 * total / 3)] if n == 3 else [round(total / 2)]
        assert m.boundaries == expected
        state = LoopState(step=0, epoch=0, total_steps=total, steps_per_epoch=total)
        phases = []
        for s in range(total):
            state.step = s
            m.on_step_start(model, state)
            phases.append(state.log["phase"])
        assert phases == [sum(s >= b for b in expected) for s in range(total)]
        assert m.phase_steps == [phases.count(i) for i in range(n)]
        act = m.active_steps()
        for j, t in enumerate(ctx.targets):
            attn = t.kind not in ("intermediate", "output")
            on = {"both": True, "attn": attn, "mlp": not attn, "early": t.layer < 1, "late": t.layer >= 1}
            assert act[j] == sum(m.phase_steps[p] for p, s in enumerate(strategy.split("->")) if on[s])
    ctx = _ctx(model, "phased", total_steps=10, options={"strategy": "both->mlp->attn", "bounds": [0.2, 0.9]})
    assert get_method("phased")(ctx).boundaries == [2, 9]
    assert boundary_steps([0.5], 9) == [4] and phase_at(4, [4]) == 1 and phase_at(3, [4]) == 0
    for bad in ({"bounds": [0.5]}, {"bounds": [0.7, 0.3]}, {"strategy": "mlp"}, {"strategy": "attn->ffn"},
                {"strategy": "attn->attn"}):
        with pytest.raises(ValueError):
            get_method("phased")(_ctx(model, "phased", options=bad))


def test_phased_cli_gradnorms_and_ranks(tiny_model_dir, tiny_data, tmp_path):
    out = _train(tiny_model_dir, tiny_data, tmp_path, "phased")  # 12 steps: both [0,4) mlp [4,8) attn [8,12)
    row = pd.read_parquet(out / "metrics.parquet").iloc[0]
    assert row["phase_strategy"] == "both->mlp->attn" and json.loads(row["phase_boundary_steps"]) == [4, 8]
    assert json.loads(row["phase_steps"]) == [4, 4, 4]
    assert row["adapter_params"] == row["rank"] * 896
    g = pd.read_parquet(out / "gradnorms.parquet")
    grp = g[g.layer == -1].pivot(index="step", columns="group", values="grad_norm")
    assert list(grp.index) == [0, 2, 4, 6, 8, 10]
    assert (grp.loc[[4, 6], "attention"] == 0).all() and (grp.loc[[4, 6], "mlp"] > 0).all()
    assert (grp.loc[[8, 10], "mlp"] == 0).all() and (grp.loc[[8, 10], "attention"] > 0).all()
    assert (grp.loc[[0, 2], ["attention", "mlp"]] > 0).all().all() and (grp["head"] > 0).all()
    per_layer = g[(g.layer >= 0) & (g.step == 4) & (g.group == "attention")]
    assert len(per_layer) == 2 and (per_layer["grad_norm"] == 0).all()
    ranks = pd.read_parquet(out / "ranks.parquet")
    assert len(ranks) == 12 and (ranks["rank"] == row["rank"]).all()
    attn = ~ranks["kind"].isin(["intermediate", "output"])
    assert (ranks.loc[attn, "active_steps"] == 8).all() and (ranks.loc[~attn, "active_steps"] == 8).all()
    curve = pd.read_parquet(out / "curve.parquet")
    tr = curve[curve.kind == "train"].set_index("step")["phase"]
    assert tr.loc[2] == 0 and tr.loc[6] == 1 and tr.loc[12] == 2
    # per-phase gradient-norm summary: a frozen group's mean is exactly 0 in its frozen phase
    assert row["gradnorm_mean_attention_p1"] == 0.0 and row["gradnorm_mean_mlp_p2"] == 0.0
    assert row["gradnorm_mean_attention_p0"] == pytest.approx(grp.loc[[0, 2], "attention"].mean())
    assert row["gradnorm_mean_mlp_p1"] == pytest.approx(grp.loc[[4, 6], "mlp"].mean())
    assert row["gradnorm_mean_mlp_p1"] > 0
    assert row["gradnorm_max_total"] == pytest.approx(grp["total"].max())
    # every factor is saved, the attention ones frozen at the end included
    from safetensors.torch import load_file

    lora = {k: v for k, v in load_file(out / "adapter.safetensors").items() if "lora_" in k}
    assert len(lora) == 24 and sum(v.numel() for v in lora.values()) == row["adapter_params"]


def test_phased_resumes_with_its_frozen_factors(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    """Killed at the end of epoch 1 (step 6, the mlp phase: attention factors frozen, so the loop's
    checkpoint of trainable parameters lacks them), the run resumes to the same metrics."""
    from peftbench import train as train_mod

    rec = {"lr": 2e-3, "epochs": 2, "batch_size": 16, "max_train_samples": 96, "max_eval_samples": 64,
           "log_every": 1, "checkpoint_every": 2}

    def args(out, ckpt):
        return ["train", "--model-name", "tiny", "--model", str(tiny_model_dir), "--task", "stsb", "--method",
                "phased", "--budget", "2", "--seed", "3", "--train", str(tiny_data["stsb"]["train"]),
                "--dev", f"validation={tiny_data['stsb']['validation']}", *recipe_args(rec), "--out", str(out),
                "--checkpoint-dir", str(ckpt)]

    main(args(tmp_path / "a", tmp_path / "ca"))

    class Interrupt(BaseException):
        pass

    real_save, calls = train_mod.Checkpointer.save, {"n": 0}

    def save_then_die(self, *a, **k):
        real_save(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 3:  # steps 2, 4, then the epoch-1 checkpoint at step 6
            raise Interrupt()

    monkeypatch.setattr(train_mod.Checkpointer, "save", save_then_die)
    with pytest.raises(Interrupt):
        main(args(tmp_path / "b", tmp_path / "cb"))
    payload = torch.load(tmp_path / "cb" / "checkpoint.pt", weights_only=False)
    assert payload["step"] == 6 and payload["method"]["applied"] == 1
    assert payload["method"]["frozen_factors"] and not set(payload["method"]["frozen_factors"]) & set(payload["params"])
    monkeypatch.setattr(train_mod.Checkpointer, "save", real_save)
    main(args(tmp_path / "b", tmp_path / "cb"))
    a, b = (pd.read_parquet(tmp_path / d / "metrics.parquet").iloc[0] for d in ("a", "b"))
    for col in ("dev_pearson", "best_dev_pearson", "steps", "phase_steps", "gradnorm_mean_total"):
        assert a[col] == b[col], col
    ca, cb = (pd.read_parquet(tmp_path / d / "curve.parquet") for d in ("a", "b"))
    assert ca["loss"].equals(cb["loss"])
