"""Phased LoRA: LoRA whose trainable module set switches by training phase (peftbench seed 003).

The adapter is plain LoRA (Hu et al. 2021, arXiv:2106.09685, Eq. 3: ``h = W0 x + (α/r) B A x``, peft
``LoraConfig``) on every attention q/k/v/output and both feed-forward matrices, but during phase
``p`` only the LoRA factors of the modules in the phase's active set ``M_p`` are updated; the
others keep contributing their current ``(α/r) B A x`` to the forward pass::

    θ_m ← AdamW(θ_m)  if m ∈ M_p,   θ_m unchanged (no update, no weight decay, no moment update) otherwise.

Phases follow ``strategy``, phase sets separated by ``->``:

- ``both->mlp->attn`` (default): all modules, then feed-forward only, then attention only;
- ``attn->mlp->both``, ``both->mlp->both``;
- ``early->late``: the lower half of the encoder layers (layer < L // 2), then the upper half.

Set names: ``both`` (all targets), ``attn`` (:data:`~peftbench.vocab.ATTENTION_KINDS`), ``mlp``
(:data:`~peftbench.vocab.MLP_KINDS`), ``early`` / ``late`` (layer < / ≥ L // 2); any ``->`` chain of
them whose sets together cover every target is accepted (a factor that is never trained would
count against the budget for nothing).

Phase boundaries, one fewer than the phases, either as fractions of training (``bounds``, strictly
increasing in (0, 1); default ``[1/3, 2/3]`` for 3 phases, ``[0.5]`` for 2): boundary ``i`` is the
optimizer step ``s_i = round(bounds[i] · total_steps)``; or as absolute optimizer steps
(``bound_steps``, strictly increasing integers ≥ 1, the last below the run's total steps; checked
when the run is built, since the step count depends on the data). The two are mutually
exclusive. The step with 0-based index ``s`` (``state.step`` before it is taken) is in phase
``#{i : s ≥ s_i}``.

How inactive parameters are frozen (so their work is really skipped): at the start of each phase
(``on_step_start`` of its first step) the LoRA factors of inactive modules get
``requires_grad = False`` and those of active ones ``True``. Autograd then builds no graph for the
frozen factors: their weight-gradient products are never computed and their ``.grad`` stays
``None``; the backward pass also stops below the lowest layer that still holds a trainable
parameter (``early->late``'s late phase never back-propagates through the lower half). Activation
gradients still flow through every layer above it, so in the ``mlp``/``attn`` phases the saving is
the frozen factors' weight-gradient products and their optimizer update (small next to a layer's
cost at low rank); the timing of ``train_s`` shows what it is worth. Every factor stays in AdamW
(:meth:`parameter_groups`), so its moments persist across the frozen phases: torch's AdamW (torch
2.13: ``Adam._init_group``, which AdamW inherits with decoupled decay) only steps parameters whose
``.grad`` is not None, so a frozen factor gets no update, no decoupled weight decay and no
moment or step-count change; when it becomes active again it resumes from its own moments and
step count. Gradient clipping only sees the active gradients. The task head always trains.

Budget: the same budget → rank rule as LoRA (:func:`peftbench.budget.uniform_rank` over all targets):
every factor is allocated and trained in some phase, so they all count, in every phase
(:meth:`param_counts` counts frozen factors; ``adapter.safetensors`` holds them all).

Checkpoints: the loop saves the trainable parameters only, so :meth:`checkpoint_state` carries the
factors frozen at that moment and the phase; resume restores both.

torch.compile: ``compilable``. Flipping ``requires_grad`` changes the guards of the captured graph,
so dynamo compiles one graph per (distinct phase set, batch shape) and reuses it when a set comes
back; :meth:`build` raises ``torch._dynamo.config.recompile_limit`` to
:data:`~peftbench.methods.base.RECOMPILES_PER_SET` × (distinct sets) so those graphs fit (with the default limit of 8,
three sets × four length buckets would silently fall back to eager in the last phase). The loop
times every step during which Dynamo compiled a graph as compilation, the recompiles at the later
phase starts included.

Reports: ``state.log["phase"]`` (phase index of each step, a column of ``curve.parquet``);
``summary()``: ``rank``, ``lora_scale``, ``capacity_limited``, ``phase_strategy``, ``phase_bounds``
(fractions) and ``phase_boundary_steps`` (JSON), ``phase_schedule`` (JSON list of {phase, modules,
start, end}), ``phase_steps`` (JSON list of steps actually run per phase); ``ranks.parquet``:
``rank`` per module and ``active_steps`` (steps in which the module was trainable).
``log_gradnorms`` is on by default: ``gradnorms.parquet`` holds per-(group, layer), per-group and
total norms every ``log_every`` steps (a frozen group's norm is exactly 0), and ``metrics.parquet``
their mean/max per group and mean per group and phase (:attr:`phase_boundaries`,
:func:`peftbench.outputs.gradnorm_columns`).

Options (``method_options.phased``): :class:`PhasedOptions`.
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from . import register
from .base import LoopState, fit_recompile_limit, ranks_frame
from .lora import LoRA, LoRAOptions
from .options import OptionsError, option
from ..vocab import ATTENTION_KINDS, MLP_KINDS

log = logging.getLogger(__name__)

PHASE_SETS = ("both", "attn", "mlp", "early", "late")
STRATEGIES = ("both->mlp->attn", "attn->mlp->both", "both->mlp->both", "early->late")

#: The four (block, layer half) cells every target falls in, and the cells each phase set covers.
_CELLS = {("attn", "early"), ("attn", "late"), ("mlp", "early"), ("mlp", "late")}
_SET_CELLS = {"both": _CELLS, "attn": {c for c in _CELLS if c[0] == "attn"},
              "mlp": {c for c in _CELLS if c[0] == "mlp"}, "early": {c for c in _CELLS if c[1] == "early"},
              "late": {c for c in _CELLS if c[1] == "late"}}


def parse_strategy(strategy: str) -> list[str]:
    """The phase set names of ``strategy`` (``"both->mlp->attn"`` → ``["both", "mlp", "attn"]``).

    Raises:
        ValueError: fewer than 2 phases or an unknown set name.
    """
    phases = [p.strip() for p in str(strategy).split("->")]
    bad = [p for p in phases if p not in PHASE_SETS]
    if len(phases) < 2 or bad:
        raise ValueError(f"phased: bad strategy {strategy!r}; {_STRATEGY_RULE}")
    return phases


_STRATEGY_RULE = f"use at least two phase sets of {PHASE_SETS} joined by '->', e.g. one of {STRATEGIES}"


def uncovered(phases: list[str]) -> list[str]:
    """Target groups (``"attn/early"`` …) that no phase of ``phases`` trains (empty: all covered)."""
    covered = set().union(*(_SET_CELLS[p] for p in phases))
    return [f"{b}/{h}" for b, h in sorted(_CELLS - covered)]


def _fractions_ok(n_phases: int, bounds: list[float]) -> bool:
    b = [float(x) for x in bounds]
    return len(b) == n_phases - 1 and all(0 < x < 1 for x in b) and all(x < y for x, y in zip(b, b[1:]))


def _steps_ok(n_phases: int, steps: list[int]) -> bool:
    return len(steps) == n_phases - 1 and all(x >= 1 for x in steps) and all(x < y for x, y in zip(steps, steps[1:]))


def phase_bounds(n_phases: int, bounds: list[float] | None) -> list[float]:
    """Phase boundaries as fractions: ``bounds`` validated, or ``i / n_phases`` (i = 1 … n−1).

    Raises:
        ValueError: wrong count, not strictly increasing, or outside (0, 1).
    """
    if bounds is None:
        return [i / n_phases for i in range(1, n_phases)]
    if not _fractions_ok(n_phases, bounds):
        raise ValueError(f"phased: bounds {bounds} must be {n_phases - 1} strictly increasing fractions in (0, 1) "
                         f"for {n_phases} phases")
    return [float(x) for x in bounds]


def check_bound_steps(n_phases: int, bound_steps: list[int], total_steps: int | None = None) -> list[int]:
    """Absolute phase boundaries (optimizer steps) validated.

    Args:
        n_phases: phases of the strategy.
        bound_steps: the step at which each phase after the first starts.
        total_steps: the run's optimizer steps, when known (the last boundary must be below it).

    Raises:
        ValueError: wrong count, not strictly increasing integers ≥ 1, or a boundary ≥ ``total_steps``
            (the message names ``method_options.phased.bound_steps``, the run's steps and the fix).
    """
    s = [int(x) for x in bound_steps]
    if not _steps_ok(n_phases, s):
        raise ValueError(f"phased: bound_steps {bound_steps} must be {n_phases - 1} strictly increasing optimizer "
                         f"steps ≥ 1 for {n_phases} phases")
    if total_steps is not None and s[-1] >= total_steps:
        raise ValueError(f"method_options.phased.bound_steps: {bound_steps} — the last boundary must be below the "
                         f"run's {total_steps} optimizer steps (epochs × steps per epoch), or its last phase is "
                         f"empty; lower it, or give fractions of training as bounds instead")
    return s


def boundary_steps(bounds: list[float], total_steps: int) -> list[int]:
    """Optimizer step at which each phase after the first starts: ``round(b · total_steps)``."""
    return [int(round(b * total_steps)) for b in bounds]


def phase_at(step: int, boundaries: list[int]) -> int:
    """Phase index of the step with 0-based index ``step``: ``#{i : step ≥ boundaries[i]}``."""
    return sum(step >= s for s in boundaries)


def in_set(set_name: str, kind: str, layer: int, n_layers: int) -> bool:
    """Whether a target of ``kind`` in ``layer`` belongs to phase set ``set_name``.

    Raises:
        ValueError: unknown set name.
    """
    if set_name == "both":
        return True
    if set_name == "attn":
        return kind in ATTENTION_KINDS
    if set_name == "mlp":
        return kind in MLP_KINDS
    if set_name == "early":
        return layer < n_layers // 2
    if set_name == "late":
        return layer >= n_layers // 2
    raise ValueError(f"unknown phase set {set_name!r}")


@dataclass
class PhasedOptions(LoRAOptions):
    """Options of phased LoRA (alpha and dropout as in LoRA)."""

    strategy: str = option("both->mlp->attn", f"phase sets {PHASE_SETS} joined by '->', e.g. one of {STRATEGIES}; "
                                              f"together they must cover every target")
    bounds: list[float] | None = option(None, "phase boundaries as strictly increasing fractions of training in "
                                              "(0, 1), one fewer than the phases; null: equal thirds/halves "
                                              "(unless bound_steps is set)")
    bound_steps: list[int] | None = option(None, "phase boundaries as strictly increasing absolute optimizer steps "
                                                 "≥ 1, one fewer than the phases, the last below the run's total "
                                                 "steps; mutually exclusive with bounds; null: use bounds")

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            phases = parse_strategy(self.strategy)
        except ValueError:
            raise OptionsError(f"strategy: {self.strategy!r} — {_STRATEGY_RULE}") from None
        missing = uncovered(phases)
        self.require("strategy", not missing, f"no phase trains the {', '.join(missing)} targets; add a phase "
                                              f"that covers them (e.g. 'both'), as in {STRATEGIES}")
        n = len(phases)
        self.require("bound_steps", self.bounds is None or self.bound_steps is None,
                     f"mutually exclusive with bounds (now {self.bounds!r}): give the boundaries either as "
                     f"fractions of training (bounds) or as optimizer steps (bound_steps), not both")
        self.require("bounds", self.bounds is None or _fractions_ok(n, self.bounds),
                     f"must be {n - 1} strictly increasing fractions of training in (0, 1) for the {n} phases "
                     f"of {self.strategy!r}")
        self.require("bound_steps", self.bound_steps is None or _steps_ok(n, self.bound_steps),
                     f"must be {n - 1} strictly increasing optimizer steps ≥ 1 for the {n} phases of "
                     f"{self.strategy!r} (the last below the run's total steps)")


@register
class PhasedLoRA(LoRA):
    """LoRA with phase-wise module switching that skips the frozen modules' gradients (see module docstring).

    Attributes (after construction):
        phases: the phase set names.
        boundaries: optimizer step at which each phase after the first starts.
        active: ``active[p][j]``: target ``j`` (``ctx.targets`` order) is trainable in phase ``p``.
        phase_steps: steps run so far per phase.

    Raises (from ``__init__``):
        OptionsError: bad options; ValueError: ``bound_steps`` beyond the run, or a target no phase trains.
    """

    name = "phased"
    options_cls = PhasedOptions
    log_gradnorms = True
    compilable = True

    def __init__(self, ctx):
        super().__init__(ctx)
        self.phases = parse_strategy(self.options.strategy)
        if self.options.bound_steps is not None:
            self.boundaries = check_bound_steps(len(self.phases), self.options.bound_steps, ctx.total_steps)
            self.bounds = [s / ctx.total_steps for s in self.boundaries]
        else:
            self.bounds = phase_bounds(len(self.phases), self.options.bounds)
            self.boundaries = boundary_steps(self.bounds, ctx.total_steps)
        self.n_layers = max(t.layer for t in ctx.targets) + 1
        self.active = [[in_set(s, t.kind, t.layer, self.n_layers) for t in ctx.targets] for s in self.phases]
        never = [t.name for j, t in enumerate(ctx.targets) if not any(a[j] for a in self.active)]
        if never:
            raise ValueError(f"method_options.phased.strategy: {self.options.strategy!r} never trains {never[:3]} "
                             f"({len(never)} targets) on this {self.n_layers}-layer model; use a strategy whose "
                             f"phases cover every target, e.g. one of {STRATEGIES}")
        self.phase_steps = [0] * len(self.phases)
        self.phase = 0
        self._params: list[list[nn.Parameter]] = []  # LoRA factors (A, B) per target, ctx.targets order
        self._applied: int | None = None  # phase whose requires_grad pattern is in place

    @property
    def phase_boundaries(self) -> list[int]:
        """Optimizer step at which each phase after the first starts (read by the gradient-norm summary)."""
        return list(self.boundaries)

    def build(self, model: nn.Module) -> nn.Module:
        """LoRA on every target, then phase 0's ``requires_grad`` pattern.

        Raises:
            RuntimeError: a target does not map to exactly one peft LoRA layer.
        """
        from peft.tuners.lora import LoraLayer

        model = super().build(model)
        mods = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
        self._params = []
        for t in self.ctx.targets:
            match = [m for n, m in mods.items() if n.endswith(t.name)]
            if len(match) != 1:
                raise RuntimeError(f"phased: expected one LoRA layer for {t.name}, found {len(match)}")
            m = match[0]
            self._params.append([p for d in (m.lora_A, m.lora_B) for p in d.parameters()])
        self._apply_phase(0)
        fit_recompile_limit(self.name, len({tuple(a) for a in self.active}))
        return model

    def _apply_phase(self, phase: int) -> None:
        """Set ``requires_grad`` of every LoRA factor to whether its target is active in ``phase``."""
        for j, ps in enumerate(self._params):
            for p in ps:
                p.requires_grad_(self.active[phase][j])
        self._applied = phase

    @contextlib.contextmanager
    def _all_factors_trainable(self) -> Iterator[None]:
        """Temporarily mark every LoRA factor trainable (for the optimizer, counts and saving)."""
        saved = [[p.requires_grad for p in ps] for ps in self._params]
        try:
            for ps in self._params:
                for p in ps:
                    p.requires_grad_(True)
            yield
        finally:
            for ps, flags in zip(self._params, saved):
                for p, f in zip(ps, flags):
                    p.requires_grad_(f)

    def inactive_params(self, phase: int) -> list[nn.Parameter]:
        """LoRA factors that must not change in ``phase``."""
        return [p for j, ps in enumerate(self._params) if not self.active[phase][j] for p in ps]

    def parameter_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """The base AdamW groups over the trainable parameters **and every LoRA factor**, frozen or
        not, so that the optimizer's parameter set never changes and frozen factors keep their moments."""
        with self._all_factors_trainable():
            return super().parameter_groups(model, weight_decay)

    def param_counts(self, model: nn.Module) -> dict[str, int]:
        """As :meth:`Method.param_counts`, with the frozen LoRA factors counted: every factor trains in
        some phase, so the count is the same in every phase."""
        with self._all_factors_trainable():
            return super().param_counts(model)

    def state_to_save(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every LoRA factor (frozen or not in the last phase) and the head."""
        with self._all_factors_trainable():
            return super().state_to_save(model)

    # -- hooks ----------------------------------------------------------------------------------
    def on_step_start(self, model: nn.Module, state: LoopState) -> None:
        """Switch the ``requires_grad`` pattern at a phase start; log the phase (no host sync)."""
        self.phase = phase_at(state.step, self.boundaries)
        if self.phase != self._applied:
            log.info("phased: step %d starts phase %d (%s)", state.step, self.phase, self.phases[self.phase])
            self._apply_phase(self.phase)
        self.phase_steps[self.phase] += 1
        state.log["phase"] = self.phase

    def checkpoint_state(self, model: nn.Module) -> dict[str, Any]:
        """Steps per phase, the phase in place, and the LoRA factors frozen now (the loop saves only
        trainable parameters), by parameter name."""
        frozen = {id(p) for p in self.inactive_params(self._applied)} if self._applied is not None else set()
        return {"phase_steps": list(self.phase_steps), "phase": self.phase, "applied": self._applied,
                "frozen_factors": {n: p.detach().cpu().clone() for n, p in model.named_parameters() if id(p) in frozen}}

    def restore_checkpoint_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        """Restore :meth:`checkpoint_state`: the frozen factors' values and the phase's ``requires_grad``
        pattern (so the optimizer rebuilt afterwards has the saved parameter layout).

        Raises:
            RuntimeError: a saved factor does not exist in the model or has another shape.
        """
        if not state:
            return
        self.phase_steps = list(state["phase_steps"])
        self.phase = int(state["phase"])
        named = dict(model.named_parameters())
        for n, t in state.get("frozen_factors", {}).items():
            if n not in named or named[n].shape != t.shape:
                raise RuntimeError(f"phased checkpoint: LoRA factor {n} does not fit the model; delete the checkpoint "
                                   f"to start over")
            with torch.no_grad():
                named[n].copy_(t.to(named[n].device))
        applied = state.get("applied")
        self._apply_phase(self.phase if applied is None else int(applied))

    # -- reporting ------------------------------------------------------------------------------
    def schedule(self) -> list[dict[str, Any]]:
        """The phase schedule: ``[{phase, modules, start, end}]`` (steps ``[start, end)``)."""
        starts = [0] + self.boundaries
        ends = self.boundaries + [self.ctx.total_steps]
        return [{"phase": i, "modules": s, "start": a, "end": b}
                for i, (s, a, b) in enumerate(zip(self.phases, starts, ends))]

    def active_steps(self) -> list[int]:
        """Steps each target (ctx.targets order) was trainable so far."""
        return [sum(n for p, n in enumerate(self.phase_steps) if self.active[p][j])
                for j in range(len(self.ctx.targets))]

    def summary(self, model: nn.Module) -> dict:
        """LoRA's columns plus the phase strategy, boundaries, schedule and steps per phase."""
        return {**super().summary(model), "phase_strategy": "->".join(self.phases),
                "phase_bounds": json.dumps(self.bounds), "phase_boundary_steps": json.dumps(self.boundaries),
                "phase_schedule": json.dumps(self.schedule()), "phase_steps": json.dumps(self.phase_steps)}

    def tables(self, model: nn.Module) -> dict:
        """``ranks``: the uniform rank per target and ``active_steps``."""
        return {"ranks": ranks_frame(self.ctx.targets, [self.rank()] * len(self.ctx.targets),
                                     active_steps=self.active_steps())}
