"""Spectral Adapter, additive variant (``spectral_a``): tune the top-r singular vectors additively.

Zhang & Pilanci 2024, "Spectral Adapter: Fine-Tuning in Spectral Space" (Spectral Adapter^A).
With the top-r SVD of each pretrained target matrix, ``W = U_r S_r V_rᵀ + W_res`` (factors from
the ``svd`` stage, :func:`peftbench.svd.load_factors`), the fine-tuned weight is

    W' = W_res + (U_r + A_U) S_r (V_r + A_V)ᵀ
       = W + U_r S_r A_Vᵀ + A_U S_r (V_r + A_V)ᵀ,

with trainable ``A_U ∈ R^{d_out×r}``, ``A_V ∈ R^{d_in×r}``, both zero-initialised (so ``W' = W``
at step 0; unlike LoRA, the gradients at zero are non-zero because ``U_r``, ``V_r`` are not).
``W`` stays frozen; the correction is applied to the activations with r-wide products only:

    Δ(x) = ((x A_V) ⊙ S_r) U_rᵀ + ((x V_r + x A_V) ⊙ S_r) A_Uᵀ     (= x (W' − W)ᵀ).

Budget: ``r (d_in + d_out)`` parameters per matrix, as LoRA's rank-r adapter, so ``r`` is the
uniform LoRA rank for the budget (:func:`peftbench.budget.rank_for_params`), capped per matrix at
the stored top-k and at ``min(d_in, d_out)``; when a cap bites the method trains fewer parameters
than the budget and ``capacity_limited`` is recorded. The head (classifier, pooler) is trained
in full on top. ``ranks.parquet``: rank = r, score = ``‖W' − W‖_F``.

Options (``methods.spectral_a``): none.
"""
from __future__ import annotations

import torch
from torch import nn

from ..budget import per_rank_cost, rank_for_params
from . import register
from .spectral_common import SpectralLinear, SpectralMethod, lowrank_fro


class AdditiveSpectralLinear(SpectralLinear):
    """``y = base(x) + x (W' − W)ᵀ`` with ``W' = W + (U+A_U) S (V+A_V)ᵀ − U S Vᵀ``.

    Parameters: ``A_U (d_out, r)``, ``A_V (d_in, r)``, zero-initialised.
    """

    def __init__(self, base: nn.Linear, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, r: int):
        super().__init__(base, U, S, Vh, r)
        d_out, d_in = base.weight.shape
        self.A_U = nn.Parameter(torch.zeros(d_out, r, dtype=base.weight.dtype))
        self.A_V = nn.Parameter(torch.zeros(d_in, r, dtype=base.weight.dtype))

    def lowrank(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``Δ(x) = ((x A_V) S) Uᵀ + ((x V + x A_V) S) A_Uᵀ = z [U, A_U]ᵀ`` for ``x (..., d_in)``.

        Returns ``z (..., 2r) = [(x A_V) S, (x V + x A_V) S]`` and ``B = [U, A_U] (d_out, 2r)``;
        one ``d_in → 2r`` product in, one ``2r → d_out`` product out.
        """
        p = x @ torch.cat([self.V, self.A_V], 1)          # (..., 2r): [x V, x A_V]
        xv, xa = p[..., :self.r], p[..., self.r:]
        z = torch.cat([xa * self.S, (xv + xa) * self.S], -1)
        return z, torch.cat([self.U, self.A_U], 1)

    def delta_weight(self) -> torch.Tensor:
        """``W' − W = (U+A_U) diag(S) (V+A_V)ᵀ − U diag(S) Vᵀ``, ``(d_out, d_in)``."""
        return (self.U + self.A_U) @ torch.diag(self.S) @ (self.V + self.A_V).T - self.U @ torch.diag(self.S) @ self.V.T


@register
class SpectralAdditive(SpectralMethod):
    """Spectral Adapter^A: additive tuning of the top-r singular vectors."""

    name = "spectral_a"

    def plan_ranks(self, top_k: list[int]) -> dict:
        """Uniform LoRA rank for the budget, capped at the stored top-k and ``min(d_in, d_out)``."""
        targets = self.ctx.targets
        # the uncapped rank the budget asks for; rank_for_params also caps it at min(d) over targets
        budget_rank = max(1, round(self.ctx.budget_params / per_rank_cost(targets)))
        r = rank_for_params(self.ctx.budget_params, targets)
        ranks = [min(r, k, t.d_in, t.d_out) for k, t in zip(top_k, targets)]
        params = [r * (t.d_in + t.d_out) for r, t in zip(ranks, targets)]
        return {"ranks": ranks, "budget_rank": budget_rank, "params": params}

    def make_wrapper(self, base, U, S, Vh, r) -> SpectralLinear:
        return AdditiveSpectralLinear(base, U, S, Vh, r)

    def module_score(self, mod: AdditiveSpectralLinear) -> float:
        # W' − W = [U, A_U] [A_V S, (V + A_V) S]ᵀ
        L = torch.cat([mod.U, mod.A_U], 1)
        R = torch.cat([mod.A_V * mod.S, (mod.V + mod.A_V) * mod.S], 1)
        return lowrank_fro(L, R)
