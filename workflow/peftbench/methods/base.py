"""The contract between a fine-tuning method and the one training loop.

A method is one file in :mod:`peftbench.methods` holding one :class:`Method` subclass decorated
with :func:`peftbench.methods.register`. The loop (:mod:`peftbench.train`) calls, per run::

    method = MethodClass(ctx)            # ctx: BuildContext (budget, targets, steps, options …)
    model = method.build(model)          # wrap / freeze the backbone for the budget
    groups = method.parameter_groups(model)
    for each step:
        method.on_step_start(model, state)
        out = model(**batch)                                    # HF loss (CE or MSE)
        loss = out.loss + method.extra_loss(model, out, batch, state)   # if not None
        loss.backward()
        method.after_backward(model, state)                     # read/alter gradients
        clip, optimizer.step(), scheduler.step(); state.step += 1
        method.after_optimizer_step(model, state)               # before zero_grad (AdaLoRA)
        optimizer.zero_grad(set_to_none=True)
    at each evaluation: method.on_eval_start / on_eval_end
    at the end: method.param_counts, method.summary, method.tables, method.state_to_save,
                method.checkpoint_state (method_state.pt: what a reload restores first)

A hook that changes the set or shapes of trainable parameters calls
``state.rebuild_optimizer(transfer)`` (see :class:`LoopState`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import pandas as pd
import torch
from torch import nn

from . import MethodInfo, method_info
from ..budget import Budget, BudgetSize, check_denominator, default_denominator
from ..models import Target, is_head_param
from .options import MethodOptions
from ..vocab import TaskSpec

log = logging.getLogger(__name__)

#: Graphs per distinct trainable-parameter pattern that torch.compile may keep per frame (torch's
#: default ``recompile_limit``, i.e. the headroom plain LoRA gets for its batch shapes).
RECOMPILES_PER_SET = 8


def fit_recompile_limit(method: str, graph_sets: int) -> None:
    """Let torch.compile keep :data:`RECOMPILES_PER_SET` graphs for each of ``graph_sets``
    variants of a method's training graph (a ``requires_grad`` pattern or module set that changes
    during training: Dynamo guards on them and compiles one graph per variant and batch shape).
    Without it, more variants × shapes than torch's ``recompile_limit`` (8) would silently run the
    rest eagerly. Raises ``torch._dynamo.config.recompile_limit`` process-wide, never lowers it."""
    import torch._dynamo

    needed = RECOMPILES_PER_SET * graph_sets
    if torch._dynamo.config.recompile_limit < needed:
        log.info("%s: %d graph variants; torch._dynamo.config.recompile_limit %d -> %d", method, graph_sets,
                 torch._dynamo.config.recompile_limit, needed)
        torch._dynamo.config.recompile_limit = needed


@dataclass
class BuildContext:
    """What a method knows when it wraps the backbone.

    Methods size themselves by :attr:`budget_params` only (a parameter count), never by the
    budget's spelling, so every method of a budget family is matched to the same count.

    Attributes:
        task: the GLUE task spec.
        budget: the run's :class:`~peftbench.budget.Budget` (a percentage such as ``0.5``, or a
            LoRA-rank equivalent such as ``r8``); any spelling :meth:`Budget.parse` accepts is
            turned into one. For reports; methods read :attr:`budget_params`.
        backbone_params: parameters of the pretrained encoder, task head excluded.
        targets: the adaptable weight matrices (attention q/k/v/output, both feed-forward).
        head_modules: module names of the task head, trained by every method.
        total_steps: optimizer steps of the whole run (epochs × steps per epoch).
        steps_per_epoch: optimizer steps per epoch.
        options: the method's typed options (built from ``method_options.<name>``), or the raw
            mapping, which the method turns into its ``options_cls``.
        seed: the run's seed.
        device: where training runs.
        svd_path: ``factors.safetensors`` of the ``svd`` stage, for methods whose table line says
            ``uses_svd``.
        budget_denominator: what a percentage budget is a percentage of (a key of
            :data:`peftbench.budget.DENOMINATORS`); ``None``: the schema's default of
            ``grid.budget_denominator``.
        embedding_params: parameters of the backbone's embedding tables
            (:func:`peftbench.models.embedding_param_count`); needed by the
            ``backbone_without_embeddings`` denominator.

    Raises (from ``__post_init__``):
        peftbench.budget.BudgetError: a budget that is not a percentage in (0, 100), ``100`` or
            ``r<N>``, or an unknown denominator.
    """

    task: TaskSpec
    budget: Budget
    backbone_params: int
    targets: list[Target]
    head_modules: list[str]
    total_steps: int
    steps_per_epoch: int
    options: MethodOptions | dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    svd_path: Path | None = None
    budget_denominator: str | None = None
    embedding_params: int | None = None

    def __post_init__(self) -> None:
        self.budget = Budget.parse(self.budget)
        self.budget_denominator = check_denominator(self.budget_denominator or default_denominator())

    @property
    def budget_size(self) -> BudgetSize:
        """The budget resolved on this model (:meth:`peftbench.budget.Budget.size`)."""
        return self.budget.size(self.targets, self.backbone_params, self.embedding_params,
                                self.budget_denominator)

    @property
    def budget_params(self) -> float:
        """The budget as a parameter count: ``b/100 × denominator`` for a percentage ``b``,
        ``N · Σ_k (d_in,k + d_out,k)`` for ``r<N>`` (LoRA rank N on every target), the backbone for
        the full budget."""
        return self.budget_size.params


@dataclass
class LoopState:
    """The training loop's live state, handed to every hook.

    Attributes:
        step: optimizer steps completed so far (0 before the first step).
        epoch: current epoch, 0-based.
        total_steps, steps_per_epoch: as in :class:`BuildContext`.
        optimizer, scheduler: the live AdamW and its LR schedule.
        log: scalars a hook wants in ``curve.parquet`` (e.g. a penalty): the value set last before
            a logged step is written, then the dict is cleared. Values may be floats or 0-d tensors
            still on the device (``loss.detach()``): the loop reads tensors only at logged steps,
            so a hook that logs every step forces no host sync.
        rebuild: set by the loop; call :meth:`rebuild_optimizer`.
    """

    step: int
    epoch: int
    total_steps: int
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    log: dict[str, float] = field(default_factory=dict)
    rebuild: Callable[..., None] | None = None

    def rebuild_optimizer(self, transfer: Callable[[torch.optim.Optimizer, torch.optim.Optimizer], None] | None = None) -> None:
        """Rebuild AdamW over the method's current :meth:`Method.parameter_groups`.

        The LR schedule continues from ``step``. Parameters that are the same tensor objects before
        and after keep their AdamW state automatically; ``transfer(old, new)`` may copy state for
        parameters that were replaced (e.g. resized LoRA factors keep the kept rows' moments).
        """
        assert self.rebuild is not None, "LoopState.rebuild is set by the training loop"
        self.rebuild(transfer)


class Method:
    """Base class of every fine-tuning method (see module docstring for the call order).

    The method's flags that the workflow needs before any model exists (``uses_svd``,
    ``budget_free``, label, order) live in its line of
    :data:`peftbench.methods.METHOD_TABLE` (:meth:`info`), not here.

    Class attributes:
        name: registry key (``lora``); also the ``method`` wildcard and column value.
        options_cls: the method's typed options (a :class:`MethodOptions` dataclass).
        log_gradnorms: default for logging per-group gradient norms (config can turn it on for all).
        identity_at_init: the wrapped model's output equals the pretrained model's before the
            first optimizer step (LoRA's zero-init B, spectral adapters' zero-init deltas …).
        compilable: the training forward/backward may run under ``torch.compile`` (recipe key
            ``compile``); methods that change their modules or read Python-side state inside the
            forward during training leave it False and run eagerly.
        merge_for_eval: the method's adapters are peft LoRA layers whose evaluation forward is
            peft's own, so the dev evaluation runs with them merged into the frozen weights
            (:func:`peftbench.merging.merged_adapters`: the same function, one matmul per matrix,
            the weights restored bit-exactly afterwards).

    Raises (from ``__init__``):
        OptionsError: an unknown option or a bad option value (names ``method_options.<name>.<key>``).
    """

    name: ClassVar[str] = ""
    options_cls: ClassVar[type[MethodOptions]] = MethodOptions
    log_gradnorms: ClassVar[bool] = False
    identity_at_init: ClassVar[bool] = False
    compilable: ClassVar[bool] = False
    merge_for_eval: ClassVar[bool] = False

    def __init__(self, ctx: BuildContext):
        self.ctx = ctx
        opts = ctx.options
        self.options = opts if isinstance(opts, self.options_cls) else \
            self.options_cls.from_dict(opts, where=f"method_options.{self.name}")

    @classmethod
    def info(cls) -> MethodInfo:
        """This method's line of the method table."""
        return method_info(cls.name)

    # -- building -------------------------------------------------------------------------------
    def build(self, model: nn.Module) -> nn.Module:
        """Wrap/freeze ``model`` (a ``*ForSequenceClassification``) for the budget; return it."""
        raise NotImplementedError

    def parameter_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW parameter groups: trainable weights with decay, biases and LayerNorm without."""
        decay, no_decay = [], []
        for n, p in model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "LayerNorm" in n or "layer_norm" in n else decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    # -- hooks (default: nothing) -----------------------------------------------------------------
    def on_step_start(self, model: nn.Module, state: LoopState) -> None:
        """Before the forward pass of a training step."""

    def extra_loss(self, model: nn.Module, outputs: Any, batch: dict[str, torch.Tensor],
                   state: LoopState) -> torch.Tensor | None:
        """A scalar added to the task loss (a regulariser), or ``None``."""
        return None

    def after_backward(self, model: nn.Module, state: LoopState) -> None:
        """After ``loss.backward()``, before clipping and the optimizer step."""

    def after_optimizer_step(self, model: nn.Module, state: LoopState) -> None:
        """After ``optimizer.step()`` (``state.step`` already counts it), before ``zero_grad``."""

    def on_eval_start(self, model: nn.Module) -> None:
        """Before an evaluation pass (the model is already in ``eval()`` mode)."""

    def on_eval_end(self, model: nn.Module) -> None:
        """After an evaluation pass."""

    # -- reporting -------------------------------------------------------------------------------
    def param_counts(self, model: nn.Module) -> dict[str, int]:
        """Trainable parameters split into ``adapter_params`` and ``head_params`` (classifier, pooler)."""
        adapter = head = 0
        for n, p in model.named_parameters():
            if p.requires_grad:
                if is_head_param(n):
                    head += p.numel()
                else:
                    adapter += p.numel()
        return {"adapter_params": adapter, "head_params": head}

    def budget_count(self, model: nn.Module) -> int:
        """Adapter parameters that count against the budget.

        Default: every trainable non-head parameter. AdaLoRA overrides it with the count its
        final (pruned) rank allocation holds, since it allocates ``init_r`` but masks down to
        ``target_r``.
        """
        return self.param_counts(model)["adapter_params"]

    def summary(self, model: nn.Module) -> dict[str, Any]:
        """Extra columns for ``metrics.parquet`` (e.g. ``rank``); keys become column names."""
        return {}

    def tables(self, model: nn.Module) -> dict[str, pd.DataFrame]:
        """Per-module tables; ``{"ranks": df}`` with columns module, layer, kind, rank, score."""
        return {}

    def checkpoint_state(self, model: nn.Module) -> dict[str, Any]:
        """Method state a checkpoint must carry to resume bitwise (EMAs, allocations …).

        Trainable parameters, optimizer and RNG states are saved by the loop; return here only
        what lives in the method (or in modules outside the parameters). Default: nothing.
        The same state is written at the end of every run (``method_state.pt``, plain containers
        and tensors for ``torch.load(weights_only=True)``) and restored by a reload of the finished
        run (:func:`peftbench.checkpoint.load_trained`, the OOD stage) before ``adapter.safetensors``
        is loaded: anything inference depends on beyond :meth:`state_to_save` (resized modules,
        masks) belongs here.
        """
        return {}

    def restore_checkpoint_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        """Restore :meth:`checkpoint_state` into a freshly built model, before its parameters are
        loaded (a method that resized modules must resize them again here); used by resume and by
        the reload of a finished run."""

    def state_to_save(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors written to ``adapter.safetensors``: by default every trainable parameter."""
        return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def ranks_frame(targets: list[Target], ranks: list[float], scores: list[float] | None = None, **extra: list) -> pd.DataFrame:
    """A ``ranks.parquet`` table: one row per target matrix.

    Args:
        targets: the adapted matrices.
        ranks: rank (or active gates) per target, same order.
        scores: importance score per target (NaN where the method has none).
        extra: further per-target columns.
    """
    df = pd.DataFrame({
        "module": [t.name for t in targets],
        "layer": [t.layer for t in targets],
        "kind": [t.kind for t in targets],
        "rank": [float(r) for r in ranks],
        "score": [float("nan")] * len(targets) if scores is None else [float(s) for s in scores],
    })
    for k, v in extra.items():
        df[k] = v
    return df
