"""glora_shuffled: GLoRA's mechanism control with the warm-up scores permuted across matrices.

Control of seed 000 (DESIGN.md: "each method's claimed mechanism has a control"). Everything is
:class:`~peftbench.methods.glora.GLoRA`'s (options, warm-up, exact gradient-norm EMAs ``g_k``,
allocation rule, re-factorisation, fresh AdamW state for re-factorised modules) except the scores
the ranks are allocated by::

    s_k = g_{π(k)} / Σ_j g_j,      π = a permutation of the n matrices drawn from the run's seed

So the allocation keeps GLoRA's total rank ``R_total = n · r0`` and the same multiset of scores,
hence (where neither the caps ``min(d_in, d_out)`` nor the parameter balancing bind) a permutation
of GLoRA's ranks for the same EMAs, but the ranks no longer follow each matrix's own gradient
norm. GLoRA beating this control is evidence that *which* matrix gets rank matters, not only that
ranks become unequal.

The permutation comes from its own generator (``torch.Generator().manual_seed(seed)``), so it
does not touch the run's global random stream. ``compilable`` (as GLoRA).

Outputs: as GLoRA; ``score`` is the permuted (allocation) score, ``grad_norm_ema`` the measured
``g_k`` of the matrix itself.
"""
from __future__ import annotations

import torch

from . import register
from .glora import GLoRA, GLoRAOptions, shares


def permutation(n: int, seed: int) -> list[int]:
    """The control's permutation ``π`` of ``range(n)``: ``torch.randperm(n)`` of a generator seeded with ``seed``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()


@register
class GLoRAShuffled(GLoRA):
    """GLoRA with its warm-up scores permuted across matrices by the run's seed (control)."""

    name = "glora_shuffled"
    options_cls = GLoRAOptions

    def allocation_scores(self, measured: list[float]) -> list[float]:
        """``s_k = g_{π(k)} / Σ_j g_j`` with ``π`` = :func:`permutation` of the run's seed.

        Args:
            measured: ``(n,)`` the warm-up EMAs ``g_k``.
        """
        return shares([measured[p] for p in permutation(len(measured), self.ctx.seed)])
