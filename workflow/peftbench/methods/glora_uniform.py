"""glora_uniform: GLoRA's mechanism control with every score equal (LoRA's ranks, GLoRA's disruption).

Control of seed 000. Everything is :class:`~peftbench.methods.glora.GLoRA`'s (options, warm-up,
exact gradient-norm EMAs, allocation rule) except that the allocation sees equal scores,
``s_k = 1/n``, which the rule turns into the uniform allocation ``r_k = R_total / n = r0`` (LoRA's
rank for every matrix). At the end of the warm-up *every* module is still re-factorised at rank
``r0`` (:func:`~peftbench.methods.glora.resize_lora_module`: ``ΔW`` unchanged, new orthonormal
basis for ``A``) and its factors start with fresh AdamW state, as GLoRA's re-allocated modules do.

So this control differs from LoRA only by GLoRA's disruption at step ``K`` (basis change and
optimizer-state reset) and from GLoRA only by the allocation: GLoRA minus this control is the
effect of re-allocating ranks by gradient norm. ``compilable`` (as GLoRA).

Outputs: as GLoRA; ``score`` = 1/n, ``grad_norm_ema`` the measured ``g_k``.
"""
from __future__ import annotations

from . import register
from .glora import GLoRA, GLoRAOptions


@register
class GLoRAUniform(GLoRA):
    """GLoRA with uniform scores: LoRA's ranks, every module re-factorised at step K (control)."""

    name = "glora_uniform"
    options_cls = GLoRAOptions
    refactor_all = True

    def allocation_scores(self, measured: list[float]) -> list[float]:
        """``s_k = 1/n`` for every matrix, whatever was measured.

        Args:
            measured: ``(n,)`` the warm-up EMAs ``g_k`` (only their number is used).
        """
        return [1.0 / len(measured)] * len(measured)
