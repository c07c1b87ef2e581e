"""Spectral Adapter, rotational variant (``spectral_r``): rotate and rescale the top-r singular vectors.

Zhang & Pilanci 2024, "Spectral Adapter: Fine-Tuning in Spectral Space", arXiv:2405.13952,
Sec. 3 (Spectral Adapter^R), as the authors' code implements it. With the top-r SVD
``W = U_r S_r V_rᵀ + W_res`` of each pretrained target matrix (``svd`` stage),

    W' = W_res + (U_r R_U) diag(S_r ⊙ c) (V_r R_V)ᵀ = W + U_r (R_U diag(S_r ⊙ c) R_Vᵀ − diag(S_r)) V_rᵀ,

where ``R_U, R_V ∈ R^{r×r}`` are orthogonal by the Cayley transform

    R = (I − K)(I + K)^{-1},   K = X − Xᵀ  (skew-symmetric, so RᵀR = I, det R = 1),

of a trainable ``X``, and ``c ∈ R^r`` is a trainable scale of the top-r singular values. Only the
``r(r−1)/2`` free entries of ``X`` (its strict upper triangle) are trained, as a vector; ``X = 0``
and ``c = 1`` at init give ``R = I`` and ``W' = W`` at step 0. The correction is applied to the
activations with r-wide products only (plus one ``r×r`` solve per forward):

    Δ(x) = ((x V_r) M) U_rᵀ,   M = R_V diag(S_r ⊙ c) R_Uᵀ − diag(S_r)  (r×r),     (= x (W' − W)ᵀ).

Fidelity to the authors' code (github.com/pilancilab/spectral_adapter, class
``SpectralLinearLayer_OFT``): it trains two full ``r×r`` matrices ``A, B`` whose skew parts
``½(A − Aᵀ)`` enter the same Cayley transform, and a vector ``spectral_C`` initialised to ones
that multiplies the top-r singular values — the scale ``c`` above, which an earlier version of
this file lacked. Our ``K = X − Xᵀ`` spans the same skew matrices with only the free entries
(their symmetric part has no effect on ``R``), so the model class is identical and the count
below is the effective one (theirs stores ``2r² + r``). ``c`` (1-D) is in the no-weight-decay
AdamW group (:meth:`~peftbench.methods.base.Method.parameter_groups`), so decay does not pull it
towards 0. They materialise ``W'`` in every forward; we apply the correction to the activations.

Budget: ``2 · r(r−1)/2 + r = r²`` trainable parameters per matrix (two rotations and the scale),
so by default (``rank: null``) ``r`` is the largest rank (at least 2) whose total ``Σ r²`` fits
``budget`` % of the backbone, capped per matrix at the stored top-k and ``min(d_in, d_out)``. When
the cap bites (rotations are cheap: small budgets already ask for more than top-k), the method
trains fewer parameters than the budget and ``capacity_limited`` is recorded. An explicit
``rank`` (e.g. 8) fixes r for every matrix whatever the budget; the run records its real count
and ``capacity_limited`` / ``outside_budget``
(:func:`~peftbench.methods.spectral_common.budget_flags`). The head is trained in full on top.
``ranks.parquet``: rank = r, score = ``‖W' − W‖_F = ‖M‖_F``.

Options (``method_options.spectral_r``): :class:`SpectralROptions`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import register
from .options import MethodOptions, option
from .spectral_common import SpectralLinear, SpectralMethod, explicit_ranks, largest_fitting


@dataclass
class SpectralROptions(MethodOptions):
    """Options of Spectral Adapter^R."""

    rank: int | None = option(None, "top singular vectors r rotated and rescaled per matrix, the same for every "
                                    "matrix whatever the budget (e.g. 8), ≥ 2; null = the largest r whose "
                                    "r² parameters per matrix fit the budget")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require("rank", self.rank is None or self.rank >= 2,
                     "must be an integer ≥ 2 (a rotation needs two vectors) or null (from the budget)")


def rotational_params(r: int) -> int:
    """Trainable parameters of one rank-r matrix: ``2 · r(r−1)/2`` rotation entries + ``r`` scales = ``r²``."""
    return r * (r - 1) + r


def skew_from_params(x: torch.Tensor, r: int, index: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The skew-symmetric ``K = X − Xᵀ`` whose strict upper triangle ``X`` holds ``x``.

    Args:
        x: ``(..., r(r−1)/2)`` free entries, row-major over ``i < j`` (leading batch dims allowed).
        r: matrix size.
        index: ``torch.triu_indices(r, r, 1)`` as a pair, to skip recomputing it.

    Returns:
        ``(..., r, r)`` with ``K[i, j] = x_ij``, ``K[j, i] = −x_ij``, zero diagonal.

    Raises:
        ValueError: ``x`` has the wrong length.
    """
    if x.shape[-1] != r * (r - 1) // 2:
        raise ValueError(f"{x.shape[-1]} entries do not fill the strict upper triangle of a {r}×{r} matrix")
    if index is None:
        index = tuple(torch.triu_indices(r, r, offset=1, device=x.device))
    X = x.new_zeros(*x.shape[:-1], r, r)
    X[..., index[0], index[1]] = x
    return X - X.transpose(-1, -2)


