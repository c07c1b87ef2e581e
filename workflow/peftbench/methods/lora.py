"""LoRA: low-rank adaptation with one rank for every target matrix (peft ``LoraConfig``).

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", Eq. 3:
``h = W0 x + (α / r) B A x`` with ``B ∈ R^{d_out×r}`` (zero-init) and ``A ∈ R^{r×d_in}``
(Kaiming-uniform init), ``W0`` frozen.

Budget: the uniform rank ``r`` that spends the budget's parameter count ``ctx.budget_params`` over
the attention q/k/v/output and both feed-forward matrices (:func:`peftbench.budget.rank_for_params`;
a rank budget ``r<N>`` gives exactly ``r = N``); the real count is recorded. The classifier and pooler are trained in full (``modules_to_save``).

Options (``method_options.lora``): :class:`LoRAOptions`. Its learning rate is the adapter layer's
(``training.adapters.lr``), as for every adapter method.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..budget import rank_for_params
from . import register
from .base import Method, ranks_frame
from .options import MethodOptions, option


def peft_targets(targets) -> list[str]:
    """Target names for peft: the full module names (matched exactly / as suffixes by peft)."""
    return [t.name for t in targets]


@dataclass
class LoRAOptions(MethodOptions):
    """Options of LoRA and of every method built on it (glora, fwlora, phased)."""

    alpha: float = option(16, "LoRA scaling numerator α: the update is (α / r) B A (Hu et al. 2021, Eq. 3)")
    dropout: float = option(0.1, "dropout probability on the adapter input, in [0, 1)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require("alpha", self.alpha > 0, "must be > 0")
        self.require("dropout", 0 <= self.dropout < 1, "must be in [0, 1)")


@register
class LoRA(Method):
    """Uniform-rank LoRA via peft."""

    name = "lora"
    options_cls = LoRAOptions
    identity_at_init = True
    compilable = True

    def rank(self) -> int:
        """The uniform rank for this run's budget (:func:`peftbench.budget.rank_for_params`)."""
        return rank_for_params(self.ctx.budget_params, self.ctx.targets)

    def build(self, model: nn.Module) -> nn.Module:
        from peft import LoraConfig, TaskType, get_peft_model

        cfg = LoraConfig(task_type=TaskType.SEQ_CLS, r=self.rank(), lora_alpha=self.options.alpha,
                         lora_dropout=self.options.dropout, target_modules=peft_targets(self.ctx.targets),
                         modules_to_save=self.ctx.head_modules)
        return get_peft_model(model, cfg)

    def summary(self, model: nn.Module) -> dict:
        return {"rank": self.rank()}

    def tables(self, model: nn.Module) -> dict:
        return {"ranks": ranks_frame(self.ctx.targets, [self.rank()] * len(self.ctx.targets))}
