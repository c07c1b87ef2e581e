"""The LoRA family's shared conventions (α, dropout, budget), AdaLoRA's scale and rank allocation,
the static attention/MLP baselines, the gradient-norm logs and their summary, torch.compile."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from peftbench import config as pbconfig
from peftbench.budget import lora_params, per_rank_cost
from peftbench.methods import METHODS, BuildContext, get_method
from peftbench.methods.lora import LORA_ALPHA, LoRAOptions
from peftbench.models import backbone_param_count, find_targets, head_module_names, load_classifier
from peftbench.outputs import gradnorm_columns
from peftbench.train import gradient_norms
from peftbench.vocab import ATTENTION_KINDS, GRAD_GROUPS, GRAD_TOTAL, MLP_KINDS, get_task
from test_stages import _train

ROOT = Path(__file__).resolve().parents[1]
#: The LoRA family: every method whose options are LoRA's (α, dropout) — AdaLoRA's included.
FAMILY = ["lora", "adalora", "glora", "fwlora", "phased", "lora_attn", "lora_mlp"]


def _build(tiny_model_dir, name, budget=1.0, total_steps=20, options=None):
    task = get_task("sst2")
    torch.manual_seed(0)
    model = load_classifier(str(tiny_model_dir), task)
    ctx = BuildContext(task=task, budget=budget, backbone_params=backbone_param_count(model),
                       targets=find_targets(model), head_modules=head_module_names(model), total_steps=total_steps,
                       steps_per_epoch=total_steps, options=options or {}, seed=0)
    method = get_method(name)(ctx)
    return method, method.build(model), ctx


def test_family_shares_the_lora_options():
    for name in FAMILY:
        assert issubclass(get_method(name).options_cls, LoRAOptions), name
        opts = get_method(name).options_cls()
        assert opts.alpha == LORA_ALPHA == 16.0, name


# ------------------------------------------------------------------ AdaLoRA --------------------------------
def test_adalora_scale_is_alpha_over_init_rank(tiny_model_dir):
    """peft's SVDLinear scales P Λ Q by lora_alpha / ranknum with ranknum = init_r: with the family's
    α = 16 that is 16 / init_r, i.e. target_r / init_r of LoRA's 16 / r at the same final rank
    (peft's own default lora_alpha = 8 would give a third of LoRA's)."""
    from peft.tuners.adalora import AdaLoraLayer
    from peft.tuners.lora import LoraLayer

    ada, model, ctx = _build(tiny_model_dir, "adalora", budget=0.5)
    s = ada.schedule()
    layers = [m for m in model.modules() if isinstance(m, AdaLoraLayer)]
    assert len(layers) == len(ctx.targets)
    for m in layers:
        assert m.scaling["default"] == 16.0
        assert float(m.ranknum["default"]) == s["init_r"]
        assert m.lora_dropout["default"].p == ada.options.dropout
    lora, lmodel, _ = _build(tiny_model_dir, "lora", budget=0.5)
    assert lora.rank() == s["target_r"] == 6 and s["init_r"] == 9
    lscale = [m.scaling["default"] for m in lmodel.modules() if isinstance(m, LoraLayer)][0]
    assert lscale == pytest.approx(16.0 / 6)
    ascale = ada.summary(model)["lora_scale"]
    assert ascale == pytest.approx(16.0 / 9) == pytest.approx(lscale * s["target_r"] / s["init_r"])
    assert lora.summary(lmodel)["lora_scale"] == pytest.approx(lscale)
    # the option is a float now (no null = "peft's default")
    with pytest.raises(ValueError, match=r"method_options\.adalora\.alpha"):
        get_method("adalora").options_cls.from_dict({"alpha": None}, where="method_options.adalora")


def test_adalora_ranks_change_over_a_short_run(tiny_model_dir, tiny_data, tmp_path):
    """peft's RankAllocator masks singular values: after the final allocation the ranks differ from
    init_r and add up to the target budget."""
    out = _train(tiny_model_dir, tiny_data, tmp_path, "adalora", budget=0.5, method_options={"delta_t": 2})
    row = pd.read_parquet(out / "metrics.parquet").iloc[0]
    ranks = pd.read_parquet(out / "ranks.parquet")
    init_r, target_r = int(row["init_rank"]), int(row["rank"])
    assert (init_r, target_r) == (9, 6) and len(ranks) == 12
    assert (ranks["rank"] <= init_r).all() and (ranks["rank"] >= 0).all()
    assert (ranks["rank"] != init_r).any()                    # something was pruned
    assert ranks["rank"].nunique() > 1 or ranks["rank"].iloc[0] < init_r
    assert ranks["rank"].sum() <= target_r * len(ranks)       # the final budget holds
    assert ranks["rank"].sum() >= target_r * len(ranks) - 2   # (up to ties at the threshold)
    assert row["mean_final_rank"] == pytest.approx(ranks["rank"].mean())
    assert row["effective_adapter_params"] < row["adapter_params"]


# ------------------------------------------------------------------ the research config ---------------------
def test_research_config_gives_the_family_one_alpha_and_one_dropout():
    cfg = pbconfig.load(ROOT / "workflow" / "configs" / "glue-deberta.yaml")
    opts = cfg["method_options"]
    assert {opts[m]["alpha"] for m in FAMILY} == {16.0}
    assert {opts[m]["dropout"] for m in FAMILY} == {0.0}  # the LoRA / AdaLoRA GLUE scripts: no LoRA dropout


# ------------------------------------------------------------------ static baselines --------------------------
@pytest.mark.parametrize("name, kinds", [("lora_attn", ATTENTION_KINDS), ("lora_mlp", MLP_KINDS)])
def test_static_baselines_adapt_only_their_block(tiny_model_dir, name, kinds):
    from peft.tuners.lora import LoraLayer

    method, model, ctx = _build(tiny_model_dir, name, budget=1.0)
    mine = [t for t in ctx.targets if t.kind in kinds]
    adapted = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert len(adapted) == len(mine) == (8 if name == "lora_attn" else 4)
    assert all(any(n.endswith(t.name) for n in adapted) for t in mine)
    # the whole budget on these matrices: a larger rank than LoRA's, the family's parameter count
    r = method.rank()
    assert r == round(ctx.budget_params / per_rank_cost(mine))
    counts = method.param_counts(model)
    assert counts["adapter_params"] == lora_params(mine, r)
    lora, lmodel, _ = _build(tiny_model_dir, "lora", budget=1.0)
    assert r > lora.rank()
    for n in (counts["adapter_params"], lora.param_counts(lmodel)["adapter_params"]):
        assert abs(n - ctx.budget_params) <= 0.1 * ctx.budget_params
    ranks = method.tables(model)["ranks"]
    assert list(ranks["module"]) == [t.name for t in ctx.targets]
    assert (ranks.loc[ranks["kind"].isin(kinds), "rank"] == r).all()
    assert (ranks.loc[~ranks["kind"].isin(kinds), "rank"] == 0).all()
    assert method.summary(model) == {"rank": r, "lora_scale": pytest.approx(16.0 / r), "capacity_limited": False}


@pytest.mark.parametrize("name", ["lora_attn", "lora_mlp"])
def test_static_baselines_report_capacity_limits(tiny_model_dir, name):
    method, model, ctx = _build(tiny_model_dir, name, budget=3.0)  # asks for more than rank 32 of 32x32
    assert method.rank() == 32
    assert method.summary(model)["capacity_limited"] is True
    assert method.budget_count(model) < 0.9 * ctx.budget_params
    lora, lmodel, _ = _build(tiny_model_dir, "lora", budget=3.0)    # capped too, but within 10 %
    assert lora.rank() == 32 and lora.summary(lmodel)["capacity_limited"] is False


def test_static_baselines_are_in_the_table():
    assert {"lora_attn", "lora_mlp"} <= set(METHODS)
    for name in ("lora_attn", "lora_mlp"):
        assert METHODS[name].is_adapter and not METHODS[name].uses_svd


# ------------------------------------------------------------------ gradient norms ----------------------------
class _Toy(torch.nn.Module):
    """Parameter names like a BERT classifier's: embeddings, two encoder layers, an encoder-level
    LayerNorm (DeBERTa has one), a head."""

    def __init__(self):
        super().__init__()
        lin = lambda: torch.nn.Linear(1, 1, bias=False)  # noqa: E731
        self.embeddings = lin()
        self.encoder = torch.nn.Module()
        self.encoder.layer = torch.nn.ModuleList(torch.nn.ModuleDict({"attention": lin(), "intermediate": lin()})
                                                 for _ in range(2))
        self.encoder.LayerNorm = lin()
        self.classifier = lin()


def _toy_with_grads(values):
    toy = _Toy()
    for (n, p), v in zip(toy.named_parameters(), values):
        p.grad = None if v is None else torch.full_like(p, v)
    return toy


def test_gradient_norms_groups_layers_and_total():
    # embeddings 1, layer0 attention 3 / mlp 4, layer1 attention 4 / mlp None (counted 0), LayerNorm 12, head 2
    toy = _toy_with_grads([1.0, 3.0, 4.0, 4.0, None, 12.0, 2.0])
    names = [n for n, _ in toy.named_parameters()]
    assert names[1] == "encoder.layer.0.attention.weight" and names[5] == "encoder.LayerNorm.weight"
    rows = {(g, layer): v for g, layer, v in gradient_norms(toy, list(toy.parameters()))}
    assert rows[("attention", 0)] == 3.0 and rows[("attention", 1)] == 4.0
    assert rows[("attention", -1)] == pytest.approx(5.0)
    assert rows[("mlp", 0)] == 4.0 and rows[("mlp", 1)] == 0.0 and rows[("mlp", -1)] == pytest.approx(4.0)
    assert rows[("embeddings", -1)] == 1.0 and rows[("head", -1)] == 2.0 and rows[("other", -1)] == 12.0
    assert rows[(GRAD_TOTAL, -1)] == pytest.approx(math.sqrt(1 + 9 + 16 + 16 + 144 + 4))
    assert {g for g, _ in rows} == set(GRAD_GROUPS) - {"lm_head"} | {GRAD_TOTAL}  # the toy encoder has no lm_head
    # only the parameters asked for: a group whose every gradient is None is logged as exactly 0
    only = [p for n, p in toy.named_parameters() if n == "encoder.layer.1.intermediate.weight"]
    assert gradient_norms(toy, only) == [("mlp", -1, 0.0), ("mlp", 1, 0.0), (GRAD_TOTAL, -1, 0.0)]
    # default: every parameter with requires_grad or a gradient
    for p in toy.parameters():
        p.requires_grad_(False)
    default = {(g, layer) for g, layer, _ in gradient_norms(toy)}
    assert {g for g, _ in default} == set(GRAD_GROUPS) - {"lm_head"} | {GRAD_TOTAL}
    assert ("mlp", 1) not in default  # neither trainable nor holding a gradient


def test_gradnorm_columns_on_hand_made_rows():
    rows = [  # (step, group, layer, norm): per-layer rows are ignored, the layer -1 rows summarised
        (0, "attention", 0, 100.0), (0, "attention", -1, 3.0), (0, "head", -1, 1.0), (0, GRAD_TOTAL, -1, 4.0),
        (2, "attention", -1, 5.0), (2, "head", -1, 2.0), (2, GRAD_TOTAL, -1, 6.0),
        (4, "attention", -1, 0.0), (4, "head", -1, 3.0), (4, GRAD_TOTAL, -1, 3.0),
        (6, "attention", -1, 0.0), (6, "head", -1, 5.0), (6, GRAD_TOTAL, -1, 5.0),
    ]
    cols = gradnorm_columns(rows)
    assert cols == {"gradnorm_mean_attention": 2.0, "gradnorm_max_attention": 5.0,
                    "gradnorm_mean_head": 2.75, "gradnorm_max_head": 5.0,
                    "gradnorm_mean_total": 4.5, "gradnorm_max_total": 6.0}
    ph = gradnorm_columns(rows, [4, 10])  # phase 0: steps 0, 2; phase 1: 4, 6; phase 2: none logged
    assert ph["gradnorm_mean_attention_p0"] == 4.0 and ph["gradnorm_mean_attention_p1"] == 0.0
    assert ph["gradnorm_mean_head_p0"] == 1.5 and ph["gradnorm_mean_head_p1"] == 4.0
    assert ph["gradnorm_mean_total_p1"] == 4.0 and math.isnan(ph["gradnorm_mean_total_p2"])
    assert {k: v for k, v in ph.items() if "_p" not in k} == cols
    assert gradnorm_columns([]) == {} and gradnorm_columns([(0, "mlp", 1, 2.0)]) == {}


def test_logged_gradnorms_summarised_in_metrics(tiny_model_dir, tiny_data, tmp_path):
    out = _train(tiny_model_dir, tiny_data, tmp_path, "lora", log_gradnorms=True)
    row = pd.read_parquet(out / "metrics.parquet").iloc[0]
    g = pd.read_parquet(out / "gradnorms.parquet")
    whole = g[g.layer == -1]
    for grp in ("attention", "mlp", "head", GRAD_TOTAL):
        v = whole.loc[whole.group == grp, "grad_norm"]
        assert row[f"gradnorm_mean_{grp}"] == pytest.approx(v.mean()) and row[f"gradnorm_max_{grp}"] == v.max()
    # the total is the norm over every group (they are disjoint)
    per_step = whole[whole.group != GRAD_TOTAL].assign(sq=lambda d: d.grad_norm ** 2).groupby("step")["sq"].sum()
    np.testing.assert_allclose(np.sqrt(per_step), whole[whole.group == GRAD_TOTAL].set_index("step")["grad_norm"],
                               rtol=1e-5)
    assert not any(c.endswith("_p0") for c in row.index)  # no phases: no per-phase columns


# ------------------------------------------------------------------ torch.compile ----------------------------
def test_compilable_flags():
    from peftbench.methods import METHODS

    assert [n for n in METHODS if not get_method(n).compilable] == []


@pytest.mark.parametrize("method, backend", [("full", "eager"), ("lora_attn", "eager"), ("lora_mlp", "eager"),
                                             ("phased", "aot_eager"), ("glora", "aot_eager"),
                                             ("fwlora", "aot_eager")])
def test_compiled_training_matches_eager(tiny_model_dir, tiny_data, tmp_path, method, backend):
    """Dynamo-traced training gives the eager run's losses and weights. phased, glora and fwlora
    run through AOTAutograd (``aot_eager``): the captured backward must follow the requires_grad
    flips at each phase start (phased: phases [0, 1), [1, 3), [3, 4)) or around each warm-up step
    (glora, fwlora: base-weight gradients in steps [0, 4) of 8; glora re-allocates, replacing
    modules, at step 4), or frozen factors would be updated and the scores would be wrong."""
    common = dict(task="sst2", epochs=2 if method in ("glora", "fwlora") else 1, length_buckets=2,
                  max_train_samples=64, dropout_kernel="torch")
    a = _train(tiny_model_dir, tiny_data, tmp_path / "a", method, **common)
    b = _train(tiny_model_dir, tiny_data, tmp_path / "b", method, compile=True, compile_backend=backend, **common)
    ma, mb = (pd.read_parquet(d / "metrics.parquet").iloc[0] for d in (a, b))
    assert not ma["compiled"] and mb["compiled"] and mb["compile_note"].startswith(f"compiled (backend {backend}")
    ca, cb = (pd.read_parquet(d / "curve.parquet") for d in (a, b))
    np.testing.assert_allclose(ca.loc[ca.kind == "train", "loss"], cb.loc[cb.kind == "train", "loss"],
                               rtol=1e-5, atol=1e-6)
    wa, wb = (load_file(d / "adapter.safetensors") for d in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)
    assert ma["dev_main"] == pytest.approx(mb["dev_main"], abs=1e-6)
