"""Spectral Adapter, rotational variant (``spectral_r``): rotate the top-r singular vectors.

Zhang & Pilanci 2024, "Spectral Adapter: Fine-Tuning in Spectral Space" (Spectral Adapter^R).
With the top-r SVD ``W = U_r S_r V_rᵀ + W_res`` of each pretrained target matrix (``svd`` stage),

    W' = W_res + (U_r R_U) S_r (V_r R_V)ᵀ = W + U_r (R_U S_r R_Vᵀ − S_r) V_rᵀ,

where ``R_U, R_V ∈ R^{r×r}`` are orthogonal by the Cayley transform

    R = (I − K)(I + K)^{-1},   K = X − Xᵀ  (skew-symmetric, so RᵀR = I, det R = 1),

of a trainable ``X``. Only the ``r(r−1)/2`` free entries of ``X`` (its strict upper triangle) are
trained, as a vector; ``X = 0`` at init gives ``R = I`` and ``W' = W`` at step 0. The correction is
applied to the activations with r-wide products only (plus one ``r×r`` solve per forward):

    Δ(x) = ((x V_r) M) U_rᵀ,   M = R_V S_r R_Uᵀ − S_r  (r×r),     (= x (W' − W)ᵀ).

Budget: ``2 · r(r−1)/2 = r(r−1)`` trainable parameters per matrix, so ``r`` is the largest rank
(at least 2) whose total ``Σ r(r−1)`` fits ``budget`` % of the backbone, capped per matrix at the
stored top-k and ``min(d_in, d_out)``. When the cap bites (rotations are cheap: small budgets
already ask for more than top-k), the method trains fewer parameters than the budget and
``capacity_limited`` is recorded. The head is trained in full on top. ``ranks.parquet``:
rank = r, score = ``‖W' − W‖_F = ‖M‖_F``.

Options (``methods.spectral_r``): none.
"""
from __future__ import annotations

import torch
from torch import nn

from . import register
from .spectral_common import SpectralLinear, SpectralMethod, largest_fitting


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
    """``y = base(x) + ((x V) M) Uᵀ`` with ``M = R_V S R_Uᵀ − S`` and Cayley rotations ``R_U, R_V``.

    Parameters: ``X_U``, ``X_V``, each ``(r(r−1)/2,)``, zero-initialised (``R = I``).
    """

    def __init__(self, base: nn.Linear, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, r: int):
        super().__init__(base, U, S, Vh, r)
        n = r * (r - 1) // 2
        self.X_U = nn.Parameter(torch.zeros(n, dtype=base.weight.dtype))
        self.X_V = nn.Parameter(torch.zeros(n, dtype=base.weight.dtype))
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
        """``M = R_V diag(S) R_Uᵀ − diag(S)`` ``(r, r)``, so that ``W' − W = U Mᵀ Vᵀ``."""
        R_U, R_V = self.rotations()
        with torch.autocast(self.S.device.type, enabled=False):
            S = self.S.float()
            return ((R_V * S) @ R_U.T - torch.diag(S)).to(self.S.dtype)

    def lowrank(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``Δ(x) = ((x V) M) Uᵀ``: returns ``z = (x V) M (..., r)`` and ``B = U (d_out, r)``."""
        return (x @ self.V) @ self.core(), self.U

    def delta_weight(self) -> torch.Tensor:
        """``W' − W = (U R_U) diag(S) (V R_V)ᵀ − U diag(S) Vᵀ``, ``(d_out, d_in)``."""
        return self.U @ self.core().T @ self.V.T


@register
class SpectralRotational(SpectralMethod):
    """Spectral Adapter^R: orthogonal (Cayley) rotation of the top-r singular vectors."""

    name = "spectral_r"

    def plan_ranks(self, top_k: list[int]) -> dict:
        """Largest uniform r ≥ 2 with ``n · r(r−1) ≤ budget_params``, capped per matrix."""
        targets = self.ctx.targets
        n = len(targets)
        budget_rank = largest_fitting(lambda r: n * r * (r - 1), self.ctx.budget_params, lo=2)
        ranks = [max(1, min(budget_rank, k, t.d_in, t.d_out)) for k, t in zip(top_k, targets)]
        params = [r * (r - 1) for r in ranks]
        return {"ranks": ranks, "budget_rank": budget_rank, "params": params}

    def make_wrapper(self, base, U, S, Vh, r) -> SpectralLinear:
        return RotationalSpectralLinear(base, U, S, Vh, r)

    def module_score(self, mod: RotationalSpectralLinear) -> float:
        with torch.no_grad():
            return float(torch.linalg.matrix_norm(mod.core().float()))
