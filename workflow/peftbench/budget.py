"""Trainable-parameter budgets: what ``grid.budgets`` means, and the parameter count it buys.

A budget is one :class:`Budget` value, used unchanged by the run key and its path token
(``b0.5``, ``br8``), the rules, the ``train`` CLI (``--budget 0.5`` / ``--budget r8``), the
:class:`~peftbench.methods.base.BuildContext` and the ``budget`` column of every table. It has one
of three kinds (:data:`KINDS`):

* ``pct`` — a percentage ``b`` of a denominator ``N`` (:data:`DENOMINATORS`; config key
  ``grid.budget_denominator``): the budget holds ``b/100 · N`` parameters. Token: the number
  (``"0.5"``).
* ``rank`` — a LoRA-rank equivalent ``r<N>``: the parameter count of LoRA with the uniform rank
  ``N`` on every target matrix, ``N · Σ_k (d_in,k + d_out,k)`` (Hu et al. 2021, arXiv:2106.09685,
  Eq. 3: ``ΔW = B A``, ``B ∈ R^{d_out×r}``, ``A ∈ R^{r×d_in}``, i.e. ``r (d_in + d_out)`` per
  matrix). ``r8`` is the published anchor on GLUE (LoRA r = 8, AdaLoRA 12 → 8,
  arXiv:2303.10512 Table 1: 1.33M parameters on DeBERTa-v3-base). Token: ``"r8"``.
* ``full`` — budget-free methods (full fine-tuning): all backbone parameters. Token: ``"100"``
  (:data:`peftbench.methods.FULL_BUDGET`).

Every method sees only the resulting parameter count (``ctx.budget_params``) and turns it into its
own rank/width, so every method of a budget family is matched to the same count. The task head is
trained on top and reported apart.

A LoRA module of rank r costs ``r (d_in + d_out)`` parameters, so the uniform rank that spends
``P`` parameters is :func:`rank_for_params`: ``r = round(P / Σ_k (d_in,k + d_out,k))``, at least 1
and at most ``min(d_in, d_out)``.

Torch-free (the Snakefile and the analysis stage use it).
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from .methods import FULL_BUDGET

if TYPE_CHECKING:  # pragma: no cover
    from .models import Target

#: Budget kinds: a percentage of a denominator, a LoRA-rank equivalent, budget-free (full).
KINDS: tuple[str, ...] = ("pct", "rank", "full")

#: What a ``pct`` budget is a percentage of (``grid.budget_denominator``; the schema holds the
#: default). The embedding tables are every ``nn.Embedding`` of the backbone
#: (:func:`peftbench.models.embedding_param_count`: token, position and token-type embeddings,
#: DeBERTa's relative-position table).
DENOMINATORS: dict[str, str] = {
    "backbone": "every backbone parameter (task head excluded), embeddings included",
    "backbone_without_embeddings": "backbone parameters minus the embedding tables",
}

#: The denominator every ``rank`` and ``full`` budget's ``budget_pct`` is quoted against (they
#: need none to define their count).
WHOLE_BACKBONE = "backbone"

#: A run matches its budget when the adapter parameters it counts against the budget are within
#: ``±BUDGET_TOLERANCE`` of ``budget_params`` (the benchmark's fair-comparison rule).
BUDGET_TOLERANCE = 0.10

#: Regular expression of a budget token (also the Snakemake ``{budget}`` wildcard constraint).
TOKEN_REGEX = r"[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?|r[1-9][0-9]*"
_RANK_RE = re.compile(r"r([1-9][0-9]*)")


class BudgetError(ValueError):
    """A budget that is neither a percentage in (0, 100), ``100`` (full) nor ``r<N>``."""


def _pct_token(v: float) -> str:
    """The shortest form of ``v`` that reads back as exactly ``v`` (``0.5`` → ``"0.5"``, ``1.0`` → ``"1"``)."""
    short = f"{v:g}"
    return short if float(short) == v else repr(v)


@functools.total_ordering
@dataclass(frozen=True)
class Budget:
    """One trainable-parameter budget (see the module docstring).

    Build one with :meth:`parse` (any spelling: ``0.5``, ``"0.5"``, ``"r8"``, ``100``),
    :meth:`percent`, :meth:`rank` or :meth:`full`; the constructor does not check its fields.

    Attributes:
        token: the canonical spelling, as in paths (``b{token}``), on the command line and in the
            ``budget`` column: ``"0.5"``, ``"r8"``, ``"100"``.
        kind: one of :data:`KINDS`.
        value: the percentage (``pct``), the LoRA rank N (``rank``) or 100 (``full``).

    Ordering (:meth:`sort_key`): percentages by value, then ranks by value, then full.
    """

    token: str
    kind: str
    value: float

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def percent(cls, pct: float) -> "Budget":
        """``pct`` % of the denominator, 0 < pct < 100.

        Raises:
            BudgetError: ``pct`` outside (0, 100) or not finite.
        """
        v = float(pct)
        if not (math.isfinite(v) and 0 < v < 100):
            raise BudgetError(f"budget {pct!r}: a percentage budget must be in (0, 100) (100 is the full "
                              f"budget of budget-free methods); or write a LoRA-rank equivalent r<N>, e.g. r8")
        return cls(_pct_token(v), "pct", v)

    @classmethod
    def rank(cls, n: int) -> "Budget":
        """The parameter count of uniform LoRA rank ``n`` ≥ 1 on the target matrices.

        Raises:
            BudgetError: ``n`` is not a positive integer.
        """
        if isinstance(n, bool) or int(n) != n or int(n) < 1:
            raise BudgetError(f"budget r{n}: the LoRA rank of a rank budget must be an integer ≥ 1")
        return cls(f"r{int(n)}", "rank", int(n))

    @classmethod
    def full(cls) -> "Budget":
        """The budget of budget-free methods: the whole backbone (token ``"100"``)."""
        return cls(_pct_token(FULL_BUDGET), "full", float(FULL_BUDGET))

    @classmethod
    def parse(cls, spec: "Budget | float | int | str") -> "Budget":
        """A budget from any of its spellings: a number or numeric string (a percentage; exactly
        100 is :meth:`full`) or ``r<N>`` (a LoRA-rank equivalent).

        Raises:
            BudgetError: anything else, with what is allowed.
        """
        if isinstance(spec, Budget):
            return spec
        if isinstance(spec, str):
            s = spec.strip()
            m = _RANK_RE.fullmatch(s)
            if m:
                return cls.rank(int(m.group(1)))
            try:
                v = float(s)
            except ValueError:
                raise BudgetError(f"budget {spec!r} is neither a percentage in (0, 100) nor a LoRA-rank "
                                  f"equivalent r<N> (N ≥ 1, e.g. r8)") from None
        elif isinstance(spec, (int, float)) and not isinstance(spec, bool):
            v = float(spec)
        else:
            raise BudgetError(f"budget {spec!r} ({type(spec).__name__}) is neither a percentage in (0, 100) "
                              f"nor a LoRA-rank equivalent r<N> (e.g. r8)")
        return cls.full() if v == FULL_BUDGET else cls.percent(v)

    # -- properties -------------------------------------------------------------------------------
    @property
    def is_full(self) -> bool:
        return self.kind == "full"

    @property
    def is_pct(self) -> bool:
        return self.kind == "pct"

    @property
    def is_rank(self) -> bool:
        return self.kind == "rank"

    @property
    def label(self) -> str:
        """Display label: ``"0.5%"``, ``"r8 (LoRA rank 8)"``, ``"full (100%)"``."""
        if self.is_pct:
            return f"{self.token}%"
        if self.is_rank:
            return f"{self.token} (LoRA rank {int(self.value)})"
        return "full (100%)"

    def sort_key(self) -> tuple[int, float]:
        """``(kind position in KINDS, value)``."""
        return (KINDS.index(self.kind), float(self.value))

    def __lt__(self, other: "Budget") -> bool:
        if not isinstance(other, Budget):
            return NotImplemented
        return self.sort_key() < other.sort_key()

    def __str__(self) -> str:
        return self.token

    # -- the parameter count ----------------------------------------------------------------------
    def size(self, targets: Sequence["Target"], backbone_params: int, embedding_params: int | None = None,
             denominator: str = WHOLE_BACKBONE) -> "BudgetSize":
        """The parameter count this budget buys on a model.

        Args:
            targets: the adapted matrices (``(d_out, d_in)`` each).
            backbone_params: backbone parameters, task head excluded.
            embedding_params: parameters of the backbone's embedding tables (needed for
                ``backbone_without_embeddings``).
            denominator: a key of :data:`DENOMINATORS`; used by ``pct`` budgets only (``rank`` and
                ``full`` budgets quote ``budget_pct`` against the whole backbone).

        Returns:
            ``pct``: ``value/100 × denominator``; ``rank``: ``value × Σ_k (d_in,k + d_out,k)``;
            ``full``: ``backbone_params``.

        Raises:
            BudgetError: unknown denominator, ``backbone_without_embeddings`` without
                ``embedding_params``, or a rank budget with no targets.
        """
        check_denominator(denominator)
        if self.is_pct:
            den = denominator
        else:
            den = WHOLE_BACKBONE
        if den == "backbone_without_embeddings":
            if embedding_params is None:
                raise BudgetError("budget denominator backbone_without_embeddings needs the embedding "
                                  "parameter count (BuildContext.embedding_params)")
            den_params = int(backbone_params) - int(embedding_params)
        else:
            den_params = int(backbone_params)
        if self.is_pct:
            params = self.value / 100.0 * den_params
        elif self.is_rank:
            if not targets:
                raise BudgetError(f"budget {self.token}: no target matrices to count LoRA rank {int(self.value)} on")
            params = float(int(self.value) * per_rank_cost(targets))
        else:
            params = float(backbone_params)
        return BudgetSize(params=params, denominator=den, denominator_params=den_params)


@dataclass(frozen=True)
class BudgetSize:
    """A budget resolved on one model.

    Attributes:
        params: the budget as a parameter count (what methods see as ``ctx.budget_params``).
        denominator: the key of :data:`DENOMINATORS` that ``pct`` is a percentage of.
        denominator_params: that denominator's parameter count.
    """

    params: float
    denominator: str
    denominator_params: int

    @property
    def pct(self) -> float:
        """``params`` in % of ``denominator_params``."""
        return 100.0 * self.params / self.denominator_params if self.denominator_params else math.nan

    def columns(self) -> dict[str, Any]:
        """``budget_params``, ``budget_denominator``, ``denominator_params``, ``budget_pct`` for
        ``metrics.parquet``."""
        return {"budget_params": float(self.params), "budget_denominator": self.denominator,
                "denominator_params": int(self.denominator_params), "budget_pct": float(self.pct)}


def check_denominator(name: str) -> str:
    """``name`` if it is a key of :data:`DENOMINATORS`.

    Raises:
        BudgetError: otherwise, listing the allowed names.
    """
    if name not in DENOMINATORS:
        raise BudgetError(f"budget denominator {name!r} is not one of {', '.join(DENOMINATORS)}")
    return name


def default_denominator() -> str:
    """The schema's default of ``grid.budget_denominator`` (the only place it is stated)."""
    from .config import schema_defaults

    return schema_defaults("grid")["budget_denominator"]


