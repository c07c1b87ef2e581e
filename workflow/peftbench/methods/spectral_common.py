"""Shared machinery of the spectral methods (``spectral_a``, ``spectral_r``, ``gsa``, ``dynacsg_static``).

Each target ``nn.Linear`` with weight ``W ∈ R^{d_out×d_in}`` is replaced by a
:class:`SpectralLinear` that keeps the original layer frozen as ``.base`` and holds the top-r
singular triplets of ``W`` from the ``svd`` stage as buffers,
``U ∈ R^{d_out×r}``, ``S ∈ R^r``, ``V ∈ R^{d_in×r}`` (``W = U diag(S) Vᵀ + W_res``). A subclass
adds the trainable parameters and the low-rank *correction* ``Δ(x)`` so that

    y = base(x) + Δ(x),      Δ(x) = x (W' − W)ᵀ = z(x) Bᵀ,

computed on the activations with r-wide products only (no ``d×d`` matrix is formed): a subclass
returns ``z (…, q)`` and ``B (d_out, q)`` (:meth:`SpectralLinear.lowrank`, q ≈ r) and the add is
fused into one ``addmm`` with the frozen layer's output. Every
correction is exactly zero at initialisation, so the wrapped model equals the pretrained one at
step 0. :meth:`SpectralLinear.delta_weight` materialises ``W' − W`` (for tests and inspection).

:class:`SpectralMethod` does the wrapping and freezing (everything frozen except the wrappers'
own parameters and the task head ``ctx.head_modules``) and the common reporting; a method
subclass chooses the per-matrix rank from the budget (:meth:`SpectralMethod.plan_ranks`) and
the wrapper class (:meth:`SpectralMethod.make_wrapper`).

Budget reporting (every spectral method, ``dynacsg`` included, through :func:`budget_flags`):
``capacity_limited`` — the run trains fewer than ``(1 − BUDGET_TOLERANCE)`` × the budget's
parameter count, because a matrix cannot hold more (rank capped at the stored top-k or
``min(d_in, d_out)``) or because the method's size is fixed by an option (GSA's ``k`` gates);
``outside_budget`` — the run misses the budget by more than ``BUDGET_TOLERANCE`` in either
direction (an explicit ``rank`` may also overshoot it), so it belongs outside its budget family.
``planned_adapter_params`` is the real count (= ``adapter_params`` of ``metrics.parquet``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models import Target
from ..svd import load_factors
from .base import Method, ranks_frame

from ..budget import BUDGET_TOLERANCE  # the fair-comparison rule, stated once in peftbench.budget


def budget_flags(count: float, target: float) -> dict[str, bool]:
    """``capacity_limited`` and ``outside_budget`` of a run that trains ``count`` adapter
    parameters against a budget of ``target`` parameters (``BuildContext.budget_params``).

    ``capacity_limited``: ``count < (1 − BUDGET_TOLERANCE) · target`` (the run cannot spend its
    budget); ``outside_budget``: ``|count − target| > BUDGET_TOLERANCE · target``.
    """
    return {"capacity_limited": bool(count < (1.0 - BUDGET_TOLERANCE) * target),
            "outside_budget": bool(abs(count - target) > BUDGET_TOLERANCE * target)}


def explicit_ranks(value: int, targets: list[Target], top_k: list[int], key: str) -> list[int]:
    """Per-matrix ranks for a rank set by an option: ``min(value, d_in, d_out)`` per target.

    A matrix smaller than ``value`` holds only ``min(d_in, d_out)`` (that is structural; the run
    then reports ``capacity_limited``); fewer stored singular triplets than that is a setting to fix.

    Args:
        value: the option's value (≥ 1).
        targets: the adapted matrices; top_k: stored triplets per target (same order).
        key: the option's config key for the message (``method_options.gsa.k``).

    Raises:
        ValueError: the ``svd`` stage stored fewer triplets than ``value`` for a matrix that could
            hold ``value``; names the key, the value, the stored count and both fixes.
    """
    ranks = [min(int(value), t.d_in, t.d_out) for t in targets]
    short = [(t, k) for r, k, t in zip(ranks, top_k, targets) if r > k]
    if short:
        t, k = short[0]
        raise ValueError(f"config key {key}: {value} singular values per matrix, but the svd stage stored only "
                         f"{k} for {t.name} (and {len(short) - 1} more matrices); fix: set svd.top_k ≥ {value} "
                         f"(reruns the svd rule) or lower {key}")
    return ranks


class SpectralLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a correction in the span of its top-r singular vectors.

    Args:
        base: the pretrained layer (kept, frozen, as ``.base``), weight ``(d_out, d_in)``.
        U: ``(d_out, k)`` left singular vectors (k ≥ r), columns ordered by singular value.
        S: ``(k,)`` singular values, descending.
        Vh: ``(k, d_in)`` right singular vectors (rows).
        r: how many leading triplets to keep (``1 ≤ r ≤ k``).

    Buffers (move with ``.to(device)``, not in ``state_dict``): ``U (d_out, r)``, ``S (r,)``,
    ``V (d_in, r)`` (= ``Vh[:r]ᵀ``).

    Raises:
        ValueError: shapes of the factors do not match ``base.weight`` or ``r`` is out of range.
    """

    def __init__(self, base: nn.Linear, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, r: int):
        super().__init__()
        d_out, d_in = base.weight.shape
        k = S.numel()
        if U.shape != (d_out, k) or Vh.shape != (k, d_in):
            raise ValueError(f"SVD factors U {tuple(U.shape)}, S {tuple(S.shape)}, Vh {tuple(Vh.shape)} do not "
                             f"fit a weight of shape {(d_out, d_in)}; the factors were computed for another model")
        if not 1 <= r <= k:
            raise ValueError(f"rank r={r} must be in [1, {k}] (the stored top-k)")
        self.base = base
        base.requires_grad_(False)
        dt = base.weight.dtype
        self.register_buffer("U", U[:, :r].to(dt).contiguous(), persistent=False)
        self.register_buffer("S", S[:r].to(dt).contiguous(), persistent=False)
        self.register_buffer("V", Vh[:r].T.to(dt).contiguous(), persistent=False)
        self.r = r

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The frozen pretrained weight (for code that inspects ``.weight`` of a linear layer)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def lowrank(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The correction as a product: ``(z (..., q), B (d_out, q))`` with ``Δ(x) = z Bᵀ``, q ~ r."""
        raise NotImplementedError

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The correction ``Δ(x) = x (W' − W)ᵀ`` for ``x (..., d_in)`` → ``(..., d_out)``."""
        z, B = self.lowrank(x)
        return z @ B.T

    def delta_weight(self) -> torch.Tensor:
        """``W' − W`` as a dense ``(d_out, d_in)`` matrix (tests, inspection; not used in training)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + z Bᵀ``, the add fused into one ``addmm`` (no separate ``(…, d_out)`` temporary)."""
        y = self.base(x)
        z, B = self.lowrank(x)
        if z.dtype != y.dtype:  # autocast: base output in bf16, z possibly not
            z, B = z.to(y.dtype), B.to(y.dtype)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), z.reshape(-1, z.shape[-1]), B.T)
        return out.view(y.shape)

    def extra_repr(self) -> str:
        return f"r={self.r}"


