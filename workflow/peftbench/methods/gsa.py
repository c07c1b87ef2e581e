"""Gated spectral adapter (``gsa``): trainable gates on the top-k singular values, L1-sparsified.

Research seed 002 of this benchmark. With the top-k SVD ``W = U_k S_k V_kᵀ + W_res`` of each
pretrained target matrix (``svd`` stage), a trainable gate ``g ∈ R^k`` (zero-init) rescales the
singular values, ``Ŝ_i = S_i (1 + g_i)`` for ``i ≤ k``:

    W' = W_res + U_k diag(S_k ⊙ (1 + g)) V_kᵀ = W + U_k diag(S_k ⊙ g) V_kᵀ,

trained with the task loss plus an L1 penalty that drives gates back to zero (to the pretrained
value):

    L = L_task + λ Σ_m ‖g_m‖₁.

``W`` stays frozen; the correction is applied to the activations with k-wide products only,
``Δ(x) = ((x V_k) ⊙ (S_k ⊙ g)) U_kᵀ`` (``= x (W' − W)ᵀ``); ``g = 0`` gives the pretrained model at
step 0. The penalty is logged as ``penalty`` in ``curve.parquet`` (kept on the device as a 0-d
tensor every step; the loop reads it at logged steps only).

Seed settings: ``k = 16`` gates per matrix and ``λ = 1e-4`` (the option defaults).

Budget: ``k`` parameters per matrix, an option (default 16, the seed's), **not** derived from the
budget — earlier versions used ``k = ⌊budget_params / matrices⌋``, which the stored top-k capped
at the same value at every budget, so the three budgets of a grid were one run three times. ``k``
is capped per matrix at ``min(d_in, d_out)``; more than the ``svd`` stage stored is an error
(:func:`~peftbench.methods.spectral_common.explicit_ranks`). The run trains ``Σ_m k_m``
parameters whatever the budget and reports them as they are: ``capacity_limited`` and
``outside_budget`` (:func:`~peftbench.methods.spectral_common.budget_flags`; gates are tiny, so
both are true at every usual budget), ``budget_rank`` = the gates per matrix the budget would pay
for. The head is trained in full on top. ``ranks.parquet``: rank = active gates
``#{i : |g_i| > active_threshold}`` at the end, score = mean ``|g|``.

Options (``method_options.gsa``): :class:`GSAOptions`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import register
from .base import LoopState
from .options import MethodOptions, option
from .spectral_common import SpectralLinear, SpectralMethod, explicit_ranks


@dataclass
class GSAOptions(MethodOptions):
    """Options of the gated spectral adapter (defaults: seed 002)."""

    k: int = option(16, "gated singular values per matrix (the top k), ≥ 1; independent of the budget")
    lam: float = option(1e-4, "weight λ of the L1 penalty λ Σ |g_i| on the gates, ≥ 0")
    active_threshold: float = option(1e-3, "|g_i| above which a gate counts as active in the reports, ≥ 0")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require("k", self.k >= 1, "must be an integer ≥ 1 (gates per matrix)")
        self.require("lam", self.lam >= 0, "must be ≥ 0")
        self.require("active_threshold", self.active_threshold >= 0, "must be ≥ 0")


class GatedSpectralLinear(SpectralLinear):
    """``y = base(x) + ((x V) ⊙ (S ⊙ g)) Uᵀ``: singular values scaled by ``1 + g``.

    Parameters: ``g (k,)``, zero-initialised.
    """

    def __init__(self, base: nn.Linear, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, r: int):
        super().__init__(base, U, S, Vh, r)
        self.g = nn.Parameter(torch.zeros(r, dtype=base.weight.dtype))

    def lowrank(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``Δ(x) = ((x V) ⊙ (S ⊙ g)) Uᵀ``: returns ``z = (x V) ⊙ (S ⊙ g) (..., k)`` and ``B = U``."""
        return (x @ self.V) * (self.S * self.g), self.U

    def delta_weight(self) -> torch.Tensor:
        """``W' − W = U diag(S ⊙ g) Vᵀ``, ``(d_out, d_in)``."""
        return (self.U * (self.S * self.g)) @ self.V.T


@register
class GatedSpectralAdapter(SpectralMethod):
    """Gated spectral adapter (seed 002): per-matrix gates on the top-k singular values with an L1 penalty.

    ``compilable``: the forward is fixed-shape (k-wide products); the penalty is computed outside
    it, in :meth:`extra_loss` (tested with ``compile_backend: eager``).
    """

    name = "gsa"
    options_cls = GSAOptions
    compilable = True

    def __init__(self, ctx):
        super().__init__(ctx)
        self._gates: list[nn.Parameter] = []

    def plan_ranks(self, top_k: list[int]) -> dict:
        """``k`` (option) gates per matrix, capped at ``min(d)``; ``budget_rank`` = ``⌊budget_params / matrices⌋``.

        Raises:
            ValueError: ``k`` exceeds the stored top-k (:func:`explicit_ranks`).
        """
        targets = self.ctx.targets
        budget_rank = max(1, int(self.ctx.budget_params // len(targets)))
        ranks = explicit_ranks(self.options.k, targets, top_k, f"method_options.{self.name}.k")
        return {"ranks": ranks, "budget_rank": budget_rank, "params": list(ranks)}

    def make_wrapper(self, base, U, S, Vh, r) -> SpectralLinear:
        return GatedSpectralLinear(base, U, S, Vh, r)

    def build(self, model: nn.Module) -> nn.Module:
        model = super().build(model)
        self._gates = [m.g for m in self.wrappers(model)]
        return model

    def penalty(self) -> torch.Tensor:
        """``λ Σ_m ‖g_m‖₁`` (a scalar tensor on the gates' device)."""
        return float(self.options.lam) * torch.stack([g.abs().sum() for g in self._gates]).sum()

    def extra_loss(self, model: nn.Module, outputs: Any, batch: dict[str, torch.Tensor],
                   state: LoopState) -> torch.Tensor | None:
        if not self._gates or float(self.options.lam) == 0:
            return None
        pen = self.penalty()
        state.log["penalty"] = pen.detach()  # a device tensor: read by the loop at logged steps only
        return pen

    def module_rank(self, mod: GatedSpectralLinear) -> float:
        return float((mod.g.detach().abs() > float(self.options.active_threshold)).sum())

    def module_score(self, mod: GatedSpectralLinear) -> float:
        return float(mod.g.detach().abs().mean())

    def extra_summary(self, model: nn.Module) -> dict[str, Any]:
        mods = self.wrappers(model)
        active = [self.module_rank(m) for m in mods]
        with torch.no_grad():
            pen = float(self.penalty()) if self._gates else 0.0
        return {"lam": float(self.options.lam), "active_gates": int(sum(active)),
                "mean_active_gates": float(sum(active) / max(len(active), 1)),
                "mean_abs_gate": float(sum(self.module_score(m) for m in mods) / max(len(mods), 1)),
                "final_penalty": pen}
