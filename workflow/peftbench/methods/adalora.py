"""AdaLoRA: SVD-parameterised LoRA whose rank budget is pruned by importance (peft ``AdaLoraConfig``).

Zhang et al., ICLR 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"
(arXiv:2303.10512): ``ΔW = P Λ Q`` (Eq. 3) with an orthogonality regulariser
``‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F`` (Eq. 4); singular values are masked by a sensitivity-based
importance score smoothed by EMAs β1, β2 (Eq. 8–11) while the total budget falls on a cubic
schedule from ``init_r`` to ``target_r`` per matrix between ``tinit`` and ``total_step − tfinal``
(Eq. 12).

Scaling (α convention). peft's ``SVDLinear`` (peft/tuners/adalora/layer.py), like the paper's own
``loralib.SVDLinear`` (QingruZhang/AdaLoRA ``loralib/loralib/adalora.py``), computes
``h = W0 x + (α / ranknum) P (Λ ⊙ Q dropout(x))`` with ``ranknum = init_r``: set once when the
layer is built and **never lowered while masking**, so the scale stays ``α / init_r`` for the
whole run, whatever rank a matrix is pruned to. At the same final rank ``r = target_r`` as LoRA
(scale ``α / r``), AdaLoRA's update is therefore scaled by ``r / init_r`` of LoRA's
(``init_r = ceil(1.5 r)``: 2/3 at r = 8, 8/12). The family shares one convention: the same α
(:data:`peftbench.methods.lora.LORA_ALPHA` = 16 by default, LoRA's option class) divided by the
rank the adapter was allocated with (``init_r`` here, as in the official code); α is not rescaled
to equalise the scale with LoRA's at ``target_r``, because the official scripts do not do that
either (``NLU/scripts/run_debertav3_*.sh``: ``--lora_alpha 16`` for MNLI/QQP/SST-2, 32 for
CoLA/QNLI/RTE/MRPC/STS-B, with ``ranknum = lora_r`` = the initial rank). Before this convention
the option defaulted to peft's ``lora_alpha = 8`` (scale 8 / init_r, a third of LoRA's 16 / r at
the same final rank with init_ratio 1.5).

Dropout: the LoRA family's (``dropout`` option, inherited from :class:`LoRAOptions`); the
official AdaLoRA scripts pass none (``loralib``'s default 0.0).

peft pitfalls handled here (see DESIGN.md): ``update_and_allocate(step)`` runs after
``optimizer.step()`` and before ``zero_grad()`` (peft#1327, #1801); the orthogonal regulariser is
only added when the model returns ``.loss`` (the loop always passes labels); ``total_step`` is the
run's real number of steps and ``tinit < total_step − tfinal``; pruned singular values are masked,
not removed, so the trainable count stays at ``init_r`` size: both the allocated count
(``trainable_params``) and the count left after pruning (``effective_adapter_params``) are reported.

Budget: ``target_r`` is the uniform LoRA rank for the budget's parameter count
(:func:`peftbench.budget.rank_for_params` of ``ctx.budget_params``; the final, pruned budget
matches LoRA's; budget ``r8`` gives ``target_r = 8``); ``init_r = ceil(init_ratio × target_r)``
(paper: 12 → 8, ratio 1.5).

torch.compile: ``compilable``: the allocation masks ``Λ`` in place between steps (outside the
traced forward) and changes no module or shape.

Options (``method_options.adalora``): :class:`AdaLoRAOptions`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ..budget import rank_for_params
from . import register
from .base import LoopState, Method, ranks_frame
from .lora import LORA_ALPHA, LoRAOptions, peft_targets, peft_task_type
from .options import option


@dataclass
class AdaLoRAOptions(LoRAOptions):
    """Options of AdaLoRA: ``alpha`` and ``dropout`` as in LoRA (the family's convention), the rest
    named as in peft's ``AdaLoraConfig`` where they map onto it."""

    alpha: float = option(LORA_ALPHA, "scaling numerator α (peft lora_alpha), > 0: the update is (α / init_r) "
                                      "P Λ Q for the whole run (peft and loralib keep ranknum = init_r)")
    init_ratio: float = option(1.5, "initial rank per matrix = ceil(init_ratio × target rank), ≥ 1 (paper: 12 → 8)")
    tinit: float = option(0.1, "initial warm-up without pruning, fraction of total steps, in [0, 1)")
    tfinal: float = option(0.2, "final fine-tuning with the budget fixed, fraction of total steps, in [0, 1)")
    delta_t: int = option(10, "optimizer steps between two budget allocations, ≥ 1")
    beta1: float = option(0.85, "EMA factor of the sensitivity (Eq. 9), in [0, 1)")
    beta2: float = option(0.85, "EMA factor of the uncertainty (Eq. 10), in [0, 1)")
    orth_reg_weight: float = option(0.1, "weight γ of the orthogonality regulariser (Eq. 4), ≥ 0")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require("init_ratio", self.init_ratio >= 1, "must be ≥ 1")
        self.require("tinit", 0 <= self.tinit < 1, "must be in [0, 1)")
        self.require("tfinal", 0 <= self.tfinal < 1 and self.tinit + self.tfinal < 1,
                     "must be in [0, 1) with tinit + tfinal < 1")
        self.require("delta_t", self.delta_t >= 1, "must be ≥ 1")
        self.require("beta1", 0 <= self.beta1 < 1, "must be in [0, 1)")
        self.require("beta2", 0 <= self.beta2 < 1, "must be in [0, 1)")
        self.require("orth_reg_weight", self.orth_reg_weight >= 0, "must be ≥ 0")


@register
class AdaLoRA(Method):
    """AdaLoRA via peft, with its schedule derived from the real number of steps."""

    name = "adalora"
    options_cls = AdaLoRAOptions
    identity_at_init = True
    compilable = True
    merge_for_eval = True  # peft's SVDLinear.merge: W0 + α P Λ Q / ranknum (the masked Λ as trained)

    def schedule(self) -> dict[str, int]:
        """``target_r``, ``init_r``, ``tinit``, ``tfinal``, ``deltaT``, ``total_step`` for peft.

        Guarantees ``tinit < total_step − tfinal`` (peft requires it) for any run of ≥ 3 steps.

        Raises:
            ValueError: fewer than 3 training steps (no room for a budget schedule).
        """
        total = self.ctx.total_steps
        if total < 3:
            raise ValueError(f"adalora needs at least 3 training steps, the run has {total}; "
                             f"train on more examples or for more epochs")
        target_r = rank_for_params(self.ctx.budget_params, self.ctx.targets)
        init_r = max(target_r, math.ceil(self.options.init_ratio * target_r))
        tinit = int(self.options.tinit * total)
        tfinal = int(self.options.tfinal * total)
        while tinit >= total - tfinal:  # tiny runs: shrink warm-up/final phases
            tinit, tfinal = max(tinit - 1, 0), max(tfinal - 1, 0)
        delta_t = max(1, min(int(self.options.delta_t), total - tfinal - tinit))
        return {"target_r": target_r, "init_r": init_r, "tinit": tinit, "tfinal": tfinal,
                "deltaT": delta_t, "total_step": total}

    def build(self, model: nn.Module) -> nn.Module:
        from peft import AdaLoraConfig, get_peft_model

        s = self.schedule()
        cfg = AdaLoraConfig(task_type=peft_task_type(self.ctx.task), target_modules=peft_targets(self.ctx.targets),
                            modules_to_save=self.ctx.head_modules or None, lora_alpha=self.options.alpha,
                            lora_dropout=self.options.dropout, beta1=self.options.beta1, beta2=self.options.beta2,
                            orth_reg_weight=self.options.orth_reg_weight, **s)
        return get_peft_model(model, cfg)

    def after_optimizer_step(self, model: nn.Module, state: LoopState) -> None:
        # peft: after optimizer.step(), before zero_grad(), with the global step.
        model.base_model.update_and_allocate(state.step)

    def checkpoint_state(self, model: nn.Module) -> dict:
        """peft's RankAllocator EMAs (importance, uncertainty) and the current rank pattern."""
        alloc = model.base_model.rankallocator
        clone = lambda d: {k: v.detach().cpu().clone() for k, v in d.items()}  # noqa: E731
        return {"ipt": clone(alloc.ipt), "exp_avg_ipt": clone(alloc.exp_avg_ipt),
                "exp_avg_unc": clone(alloc.exp_avg_unc),
                "rank_pattern": model.peft_config["default"].rank_pattern}

    def restore_checkpoint_state(self, model: nn.Module, state: dict) -> None:
        if not state:
            return
        alloc = model.base_model.rankallocator
        dev = next(model.parameters()).device
        for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            setattr(alloc, key, {k: v.to(dev) for k, v in state[key].items()})
        model.peft_config["default"].rank_pattern = state["rank_pattern"]

    def budget_count(self, model: nn.Module) -> int:
        """Parameters of the final allocation: ``target_r`` per matrix on average (P, Λ, Q)."""
        r = self.schedule()["target_r"]
        return sum(r * (t.d_in + t.d_out + 1) for t in self.ctx.targets)

    def current_ranks(self, model: nn.Module) -> list[int]:
        """Non-zero singular values ``Λ`` per target, in ``ctx.targets`` order: the rank each matrix
        holds now. ``Λ`` starts at zero (peft's init), so this is 0 before the first step; after the
        final allocation (step ``total_step − tfinal``) the masked entries stay exactly 0 and the
        ranks sum to at most ``target_r × len(targets)``."""
        from peft.tuners.adalora import AdaLoraLayer

        by_name = {}
        for name, mod in model.named_modules():
            if isinstance(mod, AdaLoraLayer) and "default" in mod.lora_E:
                by_name[name] = int((mod.lora_E["default"].detach() != 0).sum())
        ranks = []
        for t in self.ctx.targets:
            match = [v for k, v in by_name.items() if k.endswith(t.name)]
            ranks.append(match[0] if match else 0)
        return ranks

    def summary(self, model: nn.Module) -> dict:
        """``rank`` (target_r), ``init_rank``, ``lora_scale`` (α / init_r), ``effective_adapter_params``
        and ``mean_final_rank`` (mean of :meth:`current_ranks`)."""
        s = self.schedule()
        ranks = self.current_ranks(model)
        eff = sum(r * (t.d_in + t.d_out + 1) for r, t in zip(ranks, self.ctx.targets))
        return {"rank": s["target_r"], "init_rank": s["init_r"], "lora_scale": self.options.alpha / s["init_r"],
                "effective_adapter_params": eff,
                "mean_final_rank": float(sum(ranks) / max(len(ranks), 1))}

    def tables(self, model: nn.Module) -> dict:
        return {"ranks": ranks_frame(self.ctx.targets, self.current_ranks(model))}
