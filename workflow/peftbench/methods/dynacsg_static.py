"""Static spectral gates (``dynacsg_static``): the input-independent control of DynaCSG (seed 002).

DynaCSG (:mod:`peftbench.methods.dynacsg`) claims that gating the top-r singular values *per
example* helps. This control keeps everything else and removes the conditioning: each adapted
matrix has one learned logit vector ``ℓ_m ∈ R^r`` (no hypernetwork, no context), the same for every
input. With the top-r SVD ``W = U_r diag(S_r) V_rᵀ + W_res`` of each target (``svd`` stage) and a
binary gate ``g ∈ {0, 1}^r``,

    Ŝ = S_r ⊙ (1 + α g),     y = x Wᵀ + bias + α · ((x V_r) ⊙ (S_r ⊙ g)) U_rᵀ,

as DynaCSG (same α, same r, same correction). Training uses the same Gumbel-sigmoid
straight-through gate (binary Concrete, arXiv:1611.00712; Gumbel-softmax, arXiv:1611.01144),
one independent sample per example, as DynaCSG draws one per example:
``g_b = 1[σ((ℓ − t + log u_b − log(1 − u_b)) / τ) > 0.5]`` forward, gradient of the sigmoid
backward. At inference (``model.eval()``) the gates are a deterministic mask.

Two ways to set how many gates are open — ⟨k⟩, the mean number of open gates per matrix:

* ``target_k: null`` (default): as DynaCSG, threshold ``t = 0``, penalty ``λ · E[#gates on]``
  (expected L0 norm, arXiv:1712.01312) ``= λ Σ_m Σ_i σ(ℓ_{m,i})`` (the same for every example),
  inference mask ``1[ℓ > 0]``; the logits start at ``init_logit`` (−3): every gate closed, so the
  model is the pretrained one at step 0 (``identity_at_init``). ⟨k⟩ is whatever λ leads to.
* ``target_k: K``: the inference mask of every matrix keeps exactly its ``min(K, r)`` largest
  logits (ties broken towards the larger singular value), and in training the threshold ``t`` of
  each matrix sits (detached) midway between its K-th and (K+1)-th largest logit, so the sampled
  gates concentrate on the same top K as the logits separate; λ is not used (the count is fixed).
  At init all logits are equal: the inference mask is the top-K singular values and each gate is
  open with probability ½ in training until the logits separate. With ``target_k`` the model is
  *not* the pretrained one at step 0 (K gates are open).

"Same mean ⟨k⟩" as DynaCSG means: DynaCSG's ``mean_active_gates`` of ``metrics.parquet`` — open
gates under its inference mask, averaged over the dev examples of the final evaluation and over
the adapted matrices — rounded to an integer K and set as ``target_k`` (one value per config,
since ``method_options`` are global: match it per model/task/budget with separate configs). The
control then has exactly K open gates in *every* matrix for *every* example, so it matches the
mean over matrices and examples (to ±0.5), not DynaCSG's per-matrix allocation nor its spread
over examples — removing the latter is the point of the control.

Budget: the trainable adapter is the gate logits, ``r`` per matrix (``Σ_m r_m``, tiny: capped at
``min(d_in, d_out)``; more than the ``svd`` stage stored is an error). The run reports its real
count with ``capacity_limited`` / ``outside_budget``
(:func:`~peftbench.methods.spectral_common.budget_flags`; both true at every usual budget, as for
GSA). The head is trained in full on top.

Reports: ``curve.parquet`` gets at every logged step ``mean_k`` (⟨k⟩ under the inference mask)
and ``mean_k_sampled`` (the sampled training gates), plus ``gate_penalty`` and
``expected_gate_frac`` — device tensors, read by the loop at logged steps only; ``ranks.parquet``
has rank = open gates of the matrix's inference mask at the end, score = mean ``σ(ℓ − t)``;
``summary()`` adds ``mean_active_gates`` (⟨k⟩), ``mean_active_gates_per_layer``,
``gates_per_matrix``, ``target_k`` (−1 when null) and ``lam``.

Options (``method_options.dynacsg_static``): :class:`StaticGateOptions`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import register
from .base import LoopState
from .dynacsg import GateOptions, gumbel_sigmoid_st
from .options import option
from .spectral_common import SpectralLinear, SpectralMethod, explicit_ranks


@dataclass
class StaticGateOptions(GateOptions):
    """Options of the static-gate control (gate options as DynaCSG's; defaults: seed 002)."""

    rank: int = option(8, "gated singular values r per matrix, ≥ 1: set it to DynaCSG's rank (default 8)")
    target_k: int | None = option(None, "open gates per matrix at inference (top target_k logits; threshold "
                                        "between the target_k-th and next logit in training; λ unused), "
                                        "≥ 1; null = the λ penalty decides, as in DynaCSG")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require("target_k", self.target_k is None or self.target_k >= 1,
                     "must be an integer ≥ 1 (e.g. DynaCSG's mean_active_gates, rounded) or null (λ decides)")


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask ``(r,)`` of the ``min(k, r)`` largest entries of ``logits (r,)``; ties go to the
    lower index (the larger singular value)."""
    order = torch.argsort(logits.detach(), descending=True, stable=True)
    mask = torch.zeros_like(logits, dtype=torch.float32)
    mask[order[:k]] = 1.0
    return mask


def top_k_threshold(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Detached threshold midway between the k-th and (k+1)-th largest of ``logits (r,)``
    (0-d tensor); ``−inf`` when ``k ≥ r`` (every gate open)."""
    r = logits.numel()
    if k >= r:
        return logits.new_tensor(float("-inf"))
    top = torch.topk(logits.detach(), k + 1).values
    return 0.5 * (top[k - 1] + top[k])


class StaticGatedSpectralLinear(SpectralLinear):
    """``y = base(x) + α ((x V) ⊙ (S ⊙ g)) Uᵀ`` with input-independent gate logits ``logit (r,)``.

    Args:
        base, U, S, Vh, r: as :class:`~peftbench.methods.spectral_common.SpectralLinear`.
        alpha: scale α of the correction; tau: Gumbel-sigmoid temperature.
        init_logit: initial value of every logit.
        target_k: ``None`` (threshold 0, inference mask ``1[logit > 0]``) or K (top-K, see the
            module docstring).

    Attributes:
        logit: the trainable ``(r,)`` logits.
        last_sampled: ``(B, r)`` gates of the last training forward (detached), or ``None``.
    """

    def __init__(self, base: nn.Linear, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, r: int, *,
                 alpha: float, tau: float, init_logit: float, target_k: int | None):
        super().__init__(base, U, S, Vh, r)
        self.alpha, self.tau, self.target_k = float(alpha), float(tau), target_k
        self.logit = nn.Parameter(torch.full((r,), float(init_logit), dtype=base.weight.dtype))
        self.last_sampled: torch.Tensor | None = None

    def threshold(self) -> torch.Tensor:
        """The gate threshold ``t`` (0-d, detached): 0, or the top-K midpoint."""
        if self.target_k is None:
            return self.logit.new_zeros(())
        return top_k_threshold(self.logit, self.target_k)

    def shifted_logits(self) -> torch.Tensor:
        """``logit − t`` ``(r,)``: a gate is open with probability ``σ(logit − t)`` in training."""
        return self.logit - self.threshold()

    def mask(self) -> torch.Tensor:
        """The inference mask ``(r,)`` (0/1, fp32): ``1[logit > 0]`` or the top-K logits."""
        if self.target_k is None:
            return (self.logit.detach() > 0).float()
        return top_k_mask(self.logit, self.target_k)

    def gates(self, batch: int) -> torch.Tensor:
        """Gates of ``batch`` examples: sampled straight-through ``(B, r)`` in training, the mask
        ``(1, r)`` in eval."""
        if not self.training:
            return self.mask()[None, :]
        if self.target_k is not None and self.target_k >= self.r:  # every gate open, nothing to sample
            g = torch.ones(batch, self.r, dtype=torch.float32, device=self.logit.device)
        else:
            g = gumbel_sigmoid_st(self.shifted_logits().expand(batch, self.r), self.tau)
        self.last_sampled = g.detach()
        return g

    def lowrank(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z = α (x V) ⊙ (S ⊙ g_b)`` ``(..., r)`` with one gate row per example, ``B = U``."""
        g = self.gates(x.shape[0])                        # (B, r) or (1, r)
        scale = self.alpha * self.S * g.to(self.S.dtype)  # (B, r)
        if x.dim() == 3:
            scale = scale[:, None, :]
        return (x @ self.V) * scale.to(x.dtype), self.U

    def delta_weight(self) -> torch.Tensor:
        """``W' − W = α U diag(S ⊙ mask) Vᵀ`` under the inference mask, ``(d_out, d_in)``."""
        return (self.U * (self.alpha * self.S * self.mask().to(self.S.dtype))) @ self.V.T


@register
class DynaCSGStatic(SpectralMethod):
    """Static-gate control of DynaCSG: one learned gate-logit vector per matrix (see the module docstring).

    ``identity_at_init``: with the default ``target_k: null`` (every logit starts at
    ``init_logit`` < 0); with ``target_k`` K gates are open from step 0.

    ``compilable``: yes — the gates come from the module's own parameters, the forward is
    fixed-shape; the only side effect is storing the detached sampled gates on the module,
    which Dynamo replays. Tested with ``compile_backend: eager``.
    """

    name = "dynacsg_static"
    options_cls = StaticGateOptions
    compilable = True

    def plan_ranks(self, top_k: list[int]) -> dict:
        """``rank`` gates per matrix (capped at ``min(d)``); ``budget_rank`` = ``⌊budget_params / matrices⌋``.

        Raises:
            ValueError: ``rank`` exceeds the stored top-k.
        """
        targets = self.ctx.targets
        ranks = explicit_ranks(self.options.rank, targets, top_k, f"method_options.{self.name}.rank")
        return {"ranks": ranks, "budget_rank": max(1, int(self.ctx.budget_params // len(targets))),
                "params": list(ranks)}

    def make_wrapper(self, base, U, S, Vh, r) -> SpectralLinear:
        o = self.options
        return StaticGatedSpectralLinear(base, U, S, Vh, r, alpha=o.alpha, tau=o.tau, init_logit=o.init_logit,
                                         target_k=o.target_k)

    def build(self, model: nn.Module) -> nn.Module:
        model = super().build(model)
        self._mods: list[StaticGatedSpectralLinear] = self.wrappers(model)
        return model

    def on_step_start(self, model: nn.Module, state: LoopState) -> None:
        for m in self._mods:
            m.last_sampled = None

    def expected_open(self) -> torch.Tensor:
        """E[#gates on] of one example, ``Σ_m Σ_i σ(ℓ_{m,i} − t_m)`` (0-d, differentiable)."""
        return torch.stack([torch.sigmoid(m.shifted_logits().float()).sum() for m in self._mods]).sum()

    def mean_k(self) -> torch.Tensor:
        """⟨k⟩ under the inference mask: mean over matrices of the open gates (0-d tensor, no sync)."""
        return torch.stack([m.mask().sum() for m in self._mods]).mean()

    def extra_loss(self, model: nn.Module, outputs: Any, batch: dict[str, torch.Tensor],
                   state: LoopState) -> torch.Tensor | None:
        """``λ · E[#gates on]`` with ``target_k: null`` (else ``None``); logs gate_penalty,
        expected_gate_frac, mean_k and mean_k_sampled as device tensors."""
        expected = self.expected_open()
        n_gates = sum(m.r for m in self._mods)
        state.log["expected_gate_frac"] = expected.detach() / n_gates
        state.log["mean_k"] = self.mean_k()
        sampled = [m.last_sampled for m in self._mods if m.last_sampled is not None]
        if sampled:
            state.log["mean_k_sampled"] = torch.stack([g.sum(-1).mean() for g in sampled]).mean()
        if self.options.target_k is not None:
            return None
        pen = float(self.options.lam) * expected
        state.log["gate_penalty"] = pen.detach()
        return pen

    def module_rank(self, mod: StaticGatedSpectralLinear) -> float:
        return float(mod.mask().sum())

    def module_score(self, mod: StaticGatedSpectralLinear) -> float:
        with torch.no_grad():
            return float(torch.sigmoid(mod.shifted_logits().float()).mean())

    def extra_summary(self, model: nn.Module) -> dict[str, Any]:
        act = [self.module_rank(m) for m in self._mods]
        layers: dict[int, float] = {}
        for t, a in zip(self.ctx.targets, act):
            layers[t.layer] = layers.get(t.layer, 0.0) + a
        o = self.options
        return {"gates_per_matrix": int(max(m.r for m in self._mods)), "target_k": -1 if o.target_k is None else int(o.target_k),
                "lam": float(o.lam), "mean_active_gates": float(sum(act) / len(act)),
                "mean_active_gates_per_layer": float(sum(layers.values()) / len(layers))}
