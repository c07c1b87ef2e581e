"""Phased LoRA: LoRA whose trainable module set switches by training phase (peftbench seed 003).

The adapter is plain LoRA (Hu et al. 2021, Eq. 3: ``h = W0 x + (α/r) B A x``, peft ``LoraConfig``) on
every attention q/k/v/output and both feed-forward matrices, but during phase ``p`` only the LoRA
factors of the modules in the phase's active set ``M_p`` are updated::

    θ_m ← AdamW(θ_m)  if m ∈ M_p,   θ_m unchanged (no update, no weight decay, no moment update) otherwise.

Phases follow ``strategy``, phase sets separated by ``->``:

- ``both->mlp->attn`` (default): all modules, then feed-forward only, then attention only;
- ``attn->mlp->both``, ``both->mlp->both``;
- ``early->late``: the lower half of the encoder layers (layer < L // 2), then the upper half.

Set names: ``both`` (all targets), ``attn`` (query/key/value/attention_output), ``mlp``
(intermediate/output), ``early`` / ``late`` (layer < / ≥ L // 2); any ``->`` chain of them is accepted.
``bounds`` are the phase boundaries as fractions of training, increasing in (0, 1), one fewer than the
phases (default ``[1/3, 2/3]`` for 3 phases, ``[0.5]`` for 2). Boundary ``i`` is the optimizer step
``s_i = round(bounds[i] · total_steps)``; the step with 0-based index ``s`` (``state.step`` before it
is taken) is in phase ``#{i : s ≥ s_i}``.

How inactive parameters are frozen: after ``loss.backward()`` (``after_backward``) the gradients of
inactive LoRA factors are replaced by zeros, so the loop's gradient-norm logging (which runs right
after ``after_backward``) shows exact-zero norms for inactive groups (the loop's
``gradient_norms`` only lists groups holding a gradient); a step pre-hook on the optimizer then sets
those gradients to ``None`` immediately before ``optimizer.step()``, so AdamW skips them entirely
(no weight decay, no moment or step-count update). Gradient clipping sees zeros, which leave the
global norm unchanged. The task head (classifier, pooler) always trains.

Budget: the same budget → rank rule as LoRA (:func:`peftbench.budget.uniform_rank` over all targets):
the parameters of every module are allocated and trained in some phase, so they all count.

Reports: ``state.log["phase"]`` (phase index of each step, a column of ``curve.parquet``);
``summary()``: ``rank``, ``phase_strategy``, ``phase_bounds`` and ``phase_boundary_steps`` (JSON),
``phase_schedule`` (JSON list of {phase, modules, start, end}), ``phase_steps`` (JSON list of
steps actually run per phase); ``ranks.parquet``: ``rank`` per module and ``active_steps`` (steps
in which the module was trainable). ``log_gradnorms`` is on by default: ``gradnorms.parquet`` holds
per-(group, layer) and per-group norms (attention, mlp, embeddings, head) every ``log_every`` steps.

Options (``method_options.phased``): :class:`PhasedOptions`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import register
from .base import LoopState, ranks_frame
from .lora import LoRA, LoRAOptions
from .options import OptionsError, option
from ..vocab import ATTENTION_KINDS, MLP_KINDS

PHASE_SETS = ("both", "attn", "mlp", "early", "late")
STRATEGIES = ("both->mlp->attn", "attn->mlp->both", "both->mlp->both", "early->late")


def parse_strategy(strategy: str) -> list[str]:
    """The phase set names of ``strategy`` (``"both->mlp->attn"`` → ``["both", "mlp", "attn"]``).

    Raises:
        ValueError: fewer than 2 phases or an unknown set name.
    """
    phases = [p.strip() for p in str(strategy).split("->")]
    bad = [p for p in phases if p not in PHASE_SETS]
    if len(phases) < 2 or bad:
        raise ValueError(f"phased: bad strategy {strategy!r}; use phase sets {PHASE_SETS} joined by '->', "
                         f"e.g. one of {STRATEGIES}")
    return phases


def phase_bounds(n_phases: int, bounds: list[float] | None) -> list[float]:
    """Phase boundaries as fractions: ``bounds`` validated, or ``i / n_phases`` (i = 1 … n−1).

    Raises:
        ValueError: wrong count, not strictly increasing, or outside (0, 1).
    """
    if bounds is None:
        return [i / n_phases for i in range(1, n_phases)]
    b = [float(x) for x in bounds]
    if len(b) != n_phases - 1 or any(not 0 < x < 1 for x in b) or any(x >= y for x, y in zip(b, b[1:])):
        raise ValueError(f"phased: bounds {bounds} must be {n_phases - 1} strictly increasing fractions in (0, 1) "
                         f"for {n_phases} phases")
    return b


def boundary_steps(bounds: list[float], total_steps: int) -> list[int]:
    """Optimizer step at which each phase after the first starts: ``round(b · total_steps)``."""
    return [int(round(b * total_steps)) for b in bounds]


def phase_at(step: int, boundaries: list[int]) -> int:
    """Phase index of the step with 0-based index ``step``: ``#{i : step ≥ boundaries[i]}``."""
    return sum(step >= s for s in boundaries)


