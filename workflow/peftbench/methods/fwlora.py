"""FW-LoRA: Fisher-weighted LoRA (uniform rank, importance-weighted penalty on the update).

Source: seed 001 (DESIGN.md method table). Every target matrix ``W_m`` (attention q/k/v/output,
both feed-forward; ``M`` of them) gets LoRA (Hu et al. 2021, arXiv:2106.09685, Eq. 3) at the
budget's uniform rank ``r``: ``h = W_m x + s B_m A_m x``, ``s = α / r``, ``ΔW_m = s B_m A_m``.

Warm-up (``K`` optimizer steps): for the forward/backward of each warm-up step the frozen
pretrained weights get ``requires_grad`` so that backward fills ``∇W_m = ∂L/∂W_m``; after the
backward the method reads it, drops it and freezes the weights again (they are never in the
optimizer and never updated). It keeps the diagonal-Fisher-style sensitivity (the squared
gradient norm, summed over the matrix's entries; cf. the empirical Fisher of elastic weight
consolidation, Kirkpatrick et al. 2017, arXiv:1612.00796)::

    F_m ← β F_m + (1 − β) ‖∇W_m‖²_F          (β = 0.98; F_m = 0 at the start)

After step ``K`` the importances are ``I_m = F_m / Σ_j F_j`` (Σ_m I_m = 1; uniform if every F_m is
0; the zero start scales every F_m by the same ``1 − β^K`` and cancels), and from then on the
training loss is the seed's::

    L + λ Σ_m (1 − I_m) ‖ΔW_m‖²_F,      ‖ΔW_m‖²_F = ‖s B A‖²_F = s² tr((BᵀB)(AAᵀ)),  λ = 1e-4

computed in ``r × r`` form (never forming the ``d_out × d_in`` product) in fp32: important matrices
are penalised less. Note that with ``Σ I_m = 1`` over ``M`` matrices (72 on a 12-layer encoder) the
weights ``1 − I_m`` all lie within ``max_m I_m`` of 1, so the weighting differs from a uniform
``1 − 1/M`` by little unless the Fisher mass is concentrated; the ``fwlora_uniform`` control
(``I_m = 1/M``) measures exactly that difference. The penalty is 0 during warm-up and logged as
the ``penalty`` column of ``curve.parquet`` (a device tensor, read only at logged steps).

Warm-up length: ``K = min(warmup_steps, round(warmup_fraction · total_steps))`` over the options
that are not null (default: ``warmup_steps = 500``, the seed's; both null: half the run), then
clamped by :func:`~peftbench.methods.glora.warmup_length` to at most half the run (the penalty
acts for at least half of it) and at least ``min(min_warmup_steps, total_steps // 2)`` (20 steps:
the importances then average an effective 19.7 minibatches at β = 0.98, not one).

Budget: the uniform LoRA rank of the budget (:func:`peftbench.budget.rank_for_params` of ``ctx.budget_params``): exactly LoRA's
parameter count, so within ±10 % whenever LoRA is; ``capacity_limited`` is reported when the rank is
at the smallest matrix dimension and still below 90 % of the budget.

Hot path: the Fisher EMAs and the penalty stay on the device; the host reads the EMAs once, at the
end of the warm-up. ``compilable``: the base weights' ``requires_grad`` is on around every
warm-up step and off after it; Dynamo guards on it, so a compiled run holds two variants of the
training graph (warm-up and after it), each compiled once per batch shape and timed as
compilation (``compile_s``).

Options (``method_options.fwlora``): :class:`FWLoRAOptions`.

Outputs: ``ranks.parquet`` with rank = r, score = I_m, plus ``fisher`` (F_m) and ``importance`` (I_m).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import register
from .base import LoopState, ranks_frame
from .glora import (ADAPTER, BaseGradientOptions, LoRAWithBaseGradients, capacity_limited, frobenius_norms,
                    shares, warmup_length)
from .options import option


@dataclass
class FWLoRAOptions(BaseGradientOptions):
    """Options of Fisher-weighted LoRA and its control (alpha and dropout as in LoRA; defaults: seed 001)."""

    lam: float = option(1e-4, "weight λ of the penalty λ Σ_m (1 − I_m) ‖ΔW_m‖²_F, ≥ 0")
    beta: float = option(0.98, "EMA factor β of the squared gradient norm F_m, in [0, 1)")
    warmup_steps: int | None = option(500, "warm-up length K in optimizer steps, ≥ 0 (then clamped to "
                                           "[min(min_warmup_steps, total_steps // 2), total_steps // 2]); "
                                           "null: only warmup_fraction")
    warmup_fraction: float | None = option(None, "warm-up length as a fraction of total steps, in [0, 1]; with "
                                                 "warmup_steps the smaller of the two; both null: half the run")

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
    """Fisher-weighted LoRA, seed 001: uniform rank plus an importance-weighted ‖ΔW‖² penalty after warm-up.

    Subclasses (the control) change :meth:`importances` only.
    """

    name = "fwlora"
    options_cls = FWLoRAOptions
    graph_variants = 2  # warm-up (base gradients on) and after it; no module is replaced

    def __init__(self, ctx):
        super().__init__(ctx)
        o = self.options
        asked = [int(o.warmup_steps)] if o.warmup_steps is not None else []
        if o.warmup_fraction is not None:
            asked.append(round(float(o.warmup_fraction) * ctx.total_steps))
        self.warmup = warmup_length(min(asked) if asked else ctx.total_steps // 2, ctx.total_steps,
                                    o.min_warmup_steps)
        n = len(ctx.targets)
        self.r0 = self.rank()
        self.fisher = torch.zeros(n)  # F_m, fp32; on the factors' device from the first update on
        self.importance: list[float] | None = None
        self._weights: torch.Tensor | None = None  # (M,) λ (1 − I_m) on the device, built on first use
        self.modules: list[nn.Module] = []
        self.last_penalty: torch.Tensor | float = 0.0

    # -- hooks ------------------------------------------------------------------------------------
    def on_step_start(self, model: nn.Module, state: LoopState) -> None:
        if self.importance is None and state.step < self.warmup:
            self.base_grads_on()

    def penalty(self) -> torch.Tensor:
        """``λ Σ_m (1 − I_m) ‖ΔW_m‖²_F`` (fp32 scalar on the device); zero before the importances exist."""
        dev = self._device()
        if self.importance is None:
            return torch.zeros((), device=dev)
        if self._weights is None or self._weights.device != dev:
            lam = float(self.options.lam)
            self._weights = torch.tensor([lam * (1.0 - i) for i in self.importance], dtype=torch.float32, device=dev)
        with torch.autocast(dev.type, enabled=False):
            sq = torch.stack([lora_update_sq_norm(m.lora_A[ADAPTER].weight.float(), m.lora_B[ADAPTER].weight.float(),
                                                  float(m.scaling[ADAPTER])) for m in self.modules])
            return (self._weights * sq).sum()

    def extra_loss(self, model: nn.Module, outputs: Any, batch: dict[str, torch.Tensor],
                   state: LoopState) -> torch.Tensor | None:
        if self.importance is None:
            state.log["penalty"] = 0.0
            return None
        pen = self.penalty()
        self.last_penalty = state.log["penalty"] = pen.detach()  # a device tensor: read at logged steps only
        return pen

    def after_backward(self, model: nn.Module, state: LoopState) -> None:
        if self.importance is not None:
            return
        beta = float(self.options.beta)
        sq = frobenius_norms([[g] for g in self.pop_base_grads()], self._device()).square()
        if self.fisher.device != sq.device:
            self.fisher = self.fisher.to(sq.device)
        self.fisher.mul_(beta).add_(sq, alpha=1.0 - beta)  # in place on the device: no host sync

    def after_optimizer_step(self, model: nn.Module, state: LoopState) -> None:
        if self.importance is None and state.step >= self.warmup:
            self.finish_warmup()

    def importances(self, fisher: list[float]) -> list[float]:
        """``I_m = F_m / Σ_j F_j`` (uniform when every F_m is 0).

        Args:
            fisher: ``(M,)`` the warm-up EMAs ``F_m``.
        """
        return shares(fisher)

    def finish_warmup(self) -> None:
        """Freeze the base weights again and set the importances (the one host read of ``F_m``)."""
        self.pop_base_grads()
        self.importance = self.importances(self.fisher.tolist())
        self._weights = None

    # -- checkpoints ------------------------------------------------------------------------------
    def checkpoint_state(self, model: nn.Module) -> dict:
        """Fisher EMAs F_m, importances I_m (None during warm-up) and the last penalty."""
        return {"fisher": self.fisher.tolist(), "importance": self.importance,
                "last_penalty": float(self.last_penalty)}

    def restore_checkpoint_state(self, model: nn.Module, state: dict) -> None:
        if state:
            self.fisher = torch.tensor(state["fisher"], dtype=torch.float32)
            self.importance, self._weights = state["importance"], None
            self.last_penalty = state["last_penalty"]

    # -- reporting --------------------------------------------------------------------------------
    def summary(self, model: nn.Module) -> dict:
        return {"rank": self.r0, "capacity_limited": capacity_limited(self.ctx, self.r0),
                "warmup_steps": self.warmup, "lam": float(self.options.lam),
                "final_penalty": float(self.last_penalty)}

    def tables(self, model: nn.Module) -> dict:
        n = len(self.ctx.targets)
        imp = self.importance if self.importance is not None else [float("nan")] * n
        return {"ranks": ranks_frame(self.ctx.targets, [self.r0] * n, imp,
                                     fisher=self.fisher.tolist(), importance=list(imp))}