def stored_top_k(path: str | Path, targets: list[Target]) -> list[int]:
    """Singular triplets stored per target in ``factors.safetensors`` (without loading tensors).

    Raises:
        FileNotFoundError: the file is missing (run the ``svd`` rule first).
        KeyError: a target is not in the file (computed for another model).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SVD factors {path} not found; run `snakemake {path}` (rule svd) first")
    out = []
    with safe_open(str(path), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        for t in targets:
            if f"{t.name}.S" not in keys:
                raise KeyError(f"{path} has no factors for {t.name}; it was computed for another model")
            out.append(int(f.get_slice(f"{t.name}.S").get_shape()[0]))
    return out


def check_factors(weight: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, name: str,
                  rtol: float = 1e-3) -> None:
    """Check that ``(U, S, Vh)`` are singular triplets of ``weight``: ``Uᵀ W Vhᵀ ≈ diag(S)``.

    Raises:
        ValueError: they are not (the factors were computed from other weights), naming the module.
    """
    with torch.no_grad():
        w = weight.detach().to(torch.float32).cpu()
        proj = U.T.float() @ w @ Vh.T.float()
        err = float((proj - torch.diag(S.float())).abs().max())
    if err > rtol * float(S.max()) + 1e-6:
        raise ValueError(f"SVD factors of {name} do not match its pretrained weight (max |UᵀWV − diag(S)| = "
                         f"{err:.3g}, σ_max = {float(S.max()):.3g}); the factors were computed for another model. "
                         f"Fix: rerun the svd rule for this model")


def freeze_except_head(model: nn.Module, head_modules: list[str]) -> None:
    """Freeze every parameter of ``model`` except those of the task head modules.

    Args:
        head_modules: module-name suffixes of the head (``classifier``, ``pooler``).
    """
    model.requires_grad_(False)
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in head_modules:
            mod.requires_grad_(True)


class SpectralMethod(Method):
    """Base of the spectral methods: wrap each target with a :class:`SpectralLinear` subclass.

    Subclasses set ``name``, ``options_cls``, implement :meth:`plan_ranks` and
    :meth:`make_wrapper`, and may override :meth:`module_score` / :meth:`extra_summary`.
    """

    identity_at_init = True  # every correction is exactly zero at init

    def __init__(self, ctx):
        super().__init__(ctx)
        self._plan: dict[str, Any] | None = None

    # -- to implement ----------------------------------------------------------------------------
    def plan_ranks(self, top_k: list[int]) -> dict[str, Any]:
        """``{"ranks": [r per target], "budget_rank": r before caps, "params": [count per target]}``.

        Args:
            top_k: stored singular triplets per target (same order as ``ctx.targets``).
        """
        raise NotImplementedError

    def make_wrapper(self, base: nn.Linear, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, r: int) -> SpectralLinear:
        """The wrapper module for one target."""
        raise NotImplementedError

    def module_score(self, mod: SpectralLinear) -> float:
        """Per-module score for ``ranks.parquet`` (default NaN)."""
        return float("nan")

    def module_rank(self, mod: SpectralLinear) -> float:
        """Per-module rank for ``ranks.parquet`` (default: the wrapper's r)."""
        return float(mod.r)

    def extra_summary(self, model: nn.Module) -> dict[str, Any]:
        return {}

    # -- shared ----------------------------------------------------------------------------------
    def plan(self) -> dict[str, Any]:
        """The per-target ranks and parameter counts for this run's budget (cached).

        Adds ``top_k`` (stored triplets per target) and :func:`budget_flags` of the planned count
        (``capacity_limited``, ``outside_budget``).

        Raises:
            ValueError: no ``svd_path`` in the context, or an option asks for more singular
                values than the ``svd`` stage stored (:func:`explicit_ranks`).
        """
        if self._plan is None:
            if self.ctx.svd_path is None:
                raise ValueError(f"method {self.name} needs the SVD factors (--svd .../factors.safetensors)")
            top_k = stored_top_k(self.ctx.svd_path, self.ctx.targets)
            p = self.plan_ranks(top_k)
            p["top_k"] = top_k
            p.update(budget_flags(sum(p["params"]), self.ctx.budget_params))
            self._plan = p
        return self._plan

    def build(self, model: nn.Module) -> nn.Module:
        plan = self.plan()
        freeze_except_head(model, self.ctx.head_modules)
        for t, r in zip(self.ctx.targets, plan["ranks"]):
            parent_name, _, child = t.name.rpartition(".")
            parent = model.get_submodule(parent_name)
            base = getattr(parent, child)
            if not isinstance(base, nn.Linear):
                raise ValueError(f"{t.name} is a {type(base).__name__}, not an nn.Linear; build() runs once on a fresh model")
            U, S, Vh = load_factors(self.ctx.svd_path, t.name)
            check_factors(base.weight, U, S, Vh, t.name)
            setattr(parent, child, self.make_wrapper(base, U, S, Vh, int(r)))
        return model

    def wrappers(self, model: nn.Module) -> list[SpectralLinear]:
        """The wrapper modules in ``ctx.targets`` order."""
        return [model.get_submodule(t.name) for t in self.ctx.targets]

    def summary(self, model: nn.Module) -> dict[str, Any]:
        p = self.plan()
        ranks = p["ranks"]
        real = sum(p["params"])
        return {"rank": int(max(ranks)), "min_rank": int(min(ranks)), "budget_rank": int(p["budget_rank"]),
                "capacity_limited": bool(p["capacity_limited"]), "outside_budget": bool(p["outside_budget"]),
                "budget_target_params": float(self.ctx.budget_params),
                "planned_adapter_params": int(real), **self.extra_summary(model)}

    def tables(self, model: nn.Module) -> dict:
        mods = self.wrappers(model)
        return {"ranks": ranks_frame(self.ctx.targets, [self.module_rank(m) for m in mods],
                                     [self.module_score(m) for m in mods],
                                     allocated_rank=[int(m.r) for m in mods])}


def largest_fitting(cost, budget: float, lo: int = 1) -> int:
    """The largest integer r ≥ lo with ``cost(r) ≤ budget`` (``lo`` if none fits); cost increasing."""
    r = lo
    while cost(r + 1) <= budget:
        r += 1
        if r > 1_000_000:  # pragma: no cover - guards a non-increasing cost
            break
    return r


def lowrank_fro(L: torch.Tensor, R: torch.Tensor) -> float:
    """``‖L Rᵀ‖_F`` for ``L (m, q)``, ``R (n, q)`` without forming the ``m×n`` product.

    Uses ``‖L Rᵀ‖²_F = tr((LᵀL)(RᵀR))``.
    """
    with torch.no_grad():
        L, R = L.detach().float(), R.detach().float()
        return math.sqrt(max(float(((L.T @ L) * (R.T @ R)).sum()), 0.0))