def in_set(set_name: str, kind: str, layer: int, n_layers: int) -> bool:
    """Whether a target of ``kind`` in ``layer`` belongs to phase set ``set_name``."""
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

    strategy: str = option("both->mlp->attn", f"phase sets {PHASE_SETS} joined by '->', e.g. one of {STRATEGIES}")
    bounds: list[float] | None = option(None, "phase boundaries as strictly increasing fractions of training in "
                                              "(0, 1), one fewer than the phases; null: equal thirds/halves")

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            phase_bounds(len(parse_strategy(self.strategy)), self.bounds)
        except ValueError as exc:
            raise OptionsError(f"{'bounds' if 'bounds' in str(exc) else 'strategy'}: {exc}") from None


@register
class PhasedLoRA(LoRA):
    """LoRA with phase-wise module switching (see module docstring)."""

    name = "phased"
    options_cls = PhasedOptions
    log_gradnorms = True
    compilable = False  # not checked under torch.compile yet: runs eagerly

    def __init__(self, ctx):
        super().__init__(ctx)
        self.phases = parse_strategy(self.options.strategy)
        self.bounds = phase_bounds(len(self.phases), self.options.bounds)
        self.boundaries = boundary_steps(self.bounds, ctx.total_steps)
        self.n_layers = max(t.layer for t in ctx.targets) + 1
        # active[p][j]: target j trainable in phase p
        self.active = [[in_set(s, t.kind, t.layer, self.n_layers) for t in ctx.targets] for s in self.phases]
        self.phase_steps = [0] * len(self.phases)
        self.phase = 0
        self._params: list[list[nn.Parameter]] = []
        self._frozen_now: list[nn.Parameter] = []

    def build(self, model: nn.Module) -> nn.Module:
        from peft.tuners.lora import LoraLayer

        model = super().build(model)
        mods = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
        self._params = []
        for t in self.ctx.targets:
            match = [m for n, m in mods.items() if n.endswith(t.name)]
            if len(match) != 1:
                raise RuntimeError(f"phased: expected one LoRA layer for {t.name}, found {len(match)}")
            m = match[0]
            ps = [p for d in (m.lora_A, m.lora_B) for p in d.parameters()]
            self._params.append(ps)
        return model

    def inactive_params(self, phase: int) -> list[nn.Parameter]:
        """LoRA factors that must not change in ``phase``."""
        return [p for j, ps in enumerate(self._params) if not self.active[phase][j] for p in ps]

    # -- hooks ----------------------------------------------------------------------------------
    def on_step_start(self, model: nn.Module, state: LoopState) -> None:
        self.phase = phase_at(state.step, self.boundaries)
        self.phase_steps[self.phase] += 1
        state.log["phase"] = self.phase

    def after_backward(self, model: nn.Module, state: LoopState) -> None:
        self._frozen_now = self.inactive_params(self.phase)
        for p in self._frozen_now:
            if p.grad is not None:
                p.grad = torch.zeros_like(p.grad)  # logged as an exact-zero norm; dropped before the step
            else:
                p.grad = torch.zeros_like(p)
        opt = state.optimizer
        if opt is not None and not getattr(opt, "_phased_hook", False):  # once per (rebuilt) optimizer
            opt.register_step_pre_hook(self._drop_inactive_grads)
            opt._phased_hook = True

    def _drop_inactive_grads(self, optimizer, args, kwargs) -> None:
        # AdamW skips parameters whose .grad is None: no decay, no moment/step update.
        for p in self._frozen_now:
            p.grad = None
        self._frozen_now = []

    def checkpoint_state(self, model: nn.Module) -> dict[str, Any]:
        return {"phase_steps": list(self.phase_steps), "phase": self.phase}

    def restore_checkpoint_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        self.phase_steps = list(state["phase_steps"])
        self.phase = int(state["phase"])

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
        return {"rank": self.rank(), "phase_strategy": "->".join(self.phases),
                "phase_bounds": json.dumps(self.bounds), "phase_boundary_steps": json.dumps(self.boundaries),
                "phase_schedule": json.dumps(self.schedule()), "phase_steps": json.dumps(self.phase_steps)}

    def tables(self, model: nn.Module) -> dict:
        return {"ranks": ranks_frame(self.ctx.targets, [self.rank()] * len(self.ctx.targets),
                                     active_steps=self.active_steps())}
