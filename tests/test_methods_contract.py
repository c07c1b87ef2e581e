"""Table-driven contract of every registered method on a tiny BERT at two budgets.

Checks, for each method: the trainable-parameter count meets the budget (±10 %, or below it when
the method reports ``capacity_limited``), the forward output is finite and equals the pretrained
model's at step 0 where the method promises it (``identity_at_init``), and an optimizer step
changes only the method's own parameters (and the head), never a frozen backbone weight.
"""
from __future__ import annotations

import math

import pytest
import torch

from peftbench.cli import main
from peftbench.methods import METHODS, BuildContext, LoopState, get_method
from peftbench.models import (backbone_param_count, find_targets, head_module_names, is_head_param,
                              load_classifier)
from peftbench.vocab import get_task

BUDGETS = [1.0, 3.0]


def build(name, budget, tiny_model_dir, tiny_svd, total_steps=20):
    task = get_task("sst2")
    torch.manual_seed(0)
    model = load_classifier(str(tiny_model_dir), task)
    torch.manual_seed(0)
    reference = load_classifier(str(tiny_model_dir), task)
    ctx = BuildContext(task=task, budget=budget, backbone_params=backbone_param_count(model),
                       targets=find_targets(model), head_modules=head_module_names(model),
                       total_steps=total_steps, steps_per_epoch=total_steps // 2, seed=0,
                       svd_path=tiny_svd)
    torch.manual_seed(1)
    method = get_method(name)(ctx)
    return method, method.build(model), reference, ctx


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (4, 12), generator=g)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 0])}


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_budget_is_met(name, budget, tiny_model_dir, tiny_svd):
    method, model, _, ctx = build(name, budget, tiny_model_dir, tiny_svd)
    counts = method.param_counts(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["adapter_params"] + counts["head_params"] == trainable
    assert counts["head_params"] == sum(p.numel() for n, p in model.named_parameters()
                                        if p.requires_grad and is_head_param(n))
    assert counts["head_params"] > 0  # classifier (and pooler) always train
    if METHODS[name].budget_free:
        assert counts["adapter_params"] == ctx.backbone_params
        return
    used = method.budget_count(model)
    assert used <= counts["adapter_params"]
    ratio = used / ctx.budget_params
    if method.summary(model).get("capacity_limited"):
        assert ratio <= 1.0
    else:
        assert 0.9 <= ratio <= 1.1, f"{name} at {budget}%: {used} vs {ctx.budget_params:.0f}"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_forward_finite_and_identity_at_init(name, tiny_model_dir, tiny_svd):
    method, model, reference, _ = build(name, BUDGETS[0], tiny_model_dir, tiny_svd)
    model.eval()
    reference.eval()
    b = batch()
    b.pop("labels")
    with torch.no_grad():
        out = model(**b).logits
        ref = reference(**b).logits
    assert out.shape == (4, 2) and torch.isfinite(out).all()
    if get_method(name).identity_at_init:
        assert torch.allclose(out, ref, atol=1e-5), f"{name}: step-0 output differs from the pretrained model"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_step_changes_only_method_parameters(name, tiny_model_dir, tiny_svd):
    method, model, _, _ = build(name, BUDGETS[0], tiny_model_dir, tiny_svd)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(method.parameter_groups(model, 0.01), lr=1e-2)
    state = LoopState(step=0, epoch=0, total_steps=20, steps_per_epoch=10, optimizer=opt)
    state.rebuild = lambda transfer=None: None
    method.on_step_start(model, state)
    out = model(**batch())
    loss = out.loss
    extra = method.extra_loss(model, out, batch(), state)
    if extra is not None:
        loss = loss + extra
    assert math.isfinite(float(loss.detach()))
    loss.backward()
    method.after_backward(model, state)
    opt.step()
    state.step = 1
    changed = {n for n, p in model.named_parameters() if n in before and not torch.equal(before[n], p.detach())}
    assert changed, f"{name}: nothing changed after an optimizer step"
    assert changed <= trainable, f"{name}: frozen parameters changed: {sorted(changed - trainable)[:5]}"
    frozen_backbone = [n for n in before if n not in trainable and not is_head_param(n)]
    if not METHODS[name].budget_free:
        assert frozen_backbone, f"{name}: no frozen backbone weight left"


MERGED = sorted(n for n in METHODS if get_method(n).merge_for_eval)


def test_the_lora_family_and_adalora_evaluate_merged():
    """The flag is set where peft's LoRA layers carry the adapter (so the test below is not empty)."""
    assert {"lora", "adalora", "glora", "fwlora", "phased", "lora_attn", "lora_mlp"} <= set(MERGED)
    assert not get_method("full").merge_for_eval and not get_method("dynacsg").merge_for_eval


@pytest.mark.parametrize("name", MERGED)
def test_merged_evaluation_is_the_same_function_and_restores_the_weights(name, tiny_model_dir, tiny_svd):
    """Within ``merged_adapters`` the logits equal the unmerged forward's (fp32 rounding) for adapters
    moved away from their zero init, and afterwards every weight is the original bit for bit and no
    layer is left merged."""
    from peftbench.merging import lora_layers, merged_adapters

    method, model, _, _ = build(name, BUDGETS[1], tiny_model_dir, tiny_svd)
    torch.manual_seed(2)
    with torch.no_grad():  # a trained-looking adapter: B (and AdaLoRA's Λ) no longer zero
        for n, p in model.named_parameters():
            if p.requires_grad and not is_head_param(n):
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    b = batch()
    b.pop("labels")
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    n_layers = len(lora_layers(model))
    assert n_layers > 0
    with torch.no_grad():
        unmerged = model(**b).logits
        with merged_adapters(model) as merged_count:
            assert merged_count == n_layers and all(m.merged for m in lora_layers_all(model))
            merged = model(**b).logits
        again = model(**b).logits
    assert torch.allclose(merged, unmerged, atol=1e-5, rtol=1e-4), (merged - unmerged).abs().max()
    assert torch.equal(again, unmerged)
    after = model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before), [n for n in before if not torch.equal(before[n], after[n])][:3]
    assert not any(m.merged for m in lora_layers_all(model))


def lora_layers_all(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def test_merged_adapters_restores_the_weights_after_an_exception(tiny_model_dir, tiny_svd):
    from peftbench.merging import merged_adapters

    _, model, _, _ = build("lora", BUDGETS[1], tiny_model_dir, tiny_svd)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.1)
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"):
        with merged_adapters(model):
            raise RuntimeError("boom")
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    assert not any(m.merged for m in lora_layers_all(model))
