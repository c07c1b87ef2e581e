"""Spectral methods (spectral_a, spectral_r, gsa) on a tiny random BERT: maths against dense
references, step-0 equality, Cayley orthogonality, the singular-value scale of Spectral
Adapter^R, budget matching and the rank / k options, frozen backbone, device-side logging,
compiled training, CLI runs."""
import copy
import json

import numpy as np
import pandas as pd
from conftest import recipe_args
import pytest
import torch
from safetensors.torch import load_file

from peftbench.cli import main
from peftbench.methods import BuildContext, LoopState, get_method
from peftbench.methods.options import OptionsError
from peftbench.methods.spectral_common import SpectralLinear, budget_flags, check_factors
from peftbench.methods.spectral_r import cayley, rotational_params, skew_from_params
from peftbench.models import backbone_param_count, find_targets, head_module_names, is_head_param, load_classifier
from peftbench.svd import load_factors
from peftbench.vocab import get_task

METHODS = ["spectral_a", "spectral_r", "gsa"]
OWN = {"spectral_a": ("A_U", "A_V"), "spectral_r": ("X_U", "X_V", "scale"), "gsa": ("g",)}


def _svd(model_dir, out, top_k):
    f = out / f"factors{top_k}.safetensors"
    main(["svd", "--model-name", "tiny", "--model", str(model_dir), "--top-k", str(top_k),
          "--factors", str(f), "--spectrum", str(out / f"spectrum{top_k}.parquet")])
    return f


@pytest.fixture(scope="module")
def factors(tiny_model_dir, tmp_path_factory):
    """Full-rank factors (top-k 64 ≥ min(d) = 32) of the tiny model."""
    return _svd(tiny_model_dir, tmp_path_factory.mktemp("svd"), 64)


@pytest.fixture(scope="module")
def factors8(tiny_model_dir, tmp_path_factory):
    """Top-8 factors of the tiny model."""
    return _svd(tiny_model_dir, tmp_path_factory.mktemp("svd8"), 8)


def _load(model_dir, task="stsb", seed=0):
    torch.manual_seed(seed)  # the same random head for the reference and the adapted model
    return load_classifier(str(model_dir), get_task(task))


def _build(model_dir, method, svd, budget=2.0, task="stsb", **options):
    model = _load(model_dir, task)
    ref = copy.deepcopy(model)
    ctx = BuildContext(task=get_task(task), budget=budget, backbone_params=backbone_param_count(model),
                       targets=find_targets(model), head_modules=head_module_names(model), total_steps=10,
                       steps_per_epoch=5, options=options, svd_path=svd)
    m = get_method(method)(ctx)
    return m, m.build(model), ref


