"""FW-LoRA: Fisher-weighted LoRA (uniform rank, importance-weighted penalty on the update).

Source: DESIGN.md method table (seed 001). Every target matrix ``W_m`` (attention q/k/v/output,
both feed-forward) gets LoRA (Hu et al. 2021, Eq. 3) at the budget's uniform rank ``r``:
``h = W_m x + s B_m A_m x``, ``s = α / r``, ``ΔW_m = s B_m A_m``.

Warm-up (``K`` optimizer steps): the frozen pretrained weights temporarily get ``requires_grad``
so that backward fills ``∇W_m = ∂L/∂W_m``; after each backward the method reads it and sets it to
``None`` (the base weights are never in the optimizer and never updated). It keeps the diagonal-
Fisher-style sensitivity::

    F_m ← β F_m + (1 − β) ‖∇W_m‖²_F          (β = 0.98; EMA started at 0)

After step ``K`` the base weights are frozen again and ``I_m = F_m / Σ_j F_j`` (Σ_m I_m = 1; uniform
if every F_m is 0). From then on the training loss is::

    L + λ Σ_m (1 − I_m) ‖ΔW_m‖²_F,      ‖ΔW_m‖²_F = ‖s B A‖²_F = s² tr((BᵀB)(AAᵀ))

computed in ``r × r`` form (never forming the ``d_out × d_in`` product) in fp32: important matrices
are penalised less. The penalty is 0 during warm-up and logged every logged step as the
``penalty`` column of ``curve.parquet``.

Budget: the uniform LoRA rank of the budget (:func:`peftbench.budget.uniform_rank`): exactly LoRA's
parameter count, so within ±10 % whenever LoRA is; ``capacity_limited`` is reported when the rank is
at the smallest matrix dimension and still below 90 % of the budget.

Options (``method_options.fwlora``): :class:`FWLoRAOptions`. The warm-up is
``K = min(warmup_steps, round(warmup_fraction · total_steps))`` (either may be null to use only the
other), at least 1 and at most the run's total steps.

Outputs: ``ranks.parquet`` with rank = r, score = I_m, plus ``fisher`` (F_m) and ``importance`` (I_m).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import register
from .base import LoopState, ranks_frame
from .glora import ADAPTER, LoRAWithBaseGradients, base_weights, capacity_limited
from .lora import LoRAOptions
from .options import option


@dataclass
class FWLoRAOptions(LoRAOptions):
    """Options of Fisher-weighted LoRA (alpha and dropout as in LoRA)."""

    lam: float = option(1e-4, "weight λ of the penalty λ Σ_m (1 − I_m) ‖ΔW_m‖²_F, ≥ 0")
    beta: float = option(0.98, "EMA factor β of the squared gradient norm F_m, in [0, 1)")
    warmup_steps: int | None = option(500, "warm-up cap K in optimizer steps, ≥ 0; null: only warmup_fraction")
    warmup_fraction: float | None = option(0.1, "warm-up cap as a fraction of total steps, in [0, 1]; "
                                                "null: only warmup_steps")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require("lam", self.lam >= 0, "must be ≥ 0")
        self.require("beta", 0 <= self.beta < 1, "must be in [0, 1)")
        self.require("warmup_steps", self.warmup_steps is None or self.warmup_steps >= 0, "must be ≥ 0 or null")
        self.require("warmup_fraction", self.warmup_fraction is None or 0 <= self.warmup_fraction <= 1,
                     "must be in [0, 1] or null")


def lora_update_sq_norm(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``‖s B A‖²_F = s² tr((BᵀB)(AAᵀ))`` in ``r × r`` form.

    Args:
        A: ``(r, d_in)`` LoRA down-projection. B: ``(d_out, r)`` up-projection. scaling: ``s = α / r``.

    Returns:
        A scalar tensor (differentiable w.r.t. ``A`` and ``B``); both Gram matrices are symmetric,
        so the trace of their product is the sum of their elementwise product.
    """
    return scaling ** 2 * ((B.t() @ B) * (A @ A.t())).sum()


