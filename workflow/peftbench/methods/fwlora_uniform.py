"""fwlora_uniform: FW-LoRA's mechanism control with uniform importances.

Control of seed 001. Everything is :class:`~peftbench.methods.fwlora.FWLoRA`'s (options, rank,
warm-up of ``K`` steps without the penalty, Fisher EMAs ``F_m`` measured and reported) except the
importances, ``I_m = 1/M`` for every matrix, so the loss after the warm-up is::

    L + λ (1 − 1/M) Σ_m ‖ΔW_m‖²_F

a uniform L2 penalty on the updates with FW-LoRA's total weight (``Σ_m (1 − I_m) = M − 1`` in both).
FW-LoRA minus this control is the effect of the Fisher weighting itself. ``compilable`` (as
FW-LoRA: the warm-up is kept so that both switch the penalty on at the same step).

Outputs: as FW-LoRA; ``score`` = ``importance`` = 1/M, ``fisher`` the measured ``F_m``.
"""
from __future__ import annotations

from . import register
from .fwlora import FWLoRA, FWLoRAOptions


@register
class FWLoRAUniform(FWLoRA):
    """FW-LoRA with uniform importances I_m = 1/M (control)."""

    name = "fwlora_uniform"
    options_cls = FWLoRAOptions

    def importances(self, fisher: list[float]) -> list[float]:
        """``I_m = 1/M`` for every matrix, whatever was measured.

        Args:
            fisher: ``(M,)`` the warm-up EMAs ``F_m`` (only their number is used).
        """
        return [1.0 / len(fisher)] * len(fisher)
