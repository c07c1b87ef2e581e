"""GLoRA: gradient-norm-aware rank allocation for LoRA (re-allocated once after a warm-up).

**Not peft's "GLoRA" (Generalized LoRA, Chavan et al. 2023).** Our ``glora`` is the
gradient-norm-aware rank allocation of DESIGN.md (seed 000); it only uses peft's plain
``LoraConfig`` and resizes its LoRA modules in place.

Method. Every target matrix ``W_k`` (attention q/k/v/output, both feed-forward) starts as LoRA
(Hu et al. 2021, Eq. 3) at the budget's uniform rank ``r0``: ``h = W_k x + (α / r_k) B_k A_k x``,
``B_k ∈ R^{d_out×r_k}`` (zero init), ``A_k ∈ R^{r_k×d_in}`` (Kaiming-uniform init). During a warm-up
of ``K`` optimizer steps the method keeps, per matrix, an exponential moving average of the
Frobenius norm of the gradient of its update ``ΔW_k = B_k A_k``::

    g_k ← β g_k + (1 − β) n_k,     n_k = sqrt(‖∇A_k‖²_F + ‖∇B_k‖²_F)      (estimator "lora", free)
                                   n_k = ‖∂L/∂W_k‖_F                         (estimator "exact")

(the exact estimator switches ``requires_grad`` on for the frozen base weights during warm-up
only, reads their gradient ``∂L/∂W_k = Σ_tokens δ_outᵀ x`` and drops it: the base weights are never
in the optimizer and never updated). After step ``K`` the total rank ``R_total = n · r0`` (``n``
matrices) is re-allocated in proportion to the scores ``s_k = g_k / Σ_j g_j``::

    r_k = round(R_total · s_k)      (largest-remainder rounding: Σ_k r_k = R_total exactly)

with ``min_rank ≤ r_k ≤ min(d_in, d_out)`` (``min_rank`` = 1 by default so no matrix loses its
adapter; rank that the caps or the floor remove or add is redistributed over the other matrices
in proportion to their scores, see :func:`allocate_ranks`). Each peft LoRA module is then
resized in place: the first ``min(r0, r_k)`` rank components (rows of ``A``, columns of ``B``) are
kept bit for bit, new components are initialised as LoRA does (``A`` Kaiming-uniform, ``B`` zero),
the rest are dropped, and the α/r rule is applied explicitly: ``scaling = α / r_k``, ``r = r_k``.
The optimizer is rebuilt; kept slices keep their AdamW moments (``exp_avg``, ``exp_avg_sq``,
``step``), new slices start with zero moments.

Note on the scaling rule: with ``scaling = α / r_k`` a matrix whose rank grows from ``r0`` to
``r_k`` sees its learned update multiplied by ``r0 / r_k`` (new components are zero, so they add
nothing, but the common factor changes). Option ``preserve_update: true`` instead absorbs the
factor into the kept columns of ``B`` (``B ← B · r_k / r0``, AdamW moments rescaled to match) so
that ``ΔW_k`` and the forward output are exactly unchanged by the resize; the default (``false``)
keeps the learned factors bitwise, as the issue specifies.

Budget: ``r0`` is the uniform LoRA rank of the budget (:func:`peftbench.budget.uniform_rank`), so
the run starts with exactly LoRA's parameter count. Re-allocation keeps the total *rank* fixed, but
matrices differ in cost ``d_in + d_out`` (feed-forward matrices cost more), so the parameter count
can move; if it leaves ``budget_params · (1 ± param_tolerance)`` (±10 %, the benchmark's budget
rule; widened to contain LoRA's own count when rank rounding puts that outside), single rank units
are moved between the most and least expensive matrices (largest surplus over the ideal share
first) until it is within, keeping ``Σ r_k = R_total`` (:func:`balance_params`).
``capacity_limited`` is reported when ``r0`` already sits at the smallest matrix dimension and
LoRA's count is below 90 % of the budget.

Options (``method_options.glora``): :class:`GLoRAOptions`. With ``warmup_steps`` and
``warmup_fraction`` both null the warm-up is the first epoch; it is capped at half the run so that
the re-allocated ranks are trained (1-epoch runs).

Outputs: ``ranks.parquet`` with module, layer, kind, score (= s_k), rank (= r_k), plus
``grad_norm_ema`` (g_k) and ``initial_rank`` (r0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import nn

from ..budget import lora_params
from ..models import Target
from . import register
from .base import LoopState, ranks_frame
from .lora import LoRA, LoRAOptions
from .options import option

ADAPTER = "default"


# ------------------------------------------------------------------------------------------------
# helpers shared with fwlora
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
    """LoRA at its largest possible uniform rank still spends less than 90 % of the budget."""
    cap = min(min(t.d_in, t.d_out) for t in ctx.targets)
    return bool(r0 >= cap and lora_params(ctx.targets, r0) < 0.9 * ctx.budget_params)


def exclude_params(groups: list[dict[str, Any]], excluded: list[nn.Parameter]) -> list[dict[str, Any]]:
    """``groups`` without the parameters in ``excluded`` (by identity); empty groups dropped."""
    ids = {id(p) for p in excluded}
    out = []
    for g in groups:
        ps = [p for p in g["params"] if id(p) not in ids]
        if ps:
            out.append({**g, "params": ps})
    return out


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
    score: uniform shares.

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

    def shares(lam: float) -> list[float]:
        return [min(max(lam * x, min_rank), c) for x, c in zip(s, caps)]

    lo, hi = 0.0, max(caps) / min(s)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if sum(shares(mid)) < total:
            lo = mid
        else:
            hi = mid
    q = shares(hi)
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
# resizing
# ------------------------------------------------------------------------------------------------
def resize_lora_module(module: nn.Module, new_r: int, alpha: float, preserve_update: bool = False,
                       adapter: str = ADAPTER) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter, nn.Parameter, float]:
    """Resize one peft LoRA module's adapter from rank ``r`` to ``new_r`` in place.

    ``A`` (``r × d_in``) → ``A'`` (``new_r × d_in``): the first ``m = min(r, new_r)`` rows kept bitwise,
    new rows Kaiming-uniform (a = √5, as peft/LoRA). ``B`` (``d_out × r``) → ``B'`` (``d_out × new_r``):
    the first ``m`` columns kept (bitwise, or times ``c = scaling_old / scaling_new`` when
    ``preserve_update``), new columns zero. Sets ``module.r[adapter] = new_r`` and
    ``module.scaling[adapter] = α / new_r``.

    Returns:
        ``(A_old, B_old, A_new, B_new, c)``: the replaced and new weight parameters and the factor
        applied to ``B``'s kept columns (1.0 unless ``preserve_update``).

    Raises:
        ValueError: ``new_r < 1``.
    """
    if new_r < 1:
        raise ValueError(f"rank must be ≥ 1, got {new_r}")
    lin_a, lin_b = module.lora_A[adapter], module.lora_B[adapter]
    a_old, b_old = lin_a.weight, lin_b.weight
    r = a_old.shape[0]
    m = min(r, new_r)
    old_scaling = float(module.scaling[adapter])
    new_scaling = alpha / new_r
    c = old_scaling / new_scaling if preserve_update else 1.0
    new_a = nn.Linear(a_old.shape[1], new_r, bias=False).to(device=a_old.device, dtype=a_old.dtype)
    new_b = nn.Linear(new_r, b_old.shape[0], bias=lin_b.bias is not None).to(device=b_old.device, dtype=b_old.dtype)
    with torch.no_grad():
        nn.init.kaiming_uniform_(new_a.weight, a=math.sqrt(5))
        new_a.weight[:m].copy_(a_old[:m])
        new_b.weight.zero_()
        new_b.weight[:, :m].copy_(b_old[:, :m] * c if preserve_update else b_old[:, :m])
        if lin_b.bias is not None:
            new_b.bias.copy_(lin_b.bias)
    new_a.weight.requires_grad_(a_old.requires_grad)
    new_b.weight.requires_grad_(b_old.requires_grad)
    module.lora_A[adapter] = new_a
    module.lora_B[adapter] = new_b
    module.r[adapter] = new_r
    module.scaling[adapter] = new_scaling
    return a_old, b_old, new_a.weight, new_b.weight, c


def transfer_adam_state(old_opt: torch.optim.Optimizer, new_opt: torch.optim.Optimizer,
                        pairs: list[tuple[nn.Parameter, nn.Parameter, int, float]]) -> None:
    """Copy AdamW state of kept slices from replaced parameters to their resized successors.

    Each pair ``(old, new, dim, c)``: the first ``min(old.shape[dim], new.shape[dim])`` slices along
    ``dim`` of ``exp_avg`` (times ``1/c``) and ``exp_avg_sq`` (times ``1/c²``) are copied, the rest of
    the new moments are zero; ``step`` is copied. ``c`` is the factor the parameter's kept slices
    were multiplied by (the gradient scales by ``1/c``). Parameters without old state are skipped.
    """
    for old, new, dim, c in pairs:
        st = old_opt.state.get(old)
        if not st:
            continue
        m = min(old.shape[dim], new.shape[dim])
        ns: dict[str, Any] = {}
        for key, val in st.items():
            if key in ("exp_avg", "exp_avg_sq") and torch.is_tensor(val) and val.shape == old.shape:
                z = torch.zeros_like(new, memory_format=torch.preserve_format)
                scale = (1.0 / c) ** (2 if key == "exp_avg_sq" else 1)
                z.narrow(dim, 0, m).copy_(val.narrow(dim, 0, m) * scale if scale != 1.0 else val.narrow(dim, 0, m))
                ns[key] = z
            elif torch.is_tensor(val):
                ns[key] = val.clone()
            else:
                ns[key] = val
        new_opt.state[new] = ns


def warmup_length(total_steps: int, default: int, steps: int | None, fraction: float | None,
                  cap: int | None = None) -> int:
    """Warm-up steps ``K``: ``steps`` if given, else ``round(fraction · total)`` if given, else
    ``default``; then at most ``cap`` (if given), at most ``total_steps``, at least 1.

    Raises:
        ValueError: negative ``steps`` or ``fraction`` outside ``[0, 1]``.
    """
    if steps is not None and steps < 0:
        raise ValueError(f"warmup_steps must be ≥ 0, got {steps}")
    if fraction is not None and not 0 <= fraction <= 1:
        raise ValueError(f"warmup_fraction must be in [0, 1], got {fraction}")
    k = int(steps) if steps is not None else (round(fraction * total_steps) if fraction is not None else default)
    if cap is not None:
        k = min(k, cap)
    return max(1, min(k, total_steps))


# ------------------------------------------------------------------------------------------------
# the method
# ------------------------------------------------------------------------------------------------
class LoRAWithBaseGradients(LoRA):
    """LoRA whose frozen target weights may carry gradients during a warm-up (GLoRA's exact
    estimator, FW-LoRA's Fisher estimate): they are read, never optimised.

    ``self.modules`` holds the peft LoRA modules in target order after :meth:`build`.
    Not ``compilable``: the base weights' ``requires_grad`` flips after the warm-up and GLoRA
    resizes its modules, both of which a captured graph would not see.
    """

    compilable = False

    def build(self, model: nn.Module) -> nn.Module:
        model = super().build(model)
        self.modules = lora_modules(model, self.ctx.targets)
        return model

    def parameter_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        # base weights may have requires_grad on during the warm-up: keep them out of the optimizer
        return exclude_params(super().parameter_groups(model, weight_decay), base_weights(self.modules))


@dataclass
class GLoRAOptions(LoRAOptions):
    """Options of GLoRA (alpha and dropout as in LoRA)."""

    beta: float = option(0.9, "EMA factor β of the gradient-norm score, in [0, 1)")
    estimator: Literal["lora", "exact"] = option(
        "lora", "gradient-norm estimator: 'lora' = sqrt(‖∇A‖² + ‖∇B‖²) (free), 'exact' = ‖∂L/∂W‖_F")
    warmup_steps: int | None = option(None, "warm-up length K in optimizer steps, ≥ 0; null: see warmup_fraction")
    warmup_fraction: float | None = option(None, "warm-up length as a fraction of total steps, in [0, 1]; "
                                                 "both null: the first epoch")
    min_rank: int = option(1, "smallest rank a matrix keeps after re-allocation, ≥ 1")
    param_tolerance: float | None = option(0.1, "allowed relative deviation of the parameter count from the "
                                                "budget after re-allocation, ≥ 0; null: no balancing")
    preserve_update: bool = option(False, "rescale kept factors so that ΔW is unchanged when α/r changes")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require("beta", 0 <= self.beta < 1, "must be in [0, 1)")
        self.require("warmup_steps", self.warmup_steps is None or self.warmup_steps >= 0, "must be ≥ 0 or null")
        self.require("warmup_fraction", self.warmup_fraction is None or 0 <= self.warmup_fraction <= 1,
                     "must be in [0, 1] or null")
        self.require("min_rank", self.min_rank >= 1, "must be ≥ 1")
        self.require("param_tolerance", self.param_tolerance is None or self.param_tolerance >= 0,
                     "must be ≥ 0 or null")


@register
class GLoRA(LoRAWithBaseGradients):
    """Gradient-norm-aware LoRA rank allocation (not peft's Generalized LoRA)."""

    name = "glora"
    options_cls = GLoRAOptions

    def __init__(self, ctx):
        super().__init__(ctx)
        n = len(ctx.targets)
        self.r0 = self.rank()
        self.ranks = [self.r0] * n
        self.ema = [0.0] * n
        self.n_updates = 0
        self.reallocated = False
        self.modules: list[nn.Module] = []
        self.warmup = warmup_length(ctx.total_steps, ctx.steps_per_epoch, self.options.warmup_steps,
                                    self.options.warmup_fraction,
                                    cap=max(1, ctx.total_steps // 2) if ctx.total_steps >= 2 else None)

    def _in_warmup(self, state: LoopState) -> bool:
        return not self.reallocated and state.step < self.warmup

    # -- hooks ------------------------------------------------------------------------------------
    def on_step_start(self, model: nn.Module, state: LoopState) -> None:
        if self.options.estimator == "exact" and self._in_warmup(state):
            for w in base_weights(self.modules):
                w.requires_grad_(True)

    def gradient_norms(self) -> list[float]:
        """Current per-target gradient norm ``n_k`` of the chosen estimator (0 where no gradient)."""
        out = []
        for mod in self.modules:
            if self.options.estimator == "exact":
                g = mod.get_base_layer().weight.grad
                out.append(0.0 if g is None else float(g.detach().float().norm()))
            else:
                sq = 0.0
                for p in (mod.lora_A[ADAPTER].weight, mod.lora_B[ADAPTER].weight):
                    if p.grad is not None:
                        sq += float(p.grad.detach().float().pow(2).sum())
                out.append(math.sqrt(sq))
        return out

    def after_backward(self, model: nn.Module, state: LoopState) -> None:
        if not self._in_warmup(state):
            return
        beta = float(self.options.beta)
        norms = self.gradient_norms()
        self.ema = [beta * e + (1 - beta) * x for e, x in zip(self.ema, norms)]
        self.n_updates += 1
        if self.options.estimator == "exact":
            for w in base_weights(self.modules):
                w.grad = None

    def after_optimizer_step(self, model: nn.Module, state: LoopState) -> None:
        if self.reallocated or state.step < self.warmup:
            return
        for w in base_weights(self.modules):
            w.requires_grad_(False)
            w.grad = None
        self.reallocate(state.rebuild_optimizer)

    # -- re-allocation ----------------------------------------------------------------------------
    def scores(self) -> list[float]:
        """``s_k = g_k / Σ_j g_j`` (uniform when every EMA is zero)."""
        tot = sum(self.ema)
        n = len(self.ema)
        return [e / tot for e in self.ema] if tot > 0 else [1.0 / n] * n

    def param_window(self, tol: float) -> tuple[float, float]:
        """Allowed adapter-parameter window: ``budget_params · (1 ± tol)``, widened to contain
        uniform LoRA's own count ``r0 Σ (d_in + d_out)`` (rank rounding can put that outside)."""
        b = self.ctx.budget_params
        p0 = lora_params(self.ctx.targets, self.r0)
        return min(b * (1 - tol), p0), max(b * (1 + tol), p0)

    def target_ranks(self) -> list[int]:
        """The re-allocated ranks ``r_k`` (largest remainder, caps, floor, parameter balancing)."""
        targets = self.ctx.targets
        s = self.scores()
        total = self.r0 * len(targets)
        caps = [min(t.d_in, t.d_out) for t in targets]
        min_rank = int(self.options.min_rank)
        ranks = allocate_ranks(s, total, caps, min_rank)
        tol = self.options.param_tolerance
        if tol is not None:
            lo, hi = self.param_window(float(tol))
            ranks = balance_params(ranks, [total * x for x in s], [t.d_in + t.d_out for t in targets], caps,
                                   lo, hi, min_rank)
        return ranks

    def reallocate(self, rebuild: Callable[[Callable | None], None] | None = None) -> list[int]:
        """Resize every LoRA module to :meth:`target_ranks` and rebuild the optimizer.

        Args:
            rebuild: ``state.rebuild_optimizer`` (called with the AdamW state transfer), or None
                (no optimizer, e.g. in tests).
        """
        new = self.target_ranks()
        pairs = []
        alpha = float(self.options.alpha)
        for mod, r_new in zip(self.modules, new):
            a_old, b_old, a_new, b_new, c = resize_lora_module(mod, r_new, alpha, bool(self.options.preserve_update))
            pairs += [(a_old, a_new, 0, 1.0), (b_old, b_new, 1, c)]
        self.ranks = new
        self.reallocated = True
        if rebuild is not None:
            rebuild(lambda old, opt: transfer_adam_state(old, opt, pairs))
        return new

    # -- checkpoints ------------------------------------------------------------------------------
    def checkpoint_state(self, model: nn.Module) -> dict:
        """Warm-up EMAs, update count and (after warm-up) the allocated ranks."""
        return {"ema": list(self.ema), "n_updates": self.n_updates, "reallocated": self.reallocated,
                "ranks": list(self.ranks)}

    def restore_checkpoint_state(self, model: nn.Module, state: dict) -> None:
        """Re-apply a saved allocation (resizing the LoRA modules) before the parameters load."""
        if not state:
            return
        self.ema, self.n_updates = list(state["ema"]), int(state["n_updates"])
        if state["reallocated"]:
            alpha = float(self.options.alpha)
            for mod, r in zip(self.modules, state["ranks"]):
                resize_lora_module(mod, int(r), alpha)
            self.ranks, self.reallocated = list(state["ranks"]), True

    # -- reporting --------------------------------------------------------------------------------
    def param_counts(self, model: nn.Module) -> dict[str, int]:
        counts = super().param_counts(model)
        frozen = sum(w.numel() for w in base_weights(self.modules) if w.requires_grad)
        counts["adapter_params"] -= frozen
        return counts

    def summary(self, model: nn.Module) -> dict:
        return {"rank": self.r0, "capacity_limited": capacity_limited(self.ctx, self.r0),
                "warmup_steps": self.warmup, "reallocated": self.reallocated,
                "total_rank": int(sum(self.ranks)), "min_rank": int(min(self.ranks)), "max_rank": int(max(self.ranks)),
                "lora_params_uniform": lora_params(self.ctx.targets, self.r0)}

    def tables(self, model: nn.Module) -> dict:
        return {"ranks": ranks_frame(self.ctx.targets, self.ranks, self.scores(), grad_norm_ema=list(self.ema),
                                     initial_rank=[self.r0] * len(self.ranks))}