def cayley(K: torch.Tensor) -> torch.Tensor:
    """Cayley transform ``R = (I − K)(I + K)^{-1}`` of a skew-symmetric ``K (..., r, r)``; R is orthogonal.

    ``(I − K)`` and ``(I + K)^{-1}`` commute, so ``R = (I + K)^{-1}(I − K)``, computed with one
    linear solve (``I + K`` is always invertible for skew-symmetric ``K``). Runs in fp32.
    """
    K = K.float()
    eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
    return torch.linalg.solve(eye + K, eye - K)


class RotationalSpectralLinear(SpectralLinear):
    """``y = base(x) + ((x V) M) Uᵀ`` with ``M = R_V diag(S ⊙ c) R_Uᵀ − diag(S)``, Cayley rotations
    ``R_U, R_V`` and singular-value scale ``c``.

    Parameters: ``X_U``, ``X_V``, each ``(r(r−1)/2,)``, zero-initialised (``R = I``); ``scale``
    ``(r,)`` = c, initialised to ones.
    """

    def __init__(self, base: nn.Linear, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, r: int):
        super().__init__(base, U, S, Vh, r)
        n = r * (r - 1) // 2
        self.X_U = nn.Parameter(torch.zeros(n, dtype=base.weight.dtype))
        self.X_V = nn.Parameter(torch.zeros(n, dtype=base.weight.dtype))
        self.scale = nn.Parameter(torch.ones(r, dtype=base.weight.dtype))
        i, j = torch.triu_indices(r, r, offset=1)
        self.register_buffer("triu_i", i, persistent=False)
        self.register_buffer("triu_j", j, persistent=False)

    def rotations(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R_U, R_V)``, each ``(r, r)`` orthogonal (fp32), from one batched solve."""
        with torch.autocast(self.S.device.type, enabled=False):
            x = torch.stack([self.X_U, self.X_V]).float()
            R = cayley(skew_from_params(x, self.r, (self.triu_i, self.triu_j)))
            return R[0], R[1]

    def core(self) -> torch.Tensor:
        """``M = R_V diag(S ⊙ c) R_Uᵀ − diag(S)`` ``(r, r)`` (fp32 inside), so that ``W' − W = U Mᵀ Vᵀ``."""
        R_U, R_V = self.rotations()
        with torch.autocast(self.S.device.type, enabled=False):
            S = self.S.float()
            return ((R_V * (S * self.scale.float())) @ R_U.T - torch.diag(S)).to(self.S.dtype)

    def lowrank(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``Δ(x) = ((x V) M) Uᵀ``: returns ``z = (x V) M (..., r)`` and ``B = U (d_out, r)``."""
        return (x @ self.V) @ self.core(), self.U

    def delta_weight(self) -> torch.Tensor:
        """``W' − W = (U R_U) diag(S ⊙ c) (V R_V)ᵀ − U diag(S) Vᵀ``, ``(d_out, d_in)``."""
        return self.U @ self.core().T @ self.V.T


@register
class SpectralRotational(SpectralMethod):
    """Spectral Adapter^R (arXiv:2405.13952): Cayley rotations and a scale of the top-r singular
    vectors / values.

    ``compilable``: fixed shapes; the Cayley transform is one batched ``torch.linalg.solve`` of
    two ``r×r`` systems in fp32 (autocast off inside), traced by Dynamo like any other op (tested
    with ``compile_backend: eager``).
    """

    name = "spectral_r"
    options_cls = SpectralROptions
    compilable = True

    def plan_ranks(self, top_k: list[int]) -> dict:
        """``rank`` (option) or the largest uniform r ≥ 2 with ``n · r² ≤ budget_params``, capped per matrix.

        Raises:
            ValueError: ``rank`` exceeds the stored top-k (:func:`explicit_ranks`).
        """
        targets = self.ctx.targets
        n = len(targets)
        budget_rank = largest_fitting(lambda r: n * rotational_params(r), self.ctx.budget_params, lo=2)
        if self.options.rank is not None:
            ranks = explicit_ranks(self.options.rank, targets, top_k, f"method_options.{self.name}.rank")
        else:
            ranks = [max(1, min(budget_rank, k, t.d_in, t.d_out)) for k, t in zip(top_k, targets)]
        return {"ranks": ranks, "budget_rank": budget_rank, "params": [rotational_params(r) for r in ranks]}

    def make_wrapper(self, base, U, S, Vh, r) -> SpectralLinear:
        return RotationalSpectralLinear(base, U, S, Vh, r)

    def module_score(self, mod: RotationalSpectralLinear) -> float:
        with torch.no_grad():
            return float(torch.linalg.matrix_norm(mod.core().float()))

    def extra_summary(self, model: nn.Module) -> dict[str, Any]:
        """``mean_abs_scale_shift``: mean over matrices and singular values of ``|c_i − 1|`` (end of run)."""
        with torch.no_grad():
            shifts = torch.cat([(m.scale.detach().float() - 1).abs() for m in self.wrappers(model)])
        return {"mean_abs_scale_shift": float(shifts.mean())}