def _inputs(n=4, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _randomise(model, scale=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, SpectralLinear):
                for p in mod.parameters(recurse=False):
                    p.copy_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("method", METHODS)
def test_step0_equals_pretrained(tiny_model_dir, factors, method):
    _, model, ref = _build(tiny_model_dir, method, factors)
    model.eval(), ref.eval()
    b = _inputs()
    with torch.no_grad():
        assert torch.allclose(model(**b).logits, ref(**b).logits, atol=1e-6, rtol=0)
    n_wrapped = sum(isinstance(m, SpectralLinear) for m in model.modules())
    assert n_wrapped == 12


def _dense_reference(method, mod, W, U, S, V):
    """W' from the definition, materialised (independent of the module's own code)."""
    if method == "spectral_a":
        return W + (U + mod.A_U) @ torch.diag(S) @ (V + mod.A_V).T - U @ torch.diag(S) @ V.T
    if method == "spectral_r":
        r = U.shape[1]

        def rot(x):
            K = torch.zeros(r, r)
            c = 0
            for i in range(r):
                for j in range(i + 1, r):
                    K[i, j], K[j, i] = x[c], -x[c]
                    c += 1
            eye = torch.eye(r)
            return (eye - K) @ torch.linalg.inv(eye + K)

        # the authors' Spectral Adapter^R: rotated top-r vectors and scaled top-r singular values
        return W + (U @ rot(mod.X_U)) @ torch.diag(S * mod.scale) @ (V @ rot(mod.X_V)).T - U @ torch.diag(S) @ V.T
    W_res = W - U @ torch.diag(S) @ V.T
    return W_res + U @ torch.diag(S * (1 + mod.g)) @ V.T


@pytest.mark.parametrize("method,svd", [(m, s) for m in METHODS for s in ("factors", "factors8")])
def test_wrapper_equals_dense_reference(tiny_model_dir, request, method, svd):
    path = request.getfixturevalue(svd)
    opts = {"k": 8} if method == "gsa" and svd == "factors8" else {}  # k ≤ the stored top-k
    m, model, ref = _build(tiny_model_dir, method, path, budget=0.5, **opts)
    _randomise(model)
    refmods = dict(ref.named_modules())
    g = torch.Generator().manual_seed(2)
    for t in m.ctx.targets:
        mod = model.get_submodule(t.name)
        W, bias = refmods[t.name].weight.detach(), refmods[t.name].bias.detach()
        U, S, Vh = load_factors(path, t.name)
        r = mod.r
        assert mod.U.shape == (t.d_out, r) and mod.V.shape == (t.d_in, r) and mod.S.shape == (r,)
        with torch.no_grad():
            Wp = _dense_reference(method, mod, W, U[:, :r], S[:r], Vh[:r].T)
            x = torch.randn(3, 5, t.d_in, generator=g)
            assert torch.allclose(mod(x), x @ Wp.T + bias, atol=1e-4)
            assert torch.allclose(mod.delta_weight(), Wp - W, atol=1e-5)
            assert not torch.allclose(Wp, W, atol=1e-3)  # the random values really change the weight


@pytest.mark.parametrize("r", [2, 5, 16])
def test_cayley_rotation_is_orthogonal(r):
    x = torch.randn(r * (r - 1) // 2) * 2
    K = skew_from_params(x, r)
    assert torch.allclose(K, -K.T)
    R = cayley(K)
    assert torch.allclose(R.T @ R, torch.eye(r), atol=1e-5)
    assert torch.linalg.det(R) == pytest.approx(1.0, abs=1e-4)
    assert torch.equal(cayley(skew_from_params(torch.zeros_like(x), r)), torch.eye(r))
    with pytest.raises(ValueError):
        skew_from_params(torch.zeros(3), r + 1 if r != 2 else 4)


@pytest.mark.parametrize("method,budget,svd,limited", [
    ("spectral_a", 2.0, "factors", False), ("spectral_a", 2.0, "factors8", True),
    ("spectral_r", 0.5, "factors", False), ("spectral_r", 2.0, "factors", True),
    ("gsa", 0.5, "factors", True)])
def test_budget_matching(tiny_model_dir, request, method, budget, svd, limited):
    m, model, _ = _build(tiny_model_dir, method, request.getfixturevalue(svd), budget=budget)
    counts = m.param_counts(model)
    s = m.summary(model)
    target = m.ctx.budget_params
    assert s["capacity_limited"] is limited
    assert counts["adapter_params"] == s["planned_adapter_params"]
    mods = m.wrappers(model)
    per = {"spectral_a": lambda mod: mod.r * (mod.in_features + mod.out_features),
           "spectral_r": lambda mod: mod.r * (mod.r - 1) + mod.r,  # two rotations + the r scales
           "gsa": lambda mod: mod.r}[method]
    assert counts["adapter_params"] == sum(per(mod) for mod in mods)
    if limited:
        assert counts["adapter_params"] < target
    else:
        assert abs(counts["adapter_params"] - target) <= 0.1 * target
    if svd == "factors8":
        assert {mod.r for mod in mods} == {8}
    assert counts["head_params"] == sum(p.numel() for n, p in model.named_parameters() if is_head_param(n))


@pytest.mark.parametrize("method", METHODS)
def test_only_method_params_and_head_change(tiny_model_dir, factors, method):
    m, model, _ = _build(tiny_model_dir, method, factors, budget=0.5, lam=1e-2) if method == "gsa" else \
        _build(tiny_model_dir, method, factors, budget=0.5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing to train"
    for n in trainable:
        assert is_head_param(n) or n.rsplit(".", 1)[-1] in OWN[method], n
    assert any(is_head_param(n) for n in trainable)
    before = {n: t.detach().clone() for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    opt = torch.optim.AdamW(m.parameter_groups(model, 0.01), lr=1e-2)
    b = {**_inputs(), "labels": torch.tensor([0.5, 1.0, 3.0, 4.5])}
    model.train()
    out = model(**b)
    state = LoopState(step=0, epoch=0, total_steps=10, steps_per_epoch=5)
    extra = m.extra_loss(model, out, b, state)
    loss = out.loss if extra is None else out.loss + extra
    if method == "gsa":
        assert extra is not None and float(state.log["penalty"]) == 0.0 and float(extra.detach()) == 0.0
    loss.backward()
    opt.step()
    after = dict(list(model.named_parameters()) + list(model.named_buffers()))
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed <= trainable, changed - trainable
    own_changed = [n for n in changed if not is_head_param(n)]
    assert len(own_changed) == len(OWN[method]) * 12  # every method tensor of every matrix moved
    assert any(is_head_param(n) for n in changed)


def test_buffers_move_with_the_module_and_are_not_saved(tiny_model_dir, factors):
    m, model, _ = _build(tiny_model_dir, "spectral_a", factors)
    mod = m.wrappers(model)[0]
    assert {n for n, _ in mod.named_buffers()} == {"U", "S", "V"}
    model.double()
    assert mod.U.dtype == mod.S.dtype == mod.V.dtype == torch.float64
    saved = m.state_to_save(model)
    assert all(is_head_param(k) or k.rsplit(".", 1)[-1] in ("A_U", "A_V") for k in saved)
    assert sum(v.numel() for v in saved.values()) == sum(m.param_counts(model).values())


def test_factors_of_another_model_are_rejected(tiny_model_dir, factors):
    W = torch.randn(32, 32)
    U, S, Vh = load_factors(factors, find_targets(_load(tiny_model_dir))[0].name)
    with pytest.raises(ValueError, match="another model"):
        check_factors(W, U, S, Vh, "x")
    u, s, vh = torch.linalg.svd(W)
    check_factors(W, u[:, :8], s[:8], vh[:8], "x")  # its own factors pass
    with pytest.raises(ValueError, match="no 'svd'|SVD factors"):
        get_method("gsa")(BuildContext(task=get_task("stsb"), budget=1.0, backbone_params=1, targets=[],
                                       head_modules=[], total_steps=1, steps_per_epoch=1)).plan()


def _train(model_dir, data, svd, out, method, task="stsb", budget=2.0, **recipe):
    rec = {"lr": 5e-3, "epochs": 1, "batch_size": 16, "max_train_samples": 64, "max_eval_samples": 64,
           "log_every": 2, **recipe}
    main(["train", "--model-name", "tiny", "--model", str(model_dir), "--task", task, "--method", method,
          "--budget", str(budget), "--seed", "1", "--train", str(data[task]["train"]),
          "--dev", f"validation={data[task]['validation']}", *recipe_args(rec), "--out", str(out),
          "--svd", str(svd)])
    return out


@pytest.mark.parametrize("method", METHODS)
def test_train_cli(tiny_model_dir, tiny_data, factors, tmp_path, method):
    out = _train(tiny_model_dir, tiny_data, factors, tmp_path / method, method, budget=1.0)
    row = pd.read_parquet(out / "metrics.parquet").iloc[0]
    assert row["method"] == method and row["status"] == "ok" and -1 <= row["dev_main"] <= 1
    assert {"rank", "capacity_limited", "budget_target_params", "planned_adapter_params"} <= set(row.index)
    assert row["adapter_params"] == row["planned_adapter_params"]
    # the loop's count against the budget: all of the adapter (budget_params is the budget itself)
    assert row["budget_used_params"] == row["adapter_params"]
    assert row["trainable_params"] == row["adapter_params"] + row["head_params"]
    adapter = load_file(out / "adapter.safetensors")
    assert sum(v.numel() for v in adapter.values()) == row["trainable_params"]
    assert not any(k.endswith((".U", ".S", ".V")) or ".base." in k for k in adapter)
    ranks = pd.read_parquet(out / "ranks.parquet")
    assert len(ranks) == 12 and set(ranks["layer"]) == {0, 1}
    assert (ranks["score"] > 0).all()  # every matrix moved away from the pretrained weight
    curve = pd.read_parquet(out / "curve.parquet")
    if method == "gsa":
        assert row["capacity_limited"]
        assert curve.loc[curve.kind == "train", "penalty"].notna().all()
        assert (curve.loc[curve.kind == "train", "penalty"] > 0).all()
        assert (ranks["rank"] <= ranks["allocated_rank"]).all() and ranks["rank"].sum() == row["active_gates"]
        g = {k: v for k, v in adapter.items() if k.endswith(".g")}
        thr = sum(int((v.abs() > 1e-3).sum()) for v in g.values())
        assert thr == row["active_gates"]
    else:
        assert (ranks["rank"] == row["rank"]).all()


# ------------------------------------------------------------- Spectral Adapter^R: the singular-value scale
def test_spectral_r_scales_the_top_singular_values(tiny_model_dir, factors8):
    """The authors' Spectral Adapter^R also trains a scale c of the top-r singular values
    (``spectral_C``, init 1): with no rotation, W' has singular values S_r ⊙ c on the top-r vectors
    and is unchanged outside them; c counts in the adapter's parameters."""
    m, model, ref = _build(tiny_model_dir, "spectral_r", factors8, budget=0.5)
    refmods = dict(ref.named_modules())
    for mod in m.wrappers(model):
        assert torch.equal(mod.scale.detach(), torch.ones(mod.r)) and mod.scale.requires_grad
    t = m.ctx.targets[4]
    mod = model.get_submodule(t.name)
    c = torch.linspace(0.5, 2.0, mod.r)
    with torch.no_grad():
        mod.scale.copy_(c)
    W = refmods[t.name].weight.detach()
    Wp = W + mod.delta_weight().detach()
    U, S, Vh = load_factors(factors8, t.name)
    proj = U.T @ Wp @ Vh.T  # (8, 8): the top-8 block of W' in W's singular bases
    torch.testing.assert_close(proj, torch.diag(S * c), atol=1e-5, rtol=1e-5)
    P_U, P_V = torch.eye(t.d_out) - U @ U.T, torch.eye(t.d_in) - Vh.T @ Vh
    torch.testing.assert_close(P_U @ Wp @ P_V, P_U @ W @ P_V, atol=1e-5, rtol=0)  # the rest of W untouched
    counts = m.param_counts(model)
    assert counts["adapter_params"] == sum(rotational_params(w.r) for w in m.wrappers(model)) == 12 * 8 * 8
    assert m.summary(model)["mean_abs_scale_shift"] == pytest.approx(float((c - 1).abs().mean()) / 12, rel=1e-5)
    groups = m.parameter_groups(model, 0.01)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert all(id(w.scale) in no_decay for w in m.wrappers(model))  # decay must not pull c towards 0


# ------------------------------------------------------------- the rank option (spectral_a, spectral_r)
@pytest.mark.parametrize("method", ["spectral_a", "spectral_r"])
def test_rank_option_fixes_r_at_every_budget(tiny_model_dir, factors, factors8, method):
    per = {"spectral_a": lambda t: 8 * (t.d_in + t.d_out), "spectral_r": lambda t: 64}[method]
    counts = set()
    for budget in (0.2, 0.5, 2.0):
        m, model, _ = _build(tiny_model_dir, method, factors, budget=budget, rank=8)
        assert {w.r for w in m.wrappers(model)} == {8}
        n = m.param_counts(model)["adapter_params"]
        assert n == sum(per(t) for t in m.ctx.targets)
        s = m.summary(model)
        assert s["planned_adapter_params"] == n and s["rank"] == 8
        assert {k: s[k] for k in ("capacity_limited", "outside_budget")} == budget_flags(n, m.ctx.budget_params)
        counts.add(n)
    assert len(counts) == 1
    # null (the default) still derives r from the budget
    m, model, _ = _build(tiny_model_dir, method, factors, budget=0.5, rank=None)
    m2, model2, _ = _build(tiny_model_dir, method, factors, budget=0.5)
    assert [w.r for w in m.wrappers(model)] == [w.r for w in m2.wrappers(model2)] != [8] * 12
    # more singular values than the svd stage stored: an error naming the key and both fixes
    with pytest.raises(ValueError, match=rf"method_options\.{method}\.rank: 16 .* stored only 8 .*svd\.top_k"):
        _build(tiny_model_dir, method, factors8, rank=16)
    with pytest.raises(OptionsError, match="rank"):
        get_method(method).options_cls.from_dict({"rank": 0}, where=f"method_options.{method}")


def test_budget_flags():
    assert budget_flags(95, 100) == {"capacity_limited": False, "outside_budget": False}
    assert budget_flags(80, 100) == {"capacity_limited": True, "outside_budget": True}
    assert budget_flags(120, 100) == {"capacity_limited": False, "outside_budget": True}


# ------------------------------------------------------------- GSA: k is an option, not the budget
def test_gsa_k_is_the_seed_option_not_the_budget(tiny_model_dir, factors, factors8):
    """Seed 002: k = 16 gates per matrix at every budget; the count is reported as it is."""
    rows = []
    for budget in (0.1, 0.5, 2.0):
        m, model, _ = _build(tiny_model_dir, "gsa", factors, budget=budget)
        assert m.options.k == 16 and {w.r for w in m.wrappers(model)} == {16}
        s = m.summary(model)
        rows.append((m.param_counts(model)["adapter_params"], s["budget_rank"]))
        assert s["capacity_limited"] and s["outside_budget"]  # 192 gates ≪ 0.1 % of the backbone
        assert m.budget_count(model) == 12 * 16
    assert {n for n, _ in rows} == {12 * 16}
    assert len({b for _, b in rows}) == 3  # what each budget would pay for still differs
    m, model, _ = _build(tiny_model_dir, "gsa", factors, budget=0.5, k=4)
    assert m.param_counts(model)["adapter_params"] == 12 * 4
    with pytest.raises(ValueError, match=r"method_options\.gsa\.k: 16 .* stored only 8 .*svd\.top_k"):
        _build(tiny_model_dir, "gsa", factors8)
    with pytest.raises(OptionsError, match=r"method_options\.gsa\.k"):
        get_method("gsa").options_cls.from_dict({"k": 0}, where="method_options.gsa")


# ------------------------------------------------------------- no host sync in the hooks
class _HostSync(RuntimeError):
    pass


@pytest.fixture
def no_host_sync(monkeypatch):
    """Make every tensor → Python read (float(), .item(), .tolist(), bool()) raise."""

    def boom(*a, **k):
        raise _HostSync("host sync")

    for name in ("__float__", "item", "tolist", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, boom)


@pytest.mark.parametrize("method", METHODS)
def test_training_hooks_keep_logged_values_on_the_device(tiny_model_dir, factors, method, request):
    m, model, _ = _build(tiny_model_dir, method, factors, budget=0.5, **({"lam": 1e-2} if method == "gsa" else {}))
    model.train()
    b = {**_inputs(), "labels": torch.tensor([0.5, 1.0, 3.0, 4.5])}
    state = LoopState(step=0, epoch=0, total_steps=10, steps_per_epoch=5)
    out = model(**b)
    request.getfixturevalue("no_host_sync")
    m.on_step_start(model, state)
    extra = m.extra_loss(model, out, b, state)  # must not read any tensor on the host
    m.after_backward(model, state)
    m.after_optimizer_step(model, state)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in state.log.values())
    assert (extra is not None) == (method == "gsa") and ("penalty" in state.log) == (method == "gsa")


# ------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("method", METHODS)
def test_compiled_training_matches_eager(tiny_model_dir, tiny_data, factors, tmp_path, method):
    """Dynamo-traced training (backend ``eager``) of a ``compilable`` spectral method gives the
    eager run's losses and dev metric."""
    assert get_method(method).compilable
    common = dict(task="sst2", length_buckets=2, max_train_samples=48, batch_size=16, budget=0.5,
                  dropout_kernel="torch")
    a = _train(tiny_model_dir, tiny_data, factors, tmp_path / "a", method, **common)
    b = _train(tiny_model_dir, tiny_data, factors, tmp_path / "b", method, compile=True, compile_backend="eager",
               **common)
    ma, mb = (pd.read_parquet(d / "metrics.parquet").iloc[0] for d in (a, b))
    assert not ma["compiled"] and mb["compiled"] and mb["compile_note"].startswith("compiled (backend eager")
    ca, cb = (pd.read_parquet(d / "curve.parquet") for d in (a, b))
    np.testing.assert_allclose(ca.loc[ca.kind == "train", "loss"], cb.loc[cb.kind == "train", "loss"],
                               rtol=1e-5, atol=1e-6)
    assert ma["dev_main"] == pytest.approx(mb["dev_main"], abs=1e-6)