@register
class FWLoRA(LoRAWithBaseGradients):
    """Fisher-weighted LoRA: uniform rank plus an importance-weighted ‖ΔW‖² penalty after warm-up."""

    name = "fwlora"
    options_cls = FWLoRAOptions

    def __init__(self, ctx):
        super().__init__(ctx)
        steps, frac = self.options.warmup_steps, self.options.warmup_fraction
        cands = [int(steps)] if steps is not None else []
        if frac is not None:
            cands.append(round(float(frac) * ctx.total_steps))
        k = min(cands) if cands else ctx.total_steps
        self.warmup = max(1, min(k, ctx.total_steps))
        n = len(ctx.targets)
        self.r0 = self.rank()
        self.fisher = [0.0] * n
        self.importance: list[float] | None = None
        self.modules: list[nn.Module] = []
        self.last_penalty = 0.0

    # -- hooks ------------------------------------------------------------------------------------
    def on_step_start(self, model: nn.Module, state: LoopState) -> None:
        if self.importance is None and state.step < self.warmup:
            for w in base_weights(self.modules):
                w.requires_grad_(True)

    def penalty(self) -> torch.Tensor:
        """``λ Σ_m (1 − I_m) ‖ΔW_m‖²_F`` (fp32 scalar); zero before the importances exist."""
        dev = self.modules[0].lora_A[ADAPTER].weight.device
        if self.importance is None:
            return torch.zeros((), device=dev)
        with torch.autocast(dev.type, enabled=False):
            terms = [(1.0 - i) * lora_update_sq_norm(m.lora_A[ADAPTER].weight.float(), m.lora_B[ADAPTER].weight.float(),
                                                    float(m.scaling[ADAPTER]))
                     for m, i in zip(self.modules, self.importance)]
            return float(self.options.lam) * torch.stack(terms).sum()

    def extra_loss(self, model: nn.Module, outputs: Any, batch: dict[str, torch.Tensor],
                   state: LoopState) -> torch.Tensor | None:
        if self.importance is None:
            state.log["penalty"] = 0.0
            return None
        pen = self.penalty()
        state.log["penalty"] = float(pen.detach())
        self.last_penalty = state.log["penalty"]
        return pen

    def after_backward(self, model: nn.Module, state: LoopState) -> None:
        if self.importance is not None:
            return
        beta = float(self.options.beta)
        for k, w in enumerate(base_weights(self.modules)):
            g = w.grad
            sq = 0.0 if g is None else float(g.detach().float().pow(2).sum())
            self.fisher[k] = beta * self.fisher[k] + (1 - beta) * sq
            w.grad = None

    def after_optimizer_step(self, model: nn.Module, state: LoopState) -> None:
        if self.importance is None and state.step >= self.warmup:
            self.finish_warmup()

    def checkpoint_state(self, model: nn.Module) -> dict:
        """Fisher EMAs F_m, importances I_m (None during warm-up) and the last penalty."""
        return {"fisher": list(self.fisher), "importance": self.importance, "last_penalty": self.last_penalty}

    def restore_checkpoint_state(self, model: nn.Module, state: dict) -> None:
        if state:
            self.fisher, self.importance = list(state["fisher"]), state["importance"]
            self.last_penalty = state["last_penalty"]

    def finish_warmup(self) -> None:
        """Freeze the base weights again and set ``I_m = F_m / Σ_j F_j``."""
        for w in base_weights(self.modules):
            w.requires_grad_(False)
            w.grad = None
        tot = sum(self.fisher)
        n = len(self.fisher)
        self.importance = [f / tot for f in self.fisher] if tot > 0 else [1.0 / n] * n

    # -- reporting --------------------------------------------------------------------------------
    def param_counts(self, model: nn.Module) -> dict[str, int]:
        counts = super().param_counts(model)
        counts["adapter_params"] -= sum(w.numel() for w in base_weights(self.modules) if w.requires_grad)
        return counts

    def summary(self, model: nn.Module) -> dict:
        return {"rank": self.r0, "capacity_limited": capacity_limited(self.ctx, self.r0),
                "warmup_steps": self.warmup, "lam": float(self.options.lam),
                "final_penalty": self.last_penalty}

    def tables(self, model: nn.Module) -> dict:
        imp = self.importance if self.importance is not None else [float("nan")] * len(self.fisher)
        return {"ranks": ranks_frame(self.ctx.targets, [self.r0] * len(self.fisher), imp,
                                     fisher=list(self.fisher), importance=list(imp))}
