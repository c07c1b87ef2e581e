"""Spectral Adapter, additive variant (``spectral_a``): tune the top-r singular vectors additively.

Zhang & Pilanci 2024, "Spectral Adapter: Fine-Tuning in Spectral Space", arXiv:2405.13952,
Sec. 3 (Spectral Adapter^A).
With the top-r SVD of each pretrained target matrix, ``W = U_r S_r V_rᵀ + W_res`` (factors from
the ``svd`` stage, :func:`peftbench.svd.load_factors`), the fine-tuned weight is

    W' = W_res + (U_r + A_U) S_r (V_r + A_V)ᵀ
       = W + U_r S_r A_Vᵀ + A_U S_r (V_r + A_V)ᵀ,

with trainable ``A_U ∈ R^{d_out×r}``, ``A_V ∈ R^{d_in×r}``, both zero-initialised (so ``W' = W``
at step 0; unlike LoRA, the gradients at zero are non-zero because ``U_r``, ``V_r`` are not).
``W`` stays frozen; the correction is applied to the activations with r-wide products only:

    Δ(x) = ((x A_V) ⊙ S_r) U_rᵀ + ((x V_r + x A_V) ⊙ S_r) A_Uᵀ     (= x (W' − W)ᵀ).

Budget: ``r (d_in + d_out)`` parameters per matrix, as LoRA's rank-r adapter, so by default
(``rank: null``) ``r`` is the uniform LoRA rank for the budget
(:func:`peftbench.budget.rank_for_params`), capped per matrix at the stored top-k and at
``min(d_in, d_out)``; when a cap bites the method trains fewer parameters than the budget and
``capacity_limited`` is recorded. An explicit ``rank`` (e.g. 8) fixes r for every matrix whatever
the budget (the authors' DeBERTaV3 GLUE script uses r = 24 on query/key/value only); the run then
records its real count and ``capacity_limited`` / ``outside_budget`` against the budget
(:func:`~peftbench.methods.spectral_common.budget_flags`). The head (classifier, pooler) is
trained in full on top. ``ranks.parquet``: rank = r, score = ``‖W' − W‖_F``.

Fidelity: the authors' DeBERTaV3 GLUE code (github.com/pilancilab/spectral_adapter,
``deberta_tune/spectral_lora_tune``) trains exactly ``A_U`` and ``A_V`` (its ``lora_B``/``lora_A``,
zero-initialised) on the top-r singular vectors, as here; it materialises ``W'`` in every forward,
we apply the same correction to the activations. (Their diffusion-fusion variant also adds a
trainable shift on ``S_r``; the GLUE code does not, so neither do we.)

Options (``method_options.spectral_a``): :class:`SpectralAOptions`.

``compilable``: yes — fixed shapes, no Python-side state in the forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..budget import per_rank_cost, rank_for_params
from . import register
from .options import MethodOptions, option
from .spectral_common import SpectralLinear, SpectralMethod, explicit_ranks, lowrank_fro


@dataclass
class SpectralAOptions(MethodOptions):
    """Options of Spectral Adapter^A."""

    rank: int | None = option(None, "top singular vectors r tuned per matrix, the same for every matrix whatever "
                                    "the budget (e.g. 8); null = the uniform LoRA rank of the budget")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require("rank", self.rank is None or self.rank >= 1, "must be an integer ≥ 1 or null (from the budget)")


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
    """Spectral Adapter^A (arXiv:2405.13952): additive tuning of the top-r singular vectors.

    ``compilable``: the forward is a fixed sequence of r-wide matmuls (tested with
    ``compile_backend: eager``).
    """

    name = "spectral_a"
    options_cls = SpectralAOptions
    compilable = True

    def plan_ranks(self, top_k: list[int]) -> dict:
        """``rank`` (option) or the uniform LoRA rank for the budget, capped at the stored top-k
        and ``min(d_in, d_out)``.

        Raises:
            ValueError: ``rank`` exceeds the stored top-k (:func:`explicit_ranks`).
        """
        targets = self.ctx.targets
        # the uncapped rank the budget asks for; rank_for_params also caps it at min(d) over targets
        budget_rank = max(1, round(self.ctx.budget_params / per_rank_cost(targets)))
        if self.options.rank is not None:
            ranks = explicit_ranks(self.options.rank, targets, top_k, f"method_options.{self.name}.rank")
        else:
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
