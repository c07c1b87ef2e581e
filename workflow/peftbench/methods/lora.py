"""LoRA: low-rank adaptation with one rank for every target matrix (peft ``LoraConfig``).

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", Eq. 3:
``h = W0 x + (α / r) B A x`` with ``B ∈ R^{d_out×r}`` (zero-init) and ``A ∈ R^{r×d_in}``
(Kaiming-uniform init), ``W0`` frozen.

Budget: the uniform rank ``r`` that spends ``budget`` % of backbone parameters over the
attention q/k/v/output and both feed-forward matrices (:func:`peftbench.budget.uniform_rank`);
the real count is recorded. The classifier and pooler are trained in full (``modules_to_save``).

Options (``methods.lora`` in config): ``alpha`` (16, scaling α/r), ``dropout`` (0.1, on the
adapter input). Its learning rate is ``training.methods.lora.lr``.
"""
from __future__ import annotations

from torch import nn

from ..budget import uniform_rank
from . import register
from .base import Method, ranks_frame


def peft_targets(targets) -> list[str]:
    """Target names for peft: the full module names (matched exactly / as suffixes by peft)."""
    return [t.name for t in targets]


@register
class LoRA(Method):
    """Uniform-rank LoRA via peft."""

    name = "lora"
    identity_at_init = True
    compilable = True
    default_options = {"alpha": 16, "dropout": 0.1}

    def rank(self) -> int:
        """The uniform rank for this run's budget."""
        return uniform_rank(self.ctx.budget, self.ctx.backbone_params, self.ctx.targets)

    def build(self, model: nn.Module) -> nn.Module:
        from peft import LoraConfig, TaskType, get_peft_model

        cfg = LoraConfig(task_type=TaskType.SEQ_CLS, r=self.rank(), lora_alpha=self.options["alpha"],
                         lora_dropout=self.options["dropout"], target_modules=peft_targets(self.ctx.targets),
                         modules_to_save=self.ctx.head_modules)
        return get_peft_model(model, cfg)

    def summary(self, model: nn.Module) -> dict:
        return {"rank": self.rank()}

    def tables(self, model: nn.Module) -> dict:
        return {"ranks": ranks_frame(self.ctx.targets, [self.rank()] * len(self.ctx.targets))}
