"""Full fine-tuning: every backbone and head parameter is trained.

Budget: ignored (``budget_free`` in the method table); one run per task and seed, stored under
budget 100.
Options: none; its learning rate is the task recipe's (``training.defaults.lr``).

torch.compile: ``compilable`` (no adapter, a static module set; nothing changes between steps
but the weights).
"""
from __future__ import annotations

from torch import nn

from . import register
from .base import Method


@register
class FullFineTuning(Method):
    """Full fine-tuning baseline (all parameters trainable, AdamW arXiv:1711.05101 on every weight)."""

    name = "full"
    compilable = True

    def build(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
