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
