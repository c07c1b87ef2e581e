"""LoRA: low-rank adaptation with one rank for every adapted matrix (peft ``LoraConfig``).

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685), Eq. 3:
``h = W0 x + (α / r) B A x`` with ``B ∈ R^{d_out×r}`` (zero-init) and ``A ∈ R^{r×d_in}``
(Kaiming-uniform init), ``W0`` frozen; peft applies the adapter dropout to the adapter's input
``x`` only (``(α / r) B A dropout(x)``), as the paper's ``loralib`` does.

The LoRA family's conventions (lora, adalora, glora, fwlora, phased, lora_attn, lora_mlp): one α
(:data:`LORA_ALPHA` = 16 by default, the ``--lora_alpha 16`` of the LoRA repository's RoBERTa/DeBERTa
GLUE scripts), the update scaled by α over the rank the adapter was *allocated* with (LoRA and its
variants: their rank ``r``; AdaLoRA: its initial rank, see :mod:`peftbench.methods.adalora`), and
one adapter dropout per config (the research config sets 0.0 for the whole family: neither the
LoRA nor the AdaLoRA GLUE scripts pass a LoRA dropout, and ``loralib``'s default is 0.0).

Targets: :attr:`LoRA.target_kinds` (``None``: every kind of :data:`peftbench.vocab.TARGET_KINDS`,
i.e. attention q/k/v/output and both feed-forward matrices of every layer). The static baselines
``lora_attn`` / ``lora_mlp`` restrict it to :data:`~peftbench.vocab.ATTENTION_KINDS` /
:data:`~peftbench.vocab.MLP_KINDS`.

Budget: the uniform rank ``r`` that spends the budget's parameter count ``ctx.budget_params``
over the adapted matrices only (:func:`peftbench.budget.rank_for_params`,
``r Σ_k (d_in,k + d_out,k)`` parameters; a rank budget ``r<N>`` gives exactly ``r = N`` when every
matrix is adapted), so every member of the family holds the same parameter count at a budget;
the real count is recorded. Where ``r`` is capped at the smallest matrix dimension and the adapter still holds less
than 90 % of the budget, ``capacity_limited`` is True (the run is reported at its own count). The
classifier and pooler are trained in full (``modules_to_save``).

torch.compile: ``compilable`` (a static module set and no Python-side state in the forward).
Evaluation: ``merge_for_eval`` (peft's forward, merged into the base weights while evaluating:
:mod:`peftbench.merging`); every member of the family inherits it.

Options (``method_options.lora``): :class:`LoRAOptions`. Its learning rate is the adapter layer's
(``training.adapters.lr``), as for every adapter method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..budget import lora_params, per_rank_cost, rank_for_params
from ..models import Target
from . import register
from .base import Method, ranks_frame
from .options import MethodOptions, option

#: The LoRA family's default α (the LoRA repository's GLUE scripts: ``--lora_r 8 --lora_alpha 16``).
LORA_ALPHA = 16.0


def peft_task_type(task):
    """peft's ``TaskType`` of a task: ``CAUSAL_LM`` on the causal-LM track (no head to save; the
    wrapped model keeps ``generate``), ``SEQ_CLS`` on the encoder track."""
    from peft import TaskType

    return TaskType.CAUSAL_LM if task.is_causal else TaskType.SEQ_CLS


def peft_targets(targets) -> list[str]:
    """Target names for peft: the full module names (matched exactly / as suffixes by peft)."""
    return [t.name for t in targets]


@dataclass
class LoRAOptions(MethodOptions):
    """Options of LoRA and of every method built on it (glora, fwlora, phased, lora_attn, lora_mlp)."""

    alpha: float = option(LORA_ALPHA, "LoRA scaling numerator α: the update is (α / r) B A (Hu et al. 2021, "
                                      "arXiv:2106.09685, Eq. 3), > 0")
    dropout: float = option(0.1, "dropout probability on the adapter input, in [0, 1)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require("alpha", self.alpha > 0, "must be > 0")
        self.require("dropout", 0 <= self.dropout < 1, "must be in [0, 1)")


@register
class LoRA(Method):
    """Uniform-rank LoRA via peft on the matrices of :attr:`target_kinds` (see module docstring).

    Class attributes:
        target_kinds: the target kinds this method adapts; ``None`` = all of
            :data:`peftbench.vocab.TARGET_KINDS`. A subclass that sets it spends the whole budget
            on those matrices (its uniform rank is larger).
    """

    name = "lora"
    options_cls = LoRAOptions
    identity_at_init = True
    compilable = True
    merge_for_eval = True
    target_kinds: ClassVar[tuple[str, ...] | None] = None

    def adapted_targets(self) -> list[Target]:
        """The targets this method puts an adapter on (``ctx.targets`` filtered by :attr:`target_kinds`).

        Raises:
            ValueError: the model has no target of these kinds.
        """
        if self.target_kinds is None:
            return list(self.ctx.targets)
        out = [t for t in self.ctx.targets if t.kind in self.target_kinds]
        if not out:
            raise ValueError(f"{self.name}: the model has no target matrix of kinds {list(self.target_kinds)}")
        return out

    def rank(self) -> int:
        """The uniform rank for this run's budget over :meth:`adapted_targets`
        (:func:`peftbench.budget.rank_for_params` of ``ctx.budget_params``)."""
        return rank_for_params(self.ctx.budget_params, self.adapted_targets())

    def capacity_limited(self) -> bool:
        """The budget asks for more than the largest uniform rank (the smallest matrix dimension)
        and the capped adapter holds less than 90 % of it."""
        targets = self.adapted_targets()
        cap = min(min(t.d_in, t.d_out) for t in targets)
        wanted = self.ctx.budget_params / per_rank_cost(targets)
        return bool(wanted > cap and lora_params(targets, self.rank()) < 0.9 * self.ctx.budget_params)

    def build(self, model: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(task_type=peft_task_type(self.ctx.task), r=self.rank(), lora_alpha=self.options.alpha,
                         lora_dropout=self.options.dropout, target_modules=peft_targets(self.adapted_targets()),
                         modules_to_save=self.ctx.head_modules or None)
        return get_peft_model(model, cfg)

    def summary(self, model: nn.Module) -> dict:
        """``rank`` (uniform rank of the adapted matrices), ``lora_scale`` (α / r, the factor of B A)
        and ``capacity_limited``."""
        r = self.rank()
        return {"rank": r, "lora_scale": self.options.alpha / r, "capacity_limited": self.capacity_limited()}

    def tables(self, model: nn.Module) -> dict:
        """``ranks``: one row per target matrix; matrices outside :attr:`target_kinds` have rank 0."""
        adapted = {t.name for t in self.adapted_targets()}
        r = self.rank()
        return {"ranks": ranks_frame(self.ctx.targets, [r if t.name in adapted else 0 for t in self.ctx.targets])}
