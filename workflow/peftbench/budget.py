"""Turning a trainable-parameter budget (% of backbone parameters) into ranks.

A LoRA module of rank r on a ``(d_out, d_in)`` matrix trains ``r (d_in + d_out)`` parameters
(Hu et al. 2021, Eq. 3: ΔW = B A, B ∈ R^{d_out×r}, A ∈ R^{r×d_in}). With the same rank on every
target matrix the adapter holds ``r Σ_k (d_in,k + d_out,k)`` parameters, so the rank that spends a
budget of ``b`` % of ``N`` backbone parameters is ``r = round(b/100 · N / Σ_k (d_in,k + d_out,k))``,
at least 1 and at most ``min(d_in, d_out)``. The task head is trained on top and reported apart.
"""
from __future__ import annotations

from .models import Target


def per_rank_cost(targets: list[Target]) -> int:
    """Parameters one unit of rank costs across all targets: ``Σ_k (d_in,k + d_out,k)``."""
    return sum(t.d_in + t.d_out for t in targets)


def uniform_rank(budget: float, backbone_params: int, targets: list[Target]) -> int:
    """The uniform LoRA rank that best spends ``budget`` % of ``backbone_params``.

    Raises:
        ValueError: budget not in (0, 100) or no targets.
    """
    if not 0 < budget < 100:
        raise ValueError(f"budget must be a percentage in (0, 100), got {budget}")
    if not targets:
        raise ValueError("no target matrices to adapt")
    r = round(budget / 100.0 * backbone_params / per_rank_cost(targets))
    return int(min(max(r, 1), min(min(t.d_in, t.d_out) for t in targets)))


def lora_params(targets: list[Target], rank: int | list[int]) -> int:
    """Adapter parameters of LoRA with ``rank`` (one for all, or one per target)."""
    ranks = [rank] * len(targets) if isinstance(rank, int) else rank
    return sum(r * (t.d_in + t.d_out) for r, t in zip(ranks, targets))