def budget_token(spec: "Budget | float | int | str") -> str:
    """The canonical token of any spelling of a budget (``0.50`` → ``"0.5"``, ``100.0`` → ``"100"``).

    Raises:
        BudgetError: see :meth:`Budget.parse`.
    """
    return Budget.parse(spec).token


def within_budget(used: float, budget_params: float, tolerance: float = BUDGET_TOLERANCE) -> bool:
    """``|used − budget_params| ≤ tolerance · budget_params``."""
    return abs(float(used) - float(budget_params)) <= tolerance * float(budget_params)


def per_rank_cost(targets: Sequence["Target"]) -> int:
    """Parameters one unit of rank costs across all targets: ``Σ_k (d_in,k + d_out,k)``."""
    return sum(t.d_in + t.d_out for t in targets)


def rank_for_params(budget_params: float, targets: Sequence["Target"]) -> int:
    """The uniform LoRA rank that best spends ``budget_params`` parameters:
    ``round(budget_params / Σ_k (d_in,k + d_out,k))`` clamped to ``[1, min_k min(d_in,k, d_out,k)]``
    (LoRA, arXiv:2106.09685, Eq. 3: ``r (d_in + d_out)`` parameters per matrix).

    A rank budget ``r<N>`` gives exactly ``N`` (below the cap).

    Raises:
        ValueError: ``budget_params`` ≤ 0 or not finite, or no targets.
    """
    if not targets:
        raise ValueError("no target matrices to adapt")
    if not (math.isfinite(budget_params) and budget_params > 0):
        raise ValueError(f"budget_params must be a positive parameter count, got {budget_params}")
    r = round(budget_params / per_rank_cost(targets))
    return int(min(max(r, 1), min(min(t.d_in, t.d_out) for t in targets)))


def uniform_rank(budget: float, backbone_params: int, targets: Sequence["Target"]) -> int:
    """The uniform LoRA rank that best spends ``budget`` % of ``backbone_params``
    (:func:`rank_for_params` of ``budget/100 × backbone_params``).

    Raises:
        ValueError: budget not in (0, 100) or no targets.
    """
    if not 0 < budget < 100:
        raise ValueError(f"budget must be a percentage in (0, 100), got {budget}")
    return rank_for_params(budget / 100.0 * backbone_params, targets)


def lora_params(targets: Sequence["Target"], rank: int | list[int]) -> int:
    """Adapter parameters of LoRA with ``rank`` (one for all, or one per target)."""
    ranks = [rank] * len(targets) if isinstance(rank, int) else rank
    return sum(r * (t.d_in + t.d_out) for r, t in zip(ranks, targets))
