"""GLoRA: gradient-norm-aware rank allocation for LoRA (re-allocated once after a warm-up).

**Not peft's "GLoRA" (Generalized LoRA, Chavan et al. 2023, arXiv:2306.07967).** Our ``glora`` is
the gradient-norm-aware rank allocation of DESIGN.md (seed 000); it only uses peft's plain
``LoraConfig`` and re-factorises its LoRA modules in place.

Method (seed 000). Every target matrix ``W_k`` (attention q/k/v/output, both feed-forward; ``n``
of them) starts as LoRA (Hu et al. 2021, arXiv:2106.09685, Eq. 3) at the budget's uniform rank
``r0``: ``h = W_k x + s_k B_k A_k x``, ``s_k = α / r_k``, ``B_k ∈ R^{d_out×r_k}`` (zero init),
``A_k ∈ R^{r_k×d_in}`` (Kaiming-uniform init, as peft), ``ΔW_k = s_k B_k A_k``. During a warm-up
of ``K`` optimizer steps the method keeps, per matrix, an exponential moving average of the
Frobenius norm of the gradient of the loss with respect to its update::

    g_k ← β g_k + (1 − β) n_k,   g_k = 0 at the start, β = 0.9
    n_k = ‖∂L/∂ΔW_k‖_F = ‖∂L/∂W_k‖_F = ‖Σ_tokens δ_out x_inᵀ‖_F        (estimator "exact", default)
    n_k = sqrt(‖∂L/∂A_k‖²_F + ‖∂L/∂B_k‖²_F)                               (estimator "lora")

The exact estimator is the seed's score. It switches ``requires_grad`` on for the frozen base
weights for the forward/backward of each warm-up step only, reads their gradient and drops it
(the base weights are never in the optimizer and never updated; the extra cost is one
``d_out × d_in`` weight-gradient product per matrix per warm-up step). The ``lora`` estimator
costs nothing extra but is biased by the matrix shape: early in training ``B ≈ 0``, so
``∂L/∂A = s Bᵀ G ≈ 0`` and ``‖∂L/∂B‖ = s ‖G Aᵀ‖`` with ``G = ∂L/∂W``; the ``r`` random rows of ``A``
(entries of variance ``1/(3 d_in)``) keep ``E‖G Aᵀ‖² = r ‖G‖² / (3 d_in)`` of the gradient's energy,
so the score scales as ``‖G‖ / √d_in`` and the feed-forward output matrix (``d_in = 3072`` on a base
model) looks half as important as an attention matrix (``d_in = 768``) with the same ``‖G‖``.

After step ``K`` the total rank ``R_total = n · r0`` is re-allocated in proportion to the scores
``s_k = g_k / Σ_j g_j`` (the zero start scales every ``g_k`` by the same ``1 − β^K`` and cancels)::

    r_k = round(R_total · s_k)      (largest-remainder rounding: Σ_k r_k = R_total exactly)

with ``min_rank ≤ r_k ≤ min(d_in, d_out)`` (``min_rank = 0`` by default, as the seed's rounding
rule: a matrix may lose its adapter; rank that the caps or the floor remove or add is
redistributed over the other matrices in proportion to their scores, :func:`allocate_ranks`).

Re-factorisation (:func:`refactor_update`). LoRA's rank components are interchangeable (any
``B Q, Q⁻¹ A`` gives the same update), so "the first ``m`` columns" of ``B`` is no selection at all.
A module whose rank changes keeps instead the top ``m = min(r0, r_k)`` singular components of its
learned update ``ΔW_k`` (Eckart & Young 1936: the best rank-``m`` approximation in Frobenius norm;
for ``r_k ≥ r0`` the update is kept exactly), computed in ``r × r`` form from QR decompositions of
``B`` and ``Aᵀ`` (never forming ``d_out × d_in``); components beyond the old rank start as LoRA's
(``A`` rows Kaiming-uniform, ``B`` columns zero). The new ``A`` has orthonormal rows times the old
rows' RMS norm, so ``A`` keeps its scale and the update's magnitude stays in ``B``, as in LoRA
training. ``scaling = α / r_k``; with ``preserve_update: true`` (default) the kept part of ``B`` is
multiplied by ``(α / r0) / (α / r_k) = r_k / r0`` so that ``ΔW_k`` (and the model output) is unchanged
by the re-allocation where ``r_k ≥ r0`` and is its best rank-``r_k`` approximation where ``r_k < r0``.
A rank-0 matrix keeps zero-size factors (``A ∈ R^{0×d_in}``, ``B ∈ R^{d_out×0}``, frozen, scaling 0):
it adds nothing to the output and holds no trainable parameter (peft cannot be configured with
``r = 0``, so the method sets it after the warm-up).

Optimizer state. Re-factorised factors are a new basis, so their old AdamW moments (Loshchilov &
Hutter, arXiv:1711.05101) do not apply: they start with fresh state (step 0, zero moments, bias
correction from 1), while modules whose rank is unchanged keep their parameters and state. The
learning-rate schedule continues.

Budget: ``r0`` is the uniform LoRA rank of the budget (:func:`peftbench.budget.rank_for_params` of ``ctx.budget_params``), so
the run starts with exactly LoRA's parameter count. Re-allocation keeps the total *rank* fixed, but
matrices differ in cost ``d_in + d_out`` (feed-forward matrices cost more), so the parameter count
can move; if it leaves ``budget_params · (1 ± param_tolerance)`` (±10 %, the benchmark's budget
rule; widened to contain LoRA's own count when rank rounding puts that outside), single rank units
are moved between the most and least expensive matrices (largest surplus over the ideal share
first) until it is within, keeping ``Σ r_k = R_total`` (:func:`balance_params`).
``capacity_limited`` is reported when ``r0`` already sits at the smallest matrix dimension and
LoRA's count is below 90 % of the budget.

Warm-up: the first epoch (the seed's), unless ``warmup_steps`` or ``warmup_fraction`` say
otherwise, then clamped by :func:`warmup_length`: at most half the run (so the re-allocated ranks
are trained for at least half of it; this binds only for runs of fewer than two epochs) and at
least ``min(min_warmup_steps, total_steps // 2)`` (20 steps: the EMA then averages an effective
≥ 15 minibatches instead of a single one on a short run).

Mechanism controls (same options, same warm-up, same re-factorisation): ``glora_shuffled``
(the measured scores permuted across matrices with the run's seed) and ``glora_uniform`` (every
score equal: LoRA's ranks, every module re-factorised and its AdamW state reset at step ``K``).

Hot path: the EMAs are a device tensor updated in place; the host reads them once, at
re-allocation (and when a checkpoint is written). ``compilable``: the base weights'
``requires_grad`` is on inside every warm-up step and re-allocation replaces the LoRA modules;
Dynamo guards on both, so a compiled run holds three variants of the training graph (warm-up,
after it, after re-allocation), each compiled once per batch shape and timed as compilation
(``compile_s``); :class:`LoRAWithBaseGradients` raises torch's ``recompile_limit`` to fit them.

Options (``method_options.glora``): :class:`GLoRAOptions`.

Outputs: ``ranks.parquet`` with module, layer, kind, score (the allocation score ``s_k``), rank
(``r_k``, 0 allowed), plus ``grad_norm_ema`` (the measured ``g_k``) and ``initial_rank`` (``r0``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal

import torch
from torch import nn

from ..budget import BUDGET_TOLERANCE, lora_params
from ..models import Target
from . import register
from .base import LoopState, fit_recompile_limit, ranks_frame
from .lora import LoRA, LoRAOptions
from .options import option

ADAPTER = "default"

#: Row norm of a freshly Kaiming-uniform(a = √5) LoRA ``A`` row: entries U(±1/√d_in), so
#: ``E‖a‖² = d_in · (1/d_in) / 3 = 1/3`` whatever ``d_in``.
KAIMING_ROW_NORM = 1.0 / math.sqrt(3.0)


# ------------------------------------------------------------------------------------------------
# helpers shared with fwlora and the controls
# ------------------------------------------------------------------------------------------------
def lora_modules(model: nn.Module, targets: list[Target]) -> list[nn.Module]:
    """The peft ``LoraLayer`` wrapping each target, in the order of ``targets``.

    Raises:
        KeyError: a target has no LoRA module (the model was not wrapped with these targets).
    """
    from peft.tuners.lora import LoraLayer

    by_name = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    out = []
    for t in targets:
        match = [m for n, m in by_name.items() if n == t.name or n.endswith("." + t.name)]
        if len(match) != 1:
            raise KeyError(f"target {t.name}: found {len(match)} LoRA modules, expected one")
        out.append(match[0])
    return out


def base_weights(modules: list[nn.Module]) -> list[nn.Parameter]:
    """The frozen pretrained weight ``W0`` (``d_out × d_in``) of each LoRA module."""
    return [m.get_base_layer().weight for m in modules]


def capacity_limited(ctx, r0: int) -> bool:
    """LoRA at its largest possible uniform rank still spends less than ``1 − BUDGET_TOLERANCE`` (90 %)
    of the budget."""
    cap = min(min(t.d_in, t.d_out) for t in ctx.targets)
    return bool(r0 >= cap and lora_params(ctx.targets, r0) < (1.0 - BUDGET_TOLERANCE) * ctx.budget_params)


def exclude_params(groups: list[dict[str, Any]], excluded: list[nn.Parameter]) -> list[dict[str, Any]]:
    """``groups`` without the parameters in ``excluded`` (by identity); empty groups dropped."""
    ids = {id(p) for p in excluded}
    out = []
    for g in groups:
        ps = [p for p in g["params"] if id(p) not in ids]
        if ps:
            out.append({**g, "params": ps})
    return out


def shares(values: list[float]) -> list[float]:
    """``v_k / Σ_j v_j`` of ``(n,)`` non-negative values (GLoRA's ``s_k``, FW-LoRA's ``I_m``): ``(n,)``
    summing to 1; uniform ``1/n`` when the sum is zero or not finite."""
    tot = sum(values)
    n = len(values)
    return [v / tot for v in values] if tot > 0 and math.isfinite(tot) else [1.0 / n] * n


def frobenius_norms(groups: list[list[torch.Tensor | None]], device: torch.device) -> torch.Tensor:
    """Per group, the Frobenius norm of its tensors taken together, ``sqrt(Σ_t ‖t‖²_F)``.

    Computed on the device, without a host sync (the hooks call it every warm-up step).

    Args:
        groups: ``(n,)`` lists of gradient tensors (``None`` = no gradient, counts 0).
        device: where the result lives when a group has no tensor.

    Returns:
        ``(n,)`` fp32 tensor.
    """
    out = []
    for tensors in groups:
        norms = [torch.linalg.vector_norm(t.detach(), dtype=torch.float32) for t in tensors if t is not None]
        if not norms:
            out.append(torch.zeros((), device=device))
        elif len(norms) == 1:
            out.append(norms[0])
        else:
            out.append(torch.linalg.vector_norm(torch.stack(norms)))
    return torch.stack(out)


def warmup_length(requested: int, total_steps: int, min_steps: int) -> int:
    """The warm-up ``K`` actually run: ``requested`` clamped to
    ``[min(min_steps, ⌊T/2⌋), ⌊T/2⌋]`` (``T`` = ``total_steps``), and at least 1.

    The ceiling leaves at least half the run to train after the warm-up (GLoRA's re-allocated
    ranks, FW-LoRA's penalty); the floor keeps the warm-up from falling to a single minibatch on
    short runs (``min_steps`` = 20 by default: an EMA over 20 steps has an effective sample size of
    14.9 minibatches at β = 0.9 and 19.7 at β = 0.98, against 1).

    Args:
        requested: the warm-up the options ask for, in optimizer steps.
        total_steps: optimizer steps of the run. min_steps: the floor (``min_warmup_steps``).
    """
    half = total_steps // 2
    return max(1, min(max(int(requested), min(int(min_steps), half)), half))


# ------------------------------------------------------------------------------------------------
# allocation
# ------------------------------------------------------------------------------------------------
def allocate_ranks(scores: list[float], total: int, caps: list[int], min_rank: int = 1) -> list[int]:
    """Integer ranks proportional to ``scores`` summing exactly to ``total`` (largest remainder).

    Ideal shares ``q_k = clip(λ s_k, min_rank, caps[k])`` with the water level ``λ`` chosen (by
    bisection) so that ``Σ_k q_k = total``: a matrix whose share would exceed its cap holds its cap and
    one below the floor holds ``min_rank``, and what they give up or take is redistributed over the
    others in proportion to their scores. The shares are then floored and the ``total − Σ ⌊q_k⌋``
    leftover units go to the largest fractional parts (ties: lower index). Zero or non-finite total
    score: uniform shares. GLoRA passes its ``min_rank`` option (default 0).

    Args:
        scores: ``(n,)`` non-negative importance per matrix.
        total: ``R_total``, the rank to distribute.
        caps: ``(n,)`` largest rank per matrix (``min(d_in, d_out)``).
        min_rank: smallest rank per matrix (≥ 0).

    Returns:
        ``(n,)`` ints with ``min_rank ≤ r_k ≤ caps[k]`` and ``Σ r_k = total``.

    Raises:
        ValueError: lengths differ, negative scores, or ``total`` outside
            ``[n · min_rank, Σ caps]`` (no feasible allocation).
    """
    n = len(scores)
    if len(caps) != n:
        raise ValueError(f"{n} scores but {len(caps)} caps")
    if any(s < 0 for s in scores):
        raise ValueError(f"scores must be non-negative, got {scores}")
    if any(c < min_rank for c in caps):
        raise ValueError(f"min_rank {min_rank} exceeds a cap {min(caps)}")
    if not n * min_rank <= total <= sum(caps):
        raise ValueError(f"total rank {total} cannot be split over {n} matrices with min_rank {min_rank} "
                         f"and caps summing to {sum(caps)}")
    s = [float(x) for x in scores]
    if not math.isfinite(sum(s)) or sum(s) <= 0:
        s = [1.0] * n
    eps = 1e-9 * max(s)  # zero scores still take rank once every scored matrix is capped
    s = [x + eps for x in s]

    def ideal(lam: float) -> list[float]:
        return [min(max(lam * x, min_rank), c) for x, c in zip(s, caps)]

    lo, hi = 0.0, max(caps) / min(s)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if sum(ideal(mid)) < total:
            lo = mid
        else:
            hi = mid
    q = ideal(hi)
    ranks = [min(max(int(math.floor(x + 1e-9)), min_rank), c) for x, c in zip(q, caps)]
    frac = [x - r for x, r in zip(q, ranks)]
    left = total - sum(ranks)
    while left > 0:  # largest fractional parts first
        k = max((k for k in range(n) if ranks[k] < caps[k]), key=lambda k: (frac[k], -k))
        ranks[k] += 1
        frac[k] -= 1.0
        left -= 1
    while left < 0:  # float round-off only: take back from the smallest fractional parts
        k = min((k for k in range(n) if ranks[k] > min_rank), key=lambda k: (frac[k], k))
        ranks[k] -= 1
        frac[k] += 1.0
        left += 1
    assert sum(ranks) == total
    return ranks


def balance_params(ranks: list[int], ideal: list[float], costs: list[int], caps: list[int], lo: float,
                   hi: float, min_rank: int = 1) -> list[int]:
    """Move single rank units between matrices until ``lo ≤ Σ r_k c_k ≤ hi``.

    Σ r_k is unchanged. Too many parameters: a unit moves from the most expensive matrix (largest
    surplus ``r_k − ideal_k`` among those) to the cheapest one (largest deficit) and vice versa.

    Args:
        ranks: ``(n,)`` current allocation; ideal: ``(n,)`` real-valued shares ``R_total · s_k``.
        costs: ``(n,)`` parameters per unit of rank, ``d_in + d_out``.
        caps: ``(n,)`` largest rank per matrix. lo, hi: the allowed parameter-count window.
        min_rank: smallest rank per matrix.

    Returns:
        The balanced ranks (a new list); the input is returned unchanged when already within.
    """
    r = list(ranks)
    n = len(r)

    def params() -> int:
        return sum(a * c for a, c in zip(r, costs))

    for _ in range(sum(r) * n + 1):
        p = params()
        if p > hi:
            sign = 1  # donor expensive, receiver cheap
        elif p < lo:
            sign = -1
        else:
            break
        donors = [k for k in range(n) if r[k] > min_rank]
        receivers = [k for k in range(n) if r[k] < caps[k]]
        best = None
        for d in donors:
            for rc in receivers:
                gain = sign * (costs[d] - costs[rc])
                if gain <= 0:
                    continue
                key = (gain, (r[d] - ideal[d]) + (ideal[rc] - r[rc]))
                if best is None or key > best[0]:
                    best = (key, d, rc)
        if best is None:
            break
        _, d, rc = best
        r[d] -= 1
        r[rc] += 1
    return r


# ------------------------------------------------------------------------------------------------
# re-factorisation
# ------------------------------------------------------------------------------------------------
def refactor_update(A: torch.Tensor, B: torch.Tensor, new_r: int, c: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """New LoRA factors of rank ``new_r`` holding the top singular components of ``B A``.

    With reduced QR decompositions ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` (``Q_B``: ``d_out × r``,
    ``Q_A``: ``d_in × r``, ``R``: ``r × r``), ``B A = Q_B (R_B R_Aᵀ) Q_Aᵀ`` and the SVD of the ``r × r``
    core ``R_B R_Aᵀ = U Σ Vᵀ`` gives the SVD of ``B A = (Q_B U) Σ (Q_A V)ᵀ`` without forming the
    ``d_out × d_in`` product. The first ``m = min(r, new_r)`` components are kept (Eckart–Young: the
    best rank-``m`` approximation in Frobenius norm; all of ``B A`` when ``new_r ≥ r``)::

        A'[:m]    = ρ V_mᵀ Q_Aᵀ                 ρ = ‖A‖_F / √r, the old rows' RMS norm
        B'[:, :m] = (c / ρ) Q_B U_m Σ_m          so  B'[:, :m] A'[:m] = c · (B A)_m

    and rows ``m:`` of ``A'`` are Kaiming-uniform (a = √5, as peft and LoRA initialise ``A``),
    columns ``m:`` of ``B'`` zero, so ``B' A' = c · (B A)_m`` exactly (up to round-off; computed in
    float64). ``A`` keeps its scale and the update's magnitude stays in ``B``.

    Args:
        A: ``(r, d_in)`` LoRA down-projection. B: ``(d_out, r)`` up-projection.
        new_r: the new rank, ≥ 0 (0: empty factors).
        c: factor on the kept update (``s_old / s_new`` to keep ``ΔW = s B A`` under the α/r rule).

    Returns:
        ``(A', B')``: ``(new_r, d_in)`` and ``(d_out, new_r)``, dtype and device of ``A`` and ``B``.

    Raises:
        ValueError: ``new_r < 0`` or shapes that do not chain.
    """
    if new_r < 0:
        raise ValueError(f"rank must be ≥ 0, got {new_r}")
    r, d_in = A.shape
    d_out, r_b = B.shape
    if r_b != r:
        raise ValueError(f"B {tuple(B.shape)} and A {tuple(A.shape)} do not chain")
    a_new = torch.zeros(new_r, d_in, dtype=torch.float64, device=A.device)
    b_new = torch.zeros(d_out, new_r, dtype=torch.float64, device=B.device)
    m = min(r, new_r)
    if m > 0:
        a64, b64 = A.detach().double(), B.detach().double()
        q_b, r_b_ = torch.linalg.qr(b64)          # (d_out, k_b), (k_b, r)
        q_a, r_a = torch.linalg.qr(a64.t())       # (d_in, k_a), (k_a, r)
        u, sv, vh = torch.linalg.svd(r_b_ @ r_a.t(), full_matrices=False)  # core (k_b, k_a)
        m = min(m, sv.numel())
        rho = float(a64.norm()) / math.sqrt(r)
        rho = rho if rho > 0 else KAIMING_ROW_NORM
        a_new[:m] = rho * (vh[:m] @ q_a.t())                      # (m, d_in), orthonormal rows × ρ
        b_new[:, :m] = (c / rho) * (q_b @ u[:, :m]) * sv[:m]      # (d_out, m)
    if new_r > m:
        fresh = torch.empty(new_r - m, d_in, dtype=A.dtype, device=A.device)
        nn.init.kaiming_uniform_(fresh, a=math.sqrt(5))
        a_new[m:] = fresh.double()
    return a_new.to(A.dtype), b_new.to(B.dtype)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, requires_grad: bool) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` (``(out, in)``, zero-size allowed) without running an init."""
    out_f, in_f = weight.shape
    lin = nn.Linear(max(in_f, 1), max(out_f, 1), bias=bias is not None, device="meta")
    lin.in_features, lin.out_features = in_f, out_f
    lin.weight = nn.Parameter(weight.contiguous(), requires_grad=requires_grad)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().clone(), requires_grad=requires_grad)
    return lin


def set_lora_factors(module: nn.Module, A: torch.Tensor, B: torch.Tensor, alpha: float,
                     adapter: str = ADAPTER) -> None:
    """Replace one peft LoRA module's factors by ``A`` (``(r, d_in)``) and ``B`` (``(d_out, r)``).

    Sets ``module.r[adapter] = r`` and ``module.scaling[adapter] = α / r`` (LoRA's rule). Rank 0:
    zero-size factors, frozen (``requires_grad`` False: out of the optimizer, the parameter count
    and ``adapter.safetensors``), scaling 0; the module then adds exactly nothing to its output.

    Raises:
        ValueError: shapes that do not chain.
    """
    r = A.shape[0]
    if B.shape[1] != r:
        raise ValueError(f"B {tuple(B.shape)} and A {tuple(A.shape)} do not chain")
    old_b = module.lora_B[adapter]
    module.lora_A[adapter] = _linear(A, None, r > 0)
    module.lora_B[adapter] = _linear(B, old_b.bias, r > 0)
    module.r[adapter] = r
    module.scaling[adapter] = alpha / r if r > 0 else 0.0


def resize_lora_module(module: nn.Module, new_r: int, alpha: float, preserve_update: bool = True,
                       adapter: str = ADAPTER) -> None:
    """Re-factorise one peft LoRA module from rank ``r`` to ``new_r`` in place (:func:`refactor_update`).

    With ``preserve_update`` the kept components are multiplied by ``c = scaling / (α/new_r)``
    (``= new_r / r`` under LoRA's ``scaling = α/r``) so that
    ``ΔW = (α/new_r) B' A'`` equals the best rank-``min(r, new_r)`` approximation of the old
    ``(α/r) B A`` (all of it when growing); without, ``c = 1`` and the α/r rule multiplies the kept
    update by ``r / new_r``. The new factors are new parameters (fresh optimizer state).

    Raises:
        ValueError: ``new_r < 0``.
    """
    a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    old_scaling = float(module.scaling[adapter])  # α / r
    c = old_scaling / (alpha / new_r) if preserve_update and old_scaling > 0 and new_r > 0 else 1.0
    a_new, b_new = refactor_update(a, b, new_r, c)
    set_lora_factors(module, a_new, b_new, alpha, adapter)


# ------------------------------------------------------------------------------------------------
# LoRA that may read the frozen weights' gradients during a warm-up
# ------------------------------------------------------------------------------------------------
@dataclass
class BaseGradientOptions(LoRAOptions):
    """Options shared by the warm-up methods (GLoRA, FW-LoRA and their controls)."""

    min_warmup_steps: int = option(20, "floor of the warm-up K in optimizer steps, ≥ 1: K is raised to "
                                       "min(min_warmup_steps, total_steps // 2) so that the score averages "
                                       "many minibatches on short runs (K never exceeds total_steps // 2)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require("min_warmup_steps", self.min_warmup_steps >= 1, "must be ≥ 1")


class LoRAWithBaseGradients(LoRA):
    """LoRA whose frozen target weights may carry gradients during a warm-up (GLoRA's exact
    estimator, FW-LoRA's Fisher estimate): they are read, never optimised.

    ``self.modules`` holds the peft LoRA modules in target order after :meth:`build`. A subclass
    calls :meth:`base_grads_on` in ``on_step_start`` of a warm-up step and :meth:`pop_base_grads` in
    ``after_backward``, so the base weights require gradients only inside that step's
    forward/backward (never in a checkpoint, the parameter count or the optimizer).
    ``compilable``: Dynamo guards on the base weights' ``requires_grad``, so the warm-up steps and
    the later ones run two graph variants, and a subclass that replaces modules a third
    (:attr:`graph_variants`; the recompile limit is raised to fit them, tested with ``aot_eager``).
    """

    compilable = True
    #: variants of the training graph during a run (warm-up with base gradients, after it, and
    #: after a re-allocation that replaces modules)
    graph_variants: ClassVar[int] = 3

    def build(self, model: nn.Module) -> nn.Module:
        model = super().build(model)
        self.modules = lora_modules(model, self.ctx.targets)
        fit_recompile_limit(self.name, self.graph_variants)
        return model

    def parameter_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        # base weights may have requires_grad on inside a warm-up step: keep them out of the optimizer
        return exclude_params(super().parameter_groups(model, weight_decay), base_weights(self.modules))

    def base_grads_on(self) -> None:
        """Let the next backward fill ``∂L/∂W_k`` of every frozen base weight."""
        for w in base_weights(self.modules):
            w.requires_grad_(True)

    def pop_base_grads(self) -> list[torch.Tensor | None]:
        """The base weights' gradients ``(d_out, d_in)`` per target (``None`` where none); the
        weights are frozen again and their ``.grad`` dropped."""
        out = []
        for w in base_weights(self.modules):
            out.append(w.grad)
            w.grad = None
            w.requires_grad_(False)
        return out

    def param_counts(self, model: nn.Module) -> dict[str, int]:
        counts = super().param_counts(model)
        counts["adapter_params"] -= sum(w.numel() for w in base_weights(self.modules) if w.requires_grad)
        return counts

    def _device(self) -> torch.device:
        return self.modules[0].get_base_layer().weight.device


# ------------------------------------------------------------------------------------------------
# the method
# ------------------------------------------------------------------------------------------------
@dataclass
class GLoRAOptions(BaseGradientOptions):
    """Options of GLoRA and its controls (alpha and dropout as in LoRA; defaults: seed 000)."""

    beta: float = option(0.9, "EMA factor β of the gradient-norm score, in [0, 1)")
    estimator: Literal["lora", "exact"] = option(
        "exact", "gradient-norm estimator: 'exact' = ‖∂L/∂W‖_F, the seed's score (reads the frozen weights' "
                 "gradients during the warm-up); 'lora' = sqrt(‖∇A‖² + ‖∇B‖²), free but biased against "
                 "matrices with a large d_in (∝ 1/√d_in while B ≈ 0)")
    warmup_steps: int | None = option(None, "warm-up length K in optimizer steps, ≥ 0; null: see warmup_fraction")
    warmup_fraction: float | None = option(None, "warm-up length as a fraction of total steps, in [0, 1]; "
                                                 "both null: the first epoch")
    min_rank: int = option(0, "smallest rank a matrix keeps after re-allocation, ≥ 0 (0, the seed's rounding: "
                              "a matrix may lose its adapter)")
    param_tolerance: float | None = option(BUDGET_TOLERANCE, "allowed relative deviation of the parameter count from the "
                                                "budget after re-allocation, ≥ 0; null: no balancing")
    preserve_update: bool = option(True, "multiply the kept factors by r_new / r_old so that ΔW is unchanged "
                                         "by the α/r rule at re-allocation; false: ΔW scales by r_old / r_new")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require("beta", 0 <= self.beta < 1, "must be in [0, 1)")
        self.require("warmup_steps", self.warmup_steps is None or self.warmup_steps >= 0, "must be ≥ 0 or null")
        self.require("warmup_fraction", self.warmup_fraction is None or 0 <= self.warmup_fraction <= 1,
                     "must be in [0, 1] or null")
        self.require("min_rank", self.min_rank >= 0, "must be ≥ 0")
        self.require("param_tolerance", self.param_tolerance is None or self.param_tolerance >= 0,
                     "must be ≥ 0 or null")


@register
class GLoRA(LoRAWithBaseGradients):
    """Gradient-norm-aware LoRA rank allocation, seed 000 (not peft's Generalized LoRA).

    Subclasses (the controls) change :meth:`allocation_scores` and :attr:`refactor_all` only.

    Class attributes:
        refactor_all: re-factorise (and reset the AdamW state of) every module at re-allocation,
            not only those whose rank changes.
    """

    name = "glora"
    options_cls = GLoRAOptions
    refactor_all: ClassVar[bool] = False

    def __init__(self, ctx):
        super().__init__(ctx)
        n = len(ctx.targets)
        self.r0 = self.rank()
        self.ranks = [self.r0] * n
        self.ema = torch.zeros(n)  # g_k, fp32; on the factors' device from the first update on
        self.n_updates = 0
        self.reallocated = False
        self.alloc_scores: list[float] | None = None
        self.modules: list[nn.Module] = []
        o = self.options
        requested = o.warmup_steps if o.warmup_steps is not None else \
            round(o.warmup_fraction * ctx.total_steps) if o.warmup_fraction is not None else ctx.steps_per_epoch
        self.warmup = warmup_length(requested, ctx.total_steps, o.min_warmup_steps)

    def _in_warmup(self, state: LoopState) -> bool:
        return not self.reallocated and state.step < self.warmup

    # -- hooks ------------------------------------------------------------------------------------
    def on_step_start(self, model: nn.Module, state: LoopState) -> None:
        if self.options.estimator == "exact" and self._in_warmup(state):
            self.base_grads_on()

    def gradient_norms(self) -> torch.Tensor:
        """This step's ``n_k`` per target, ``(n,)`` fp32 on the device (0 where no gradient).

        The exact estimator also drops the base weights' gradients and freezes them again.
        """
        if self.options.estimator == "exact":
            groups = [[g] for g in self.pop_base_grads()]
        else:
            groups = [[m.lora_A[ADAPTER].weight.grad, m.lora_B[ADAPTER].weight.grad] for m in self.modules]
        return frobenius_norms(groups, self._device())

    def after_backward(self, model: nn.Module, state: LoopState) -> None:
        if not self._in_warmup(state):
            return
        beta = float(self.options.beta)
        norms = self.gradient_norms()
        if self.ema.device != norms.device:
            self.ema = self.ema.to(norms.device)
        self.ema.mul_(beta).add_(norms, alpha=1.0 - beta)  # in place on the device: no host sync
        self.n_updates += 1

    def after_optimizer_step(self, model: nn.Module, state: LoopState) -> None:
        if self.reallocated or state.step < self.warmup:
            return
        self.reallocate(state.rebuild_optimizer)

    # -- re-allocation ----------------------------------------------------------------------------
    def allocation_scores(self, measured: list[float]) -> list[float]:
        """The scores the ranks are allocated by: ``s_k = g_k / Σ_j g_j`` (uniform when all are 0).

        Args:
            measured: ``(n,)`` the warm-up EMAs ``g_k``.
        """
        return shares(measured)

    def scores(self) -> list[float]:
        """The allocation scores (after re-allocation: those used; before: of the EMAs so far)."""
        return self.alloc_scores if self.alloc_scores is not None else self.allocation_scores(self.ema.tolist())

    def param_window(self, tol: float) -> tuple[float, float]:
        """Allowed adapter-parameter window: ``budget_params · (1 ± tol)``, widened to contain
        uniform LoRA's own count ``r0 Σ (d_in + d_out)`` (rank rounding can put that outside)."""
        b = self.ctx.budget_params
        p0 = lora_params(self.ctx.targets, self.r0)
        return min(b * (1 - tol), p0), max(b * (1 + tol), p0)

    def target_ranks(self, scores: list[float]) -> list[int]:
        """The re-allocated ranks ``r_k`` for ``scores`` (``(n,)``, summing to 1): largest remainder
        of ``R_total · s_k``, caps, floor ``min_rank``, parameter balancing."""
        targets = self.ctx.targets
        total = self.r0 * len(targets)
        caps = [min(t.d_in, t.d_out) for t in targets]
        min_rank = int(self.options.min_rank)
        ranks = allocate_ranks(scores, total, caps, min_rank)
        tol = self.options.param_tolerance
        if tol is not None:
            lo, hi = self.param_window(float(tol))
            ranks = balance_params(ranks, [total * x for x in scores], [t.d_in + t.d_out for t in targets], caps,
                                   lo, hi, min_rank)
        return ranks

    def _to_resize(self, new: list[int]) -> list[bool]:
        return [self.refactor_all or r != old for r, old in zip(new, self.ranks)]

    def reallocate(self, rebuild: Callable[[], None] | None = None) -> list[int]:
        """Re-factorise the LoRA modules to :meth:`target_ranks` and rebuild the optimizer.

        The EMAs are read on the host here (once). Modules whose rank changes (every module when
        :attr:`refactor_all`) get new factors (:func:`resize_lora_module`), which enter the rebuilt
        AdamW with fresh state; the others keep their parameters and state.

        Args:
            rebuild: ``state.rebuild_optimizer`` (called without a state transfer), or None (no
                optimizer, e.g. in tests).

        Returns:
            The new ranks ``(n,)``.
        """
        scores = self.allocation_scores(self.ema.tolist())
        new = self.target_ranks(scores)
        alpha, preserve = float(self.options.alpha), bool(self.options.preserve_update)
        for mod, r, resize in zip(self.modules, new, self._to_resize(new)):
            if resize:
                resize_lora_module(mod, r, alpha, preserve)
        self.ranks, self.alloc_scores, self.reallocated = new, scores, True
        if rebuild is not None:
            rebuild()
        return new

    # -- checkpoints ------------------------------------------------------------------------------
    def checkpoint_state(self, model: nn.Module) -> dict:
        """Warm-up EMAs, update count and (after warm-up) the allocated ranks and scores."""
        return {"ema": self.ema.tolist(), "n_updates": self.n_updates, "reallocated": self.reallocated,
                "ranks": list(self.ranks), "alloc_scores": self.alloc_scores}

    def restore_checkpoint_state(self, model: nn.Module, state: dict) -> None:
        """Re-apply a saved allocation before the parameters load: the re-factorised modules get
        factors of the saved shapes (zeros; the checkpoint's values are loaded into them next)."""
        if not state:
            return
        self.ema, self.n_updates = torch.tensor(state["ema"], dtype=torch.float32), int(state["n_updates"])
        if state["reallocated"]:
            new = [int(r) for r in state["ranks"]]
            alpha = float(self.options.alpha)
            for mod, r, resize in zip(self.modules, new, self._to_resize(new)):
                if resize:
                    a, b = mod.lora_A[ADAPTER].weight, mod.lora_B[ADAPTER].weight
                    set_lora_factors(mod, a.new_zeros(r, a.shape[1]), b.new_zeros(b.shape[0], r), alpha)
            self.ranks, self.alloc_scores, self.reallocated = new, state.get("alloc_scores"), True

    # -- reporting --------------------------------------------------------------------------------
    def summary(self, model: nn.Module) -> dict:
        return {"rank": self.r0, "capacity_limited": capacity_limited(self.ctx, self.r0),
                "warmup_steps": self.warmup, "reallocated": self.reallocated,
                "total_rank": int(sum(self.ranks)), "min_rank": int(min(self.ranks)), "max_rank": int(max(self.ranks)),
                "lora_params_uniform": lora_params(self.ctx.targets, self.r0)}

    def tables(self, model: nn.Module) -> dict:
        return {"ranks": ranks_frame(self.ctx.targets, self.ranks, self.scores(), grad_norm_ema=self.ema.tolist(),
                                     initial_rank=[self.r0] * len(self.ranks))}
