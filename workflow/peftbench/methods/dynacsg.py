"""DynaCSG: dynamic conditional spectral gates (peftbench seed 002).

Every adapted matrix ``W ∈ R^{d_out×d_in}`` (attention q/k/v/output, both feed-forward matrices)
keeps its frozen weight and its top-r singular triplets from the ``svd`` stage,
``W ≈ U_r diag(S_r) V_rᵀ`` (``U_r = U[:, :r]``, ``V_rᵀ = Vh[:r]``). Per example ``b`` a binary gate
vector ``g_b ∈ {0, 1}^r`` rescales the gated singular values,

    Ŝ_b = S_r ⊙ (1 + α g_b),     W_b = W + α U_r diag(S_r ⊙ g_b) V_rᵀ,

applied as a per-example low-rank correction (no per-example weight matrix is ever built)::

    y_b = x_b Wᵀ + bias + α · ((x_b V_r) ⊙ (S_r ⊙ g_b)) U_rᵀ.

The gates come from **one hypernetwork shared by all adapted layers**: a 2-layer MLP on the
context vector ``c_{b,l}`` = the [CLS] hidden state *entering* encoder layer ``l`` (read with a
forward pre-hook on the layer), with a learned per-layer embedding ``e_l ∈ R^H`` added to the hidden
pre-activation so that layers can differ::

    h = GELU(W1 c_{b,l} + b1 + e_l),    logits_{b,l} = W2 h + b2 ∈ R^{K×r}

(``K`` target matrices per layer, ``r`` gates per matrix; ``W1 ∈ R^{H×d}``, ``W2 ∈ R^{Kr×H}``).

Training uses a Gumbel-sigmoid gate (the binary Concrete of Maddison et al., arXiv:1611.00712;
Gumbel-softmax of Jang et al., arXiv:1611.01144) with a straight-through estimator:
``u ~ U(0,1)``, ``y = σ((logit + log u − log(1−u)) / τ)``, forward value ``1[y > 0.5]``, backward
gradient of ``y``; a gate is then open with probability ``σ(logit)``. The sparsity penalty is the
seed's ``λ · E[#gates on]``, the expected L0 norm of Louizos et al. (arXiv:1712.01312:
``Σ_j P(gate j open)``, here with ``P = σ(logit)``): the expected number of open gates of one
example summed over all adapted matrices, ``Σ_{l,k,i} σ(logit_{b,l,k,i})``, averaged over the batch. At inference (``model.eval()``) the gates are the deterministic mask
``g = 1[logit > 0]``.

Initialisation — gates off, identity at init: the output bias of the hypernetwork is the
threshold offset ``b2 = init_logit`` (default −3), so every gate starts with open probability
``σ(−3 + W2 h) ≈ 0.05`` in training and closed (``logit < 0``) at inference: the model is the
pretrained one at step 0 (``identity_at_init``), and a gate opens only when the task loss pays for
it. ``W2`` keeps PyTorch's default init (``U(±1/√H)``): its spread at init is small against the
offset (max ``|W2 h|`` = 0.32 over 200 SST-2 dev sentences with all-MiniLM-L6-v2 at budget 0.6 %,
< 1 on the tiny test BERT, which the tests assert), so no logit comes near 0, while ``W1`` gets
gradients from the first step (a zero ``W2`` would block them). With Adam a logit moves by about
the learning rate per step, so a gate needs on the order of ``|init_logit| / lr`` steps to open:
short runs keep every gate closed. Earlier versions used ``b2 = 0`` (half the gates open at init)
with ``λ = 1e-3`` and r from the budget (up to the 128 singular values the DeBERTa config
stores): the penalty started at ``1e-3 · 72 · 128 · ½ ≈ 4.6`` nats on DeBERTa-v3-base, six times
the task loss (~0.7), and the gates collapsed before the task could use them.

Penalty scale (seed: ``λ = 1e-4``, ``r_b = 8``): on DeBERTa-v3-base (72 matrices, 576 gates) the
initial penalty is ``1e-4 · 576 · σ(−3) ≈ 2.7e-3`` nats, < 0.1 × a typical task loss; every gate
open costs 0.058 nats. ``tests/test_dynacsg_phased.py`` asserts the bound.

Context: ``detach_context=True`` (default) stops gradients at the context vector. The hypernetwork
then learns only through the gates it emits (its input is treated as a fixed feature, as an
observation), which (a) keeps the backward pass as cheap as a static adapter's — otherwise every
layer's gate logits backpropagate through all lower layers a second time, (b) avoids a feedback path
in which the (biased) straight-through gradient of layer ``l`` is pushed into the gates of layers
``< l`` via their effect on ``c_{b,l}``. ``detach_context=False`` keeps that path.

Budget: the hypernetwork is the trainable adapter (the SVD factors are frozen buffers); its size is
``n(H, r) = H (d + 1 + L + K r) + K r`` (W1, b1, the L layer embeddings, W2, b2). By default
``r = rank = 8`` gated singular values per matrix (the seed's ``r_b``; more than the ``svd`` stage
stored is an error) and only the width is solved for the budget:
``H = round((B − K r) / (d + 1 + L + K r))`` when ``n(hidden, r)`` is off the budget ``B``
(``ctx.budget_params``) by more than 10 % (grown only when ``grow_hidden``; shrunk when the budget
is too small for the default width). ``rank: null`` derives r from the budget as well:
``r = round((B − H (d+1+L)) / (K (H+1)))`` clamped to ``[1, r_max]`` (``r_max`` = singular values
stored for every matrix, ≤ min(d_out, d_in)), then H as above. ``capacity_limited`` and
``outside_budget`` compare ``n`` with ``B`` (:func:`~peftbench.methods.spectral_common.budget_flags`).

Reports: ``curve.parquet`` gets, at every logged training step, ``gate_penalty`` (λ · E[#on]),
``expected_gate_frac`` (E[#on] / gates), ``mean_k`` — ⟨k⟩, the mean number of open gates per
matrix under the inference mask ``1[logit > 0]`` on that step's batch (mean over examples and
matrices) — and ``mean_k_sampled`` (the same for the sampled training gates); all are kept as
device tensors and read by the loop at logged steps only. ``ranks.parquet`` has ``rank`` = mean
number of active gates of that matrix over the dev examples at the final evaluation (plus
``gates`` = r and ``active_frac``); ``summary()`` adds ``mean_active_gates`` (⟨k⟩ per adapted
matrix at the final evaluation, averaged over matrices: the number a static-gate control
``dynacsg_static`` with ``target_k`` matches), ``mean_active_gates_per_layer`` (summed over the K
matrices of an encoder layer, averaged over layers), ``gates_per_matrix``, ``hidden``,
``capacity_limited``, ``outside_budget`` and ``latency_ratio`` — the median wall time of
``model(**batch)`` with gates on over the median with the adapter switched off (the frozen
backbone: the layer hooks return at once, no hypernetwork, no correction), under
``torch.no_grad`` in eval mode, on the first (up to) 2 dev batches of the last evaluation (eval
batch size; evaluation batches the longest examples first, so these are the longest ones), one warm-up pass then 3 timed passes each (interleaved), with CUDA synchronisation
on a GPU.

Options (``method_options.dynacsg``): :class:`DynaCSGOptions`.
"""
from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..budget import BUDGET_TOLERANCE
from ..models import is_head_param
from ..svd import load_factors
from . import register
from .base import LoopState, Method, ranks_frame
from .options import MethodOptions, option
from .spectral_common import budget_flags, explicit_ranks, stored_top_k


@dataclass
class GateOptions(MethodOptions):
    """Gate options shared by DynaCSG and its static-gate control ``dynacsg_static`` (defaults: seed 002)."""

    rank: int | None = option(8, "gated singular values r per matrix (the seed's r_b = 8), ≥ 1; null = from the budget")
    tau: float = option(0.5, "temperature τ of the Gumbel-sigmoid gates, > 0")
    lam: float = option(1e-4, "weight λ of the expected-L0 penalty λ · E[#gates on] (per example, summed over "
                              "matrices), ≥ 0")
    init_logit: float = option(-3.0, "threshold offset: initial gate logit (the output bias of the hypernetwork), "
                                     "so gates start closed with open probability σ(init_logit); < 0")
    alpha: float = option(0.1, "scale α of the gated correction: Ŝ = S ⊙ (1 + α g)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require("rank", self.rank is None or self.rank >= 1, "must be an integer ≥ 1 or null (from the budget)")
        self.require("tau", self.tau > 0, "must be > 0")
        self.require("lam", self.lam >= 0, "must be ≥ 0")
        self.require("init_logit", self.init_logit < 0,
                     "must be < 0, so that every gate is closed at init (the model starts as the pretrained one)")


@dataclass
class DynaCSGOptions(GateOptions):
    """Options of dynamic conditional spectral gates (defaults: seed 002)."""

    hidden: int = option(64, "hidden width H of the shared gate hypernetwork, ≥ 1 (re-solved for the budget)")
    grow_hidden: bool = option(True, "widen H when the budget allows a larger hypernetwork than hidden")
    detach_context: bool = option(True, "stop gradients at the [CLS] context vector fed to the hypernetwork")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require("hidden", self.hidden >= 1, "must be ≥ 1")


def spectral_correction(x: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor,
                        g: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-example low-rank correction ``α · ((x_b V_r) ⊙ (S_r ⊙ g_b)) U_rᵀ``.

    Equals ``x_b (α U_r diag(S_r ⊙ g_b) V_rᵀ)ᵀ`` for every example ``b`` without building it.

    Args:
        x: ``(B, T, d_in)`` (or ``(B, d_in)``) layer input.
        U: ``(d_out, r)`` left singular vectors.
        S: ``(r,)`` singular values.
        Vh: ``(r, d_in)`` right singular vectors (rows).
        g: ``(B, r)`` gates of each example.
        alpha: scale α.

    Returns:
        ``(B, T, d_out)`` (or ``(B, d_out)``).

    Raises:
        ValueError: ``g`` has another batch size than ``x``.
    """
    if g.shape[0] != x.shape[0]:
        raise ValueError(f"gates for {g.shape[0]} examples but the input holds {x.shape[0]}")
    z = x @ Vh.t()                                   # (B, T, r)
    scale = (S * g).to(z.dtype)                      # (B, r)
    if z.dim() == 3:
        scale = scale[:, None, :]
    return alpha * ((z * scale) @ U.t())


class DynamicSpectralLinear(nn.Module):
    """A frozen ``nn.Linear`` plus the per-example spectral correction of its gated top-r triplets.

    ``gate`` (``(B, r)``) is set by the encoder-layer pre-hook before the layer runs and cleared
    by its forward hook after it; with ``gate = None`` (adapter off, or outside the layer's call)
    the module is the plain linear layer.

    Attributes:
        base: the frozen linear layer (weight ``(d_out, d_in)``).
        U, S, Vh: frozen buffers ``(d_out, r)``, ``(r,)``, ``(r, d_in)``.
    """

    def __init__(self, base: nn.Linear, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, alpha: float):
        super().__init__()
        self.base = base
        self.alpha = float(alpha)
        self.register_buffer("U", U.contiguous(), persistent=False)
        self.register_buffer("S", S.contiguous(), persistent=False)
        self.register_buffer("Vh", Vh.contiguous(), persistent=False)
        self.gate: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.gate is None:
            return y
        return y + spectral_correction(x, self.U, self.S, self.Vh, self.gate, self.alpha).to(y.dtype)


class GateHyperNetwork(nn.Module):
    """The shared hypernetwork: context ``(B, d)`` and layer index → gate logits ``(B, K, r)``.

    ``h = GELU(W1 c + b1 + e_l)``, ``logits = W2 h + b2`` (see the module docstring); ``b2`` starts
    at ``init_logit`` (the threshold offset that closes every gate at init).
    Parameters: ``H (d + 1 + L + K r) + K r``.
    """

    def __init__(self, d_model: int, n_layers: int, n_kinds: int, rank: int, hidden: int,
                 init_logit: float = -3.0):
        super().__init__()
        self.n_kinds, self.rank = n_kinds, rank
        self.fc1 = nn.Linear(d_model, hidden)
        self.layer_embedding = nn.Embedding(n_layers, hidden)
        nn.init.normal_(self.layer_embedding.weight, std=0.02)
        self.fc2 = nn.Linear(hidden, n_kinds * rank)
        nn.init.constant_(self.fc2.bias, float(init_logit))

    def forward(self, context: torch.Tensor, layer: int) -> torch.Tensor:
        h = self.fc1(context) + self.layer_embedding.weight[layer]
        return self.fc2(nn.functional.gelu(h)).view(context.shape[0], self.n_kinds, self.rank)

    @staticmethod
    def count(d_model: int, n_layers: int, n_kinds: int, rank: int, hidden: int) -> int:
        """Parameter count ``H (d + 1 + L + K r) + K r``."""
        return hidden * (d_model + 1 + n_layers + n_kinds * rank) + n_kinds * rank


def gumbel_sigmoid_st(logits: torch.Tensor, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Straight-through Gumbel-sigmoid sample: forward ``1[y > 0.5]``, gradient of ``y``.

    ``y = σ((logits + log u − log(1 − u)) / τ)``, ``u ~ U(0, 1)`` (logistic noise).

    Args:
        logits: any shape.
        tau: temperature τ > 0.

    Returns:
        Same shape; values exactly 0 or 1, differentiable w.r.t. ``logits``.
    """
    u = torch.rand(logits.shape, device=logits.device, dtype=torch.float32, generator=generator)
    u = u.clamp(1e-6, 1 - 1e-6)
    y = torch.sigmoid((logits.float() + torch.log(u) - torch.log1p(-u)) / tau)
    return _HardThreshold.apply(y)


class _HardThreshold(torch.autograd.Function):
    """Forward ``1[y > 0.5]`` (exactly 0/1), backward the identity (straight-through estimator)."""

    @staticmethod
    def forward(ctx, y):
        return (y > 0.5).to(y.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


def mean_open_per_matrix(gates: list[torch.Tensor]) -> torch.Tensor:
    """⟨k⟩: mean number of open gates per matrix, ``mean_{l,b,k} Σ_i g_{l,b,k,i}``.

    Args:
        gates: one ``(B, K, r)`` tensor of 0/1 (or bool) gates per encoder layer, same shapes.

    Returns:
        A 0-d float tensor on the gates' device (no host sync).
    """
    return torch.stack([g.float().sum(-1).mean() for g in gates]).mean()


def choose_size(budget_params: float, d_model: int, n_layers: int, n_kinds: int, r_max: int,
                hidden: int, rank: int | None = None, grow_hidden: bool = True) -> tuple[int, int]:
    """``(r, H)``: gates per matrix and hidden width for the budget (rule in the module docstring).

    Raises:
        ValueError: ``r_max < 1`` or ``hidden < 1``.
    """
    if r_max < 1 or hidden < 1:
        raise ValueError(f"need r_max ≥ 1 and hidden ≥ 1, got r_max={r_max}, hidden={hidden}")
    B = float(budget_params)
    K, H = n_kinds, hidden
    if rank is not None:
        r = int(min(max(int(rank), 1), r_max))
    else:
        r = int(min(max(round((B - H * (d_model + 1 + n_layers)) / (K * (H + 1))), 1), r_max))
    n = GateHyperNetwork.count(d_model, n_layers, K, r, H)
    if abs(n - B) > BUDGET_TOLERANCE * B:
        h = max(1, round((B - K * r) / (d_model + 1 + n_layers + K * r)))
        if h < H or grow_hidden:
            H = h
    return r, int(H)


@register
class DynaCSG(Method):
    """Dynamic conditional spectral gates (seed 002; see the module docstring).

    ``identity_at_init``: every gate is closed at init (threshold offset ``init_logit``).

    ``compilable``: yes. The gates are computed in forward pre-hooks on the encoder layers that
    store them on the wrapped linears (``lin.gate = …``; a forward hook on the layer clears them
    once it has run) and append the logits to a Python list that the penalty reads after the
    forward; Dynamo traces the whole training forward, hooks included, as one graph (no graph
    break) and replays those side effects, and the hooks' Python flags (adapter on/off,
    train/eval, dev-gate collection) become guards. Tested with ``compile_backend: eager`` (the
    compiled run's losses equal the eager run's) and with inductor on the CPU (it trains; the
    Gumbel noise then comes from inductor's own RNG, so a compiled run is statistically, not
    bitwise, the eager one); not yet run under CUDA graphs on a GPU.
    """

    name = "dynacsg"
    options_cls = DynaCSGOptions
    identity_at_init = True
    compilable = True
    latency_batches = 2  # dev batches kept from the last evaluation for the latency ratio

    # -- building -------------------------------------------------------------------------------
    def build(self, model: nn.Module) -> nn.Module:
        if self.ctx.svd_path is None:
            raise ValueError("dynacsg needs the SVD factors (svd_path / --svd factors.safetensors)")
        targets = self.ctx.targets
        self.layers = sorted({t.layer for t in targets})
        self.kinds = sorted({t.kind for t in targets}, key=[t.kind for t in targets].index)
        self.slot = {t.name: (self.layers.index(t.layer), self.kinds.index(t.kind)) for t in targets}
        o = self.options
        top_k = stored_top_k(self.ctx.svd_path, targets)
        if o.rank is not None:  # one r for every matrix (the hypernetwork's output is K × r)
            explicit_ranks(o.rank, targets, top_k, f"method_options.{self.name}.rank")
        factors = {t.name: load_factors(self.ctx.svd_path, t.name) for t in targets}
        r_max = min(min(k, t.d_in, t.d_out) for t, k in zip(targets, top_k))
        d_model = model.config.hidden_size
        self.d_model = d_model
        self.rank, self.hidden = choose_size(self.ctx.budget_params, d_model, len(self.layers), len(self.kinds),
                                             r_max, o.hidden, o.rank, o.grow_hidden)
        self.r_max = r_max
        for p in model.parameters():
            p.requires_grad_(False)
        for n, p in model.named_parameters():
            if is_head_param(n):
                p.requires_grad_(True)
        torch.manual_seed(self.ctx.seed)
        model.dynacsg_hypernet = GateHyperNetwork(d_model, len(self.layers), len(self.kinds), self.rank, self.hidden,
                                                  o.init_logit)
        self.hyper = model.dynacsg_hypernet
        modules = dict(model.named_modules())
        self.linears: dict[str, DynamicSpectralLinear] = {}
        for t in targets:
            U, S, Vh = factors[t.name]
            r = self.rank
            wrapped = DynamicSpectralLinear(modules[t.name], U[:, :r].float(), S[:r].float(), Vh[:r].float(),
                                            o.alpha)
            parent_name, attr = t.name.rsplit(".", 1)
            setattr(modules[parent_name], attr, wrapped)
            self.linears[t.name] = wrapped
        # per encoder layer: the wrapped linears in slot order, and a pre-hook computing the gates
        by_layer: dict[int, list[tuple[int, DynamicSpectralLinear]]] = {}
        for t in targets:
            li, ki = self.slot[t.name]
            by_layer.setdefault(li, []).append((ki, self.linears[t.name]))
        self._by_layer = by_layer
        self._enabled = True
        self._logits: list[torch.Tensor] = []    # (B, K, r) per layer, last training forward
        self._sampled: list[torch.Tensor] = []   # (B, K, r) sampled hard gates, detached
        self._collect = False
        self._eval_sum: torch.Tensor | None = None   # (L, K) open gates summed over dev examples, on the device
        self._eval_n = 0
        self.eval_active: torch.Tensor | None = None   # (L, K) mean active gates at the last eval
        self._captured: list[dict[str, torch.Tensor]] = []
        self._latency: float | None = None
        layer_modules = {self.slot[t.name][0]: re.match(r"^(.*\.layer\.\d+)\.", t.name).group(1) for t in targets}
        self._handles = [modules[name].register_forward_pre_hook(self._make_hook(li), with_kwargs=True)
                         for li, name in sorted(layer_modules.items())]
        self._handles += [modules[name].register_forward_hook(self._make_clear_hook(li))
                          for li, name in sorted(layer_modules.items())]
        self._handles.append(model.register_forward_pre_hook(self._capture_hook, with_kwargs=True))
        return model

    def _make_hook(self, li: int):
        def hook(module, args, kwargs):
            lins = self._by_layer[li]
            if not self._enabled:
                for _, lin in lins:
                    lin.gate = None
                return None
            hs = args[0] if args else kwargs["hidden_states"]
            ctx = hs[:, 0, :]
            if self.options.detach_context:
                ctx = ctx.detach()
            logits = self.hyper(ctx.to(self.hyper.fc1.weight.dtype), li)      # (B, K, r)
            if self.hyper.training:
                g = gumbel_sigmoid_st(logits, float(self.options.tau))
                if torch.is_grad_enabled():
                    self._logits.append(logits)
                    self._sampled.append(g.detach())
            else:
                g = (logits > 0).float()
                if self._collect:  # accumulated on the device; read once, in on_eval_end
                    if self._eval_sum is None:
                        self._eval_sum = torch.zeros(len(self.layers), len(self.kinds), dtype=torch.float64,
                                                     device=g.device)
                    self._eval_sum[li] += g.detach().sum(dim=(0, 2)).double()
                    if li == 0:
                        self._eval_n += g.shape[0]
            for ki, lin in lins:
                lin.gate = g[:, ki, :]
            return None
        return hook

    def _make_clear_hook(self, li: int):
        """Forward hook: drop the layer's gates once it has run. A gate left on a module after the
        forward would be a graph output under ``torch.compile`` that requires grad and gets no
        gradient, which inductor's backward cannot take (``expected Tensor() for op: input``)."""
        def hook(module, args, output):
            for _, lin in self._by_layer[li]:
                lin.gate = None
            return None
        return hook

    def _capture_hook(self, module, args, kwargs):
        if self._collect and len(self._captured) < self.latency_batches:
            self._captured.append({k: v.detach() for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
        return None

    # -- hooks ----------------------------------------------------------------------------------
    def on_step_start(self, model: nn.Module, state: LoopState) -> None:
        self._logits, self._sampled = [], []

    def expected_open(self) -> torch.Tensor:
        """E[#gates on] of one example: ``mean_b Σ_{l,k,i} σ(logit_{b,l,k,i})`` over the last training
        forward (0-d tensor on the device, differentiable).

        Raises:
            RuntimeError: no training forward pass since the last ``on_step_start``.
        """
        if not self._logits:
            raise RuntimeError("dynacsg: no gate logits recorded; run a training forward pass first")
        return sum(torch.sigmoid(z.float()).sum(dim=(1, 2)) for z in self._logits).mean()

    def penalty(self) -> torch.Tensor:
        """λ · E[#gates on] (expected L0, arXiv:1712.01312) over the last training forward (0-d tensor).

        Raises:
            RuntimeError: no training forward pass since the last ``on_step_start``.
        """
        return float(self.options.lam) * self.expected_open()

    def extra_loss(self, model, outputs, batch, state: LoopState) -> torch.Tensor | None:
        """The penalty; logs gate_penalty, expected_gate_frac, mean_k, mean_k_sampled (device tensors, no host sync)."""
        if not self._logits:
            return None
        expected = self.expected_open()
        pen = float(self.options.lam) * expected
        state.log["gate_penalty"] = pen.detach()
        state.log["expected_gate_frac"] = expected.detach() / (len(self.ctx.targets) * self.rank)
        state.log["mean_k"] = mean_open_per_matrix([z.detach() > 0 for z in self._logits])
        state.log["mean_k_sampled"] = mean_open_per_matrix(self._sampled)
        self._logits, self._sampled = [], []
        return pen

    def on_eval_start(self, model: nn.Module) -> None:
        self._collect = True
        self._eval_sum = None
        self._eval_n = 0
        self._captured = []

    def on_eval_end(self, model: nn.Module) -> None:
        self._collect = False
        if self._eval_n and self._eval_sum is not None:
            self.eval_active = (self._eval_sum / self._eval_n).float().cpu()  # one transfer per evaluation

    def checkpoint_state(self, model: nn.Module) -> dict[str, Any]:
        return {"eval_active": None if self.eval_active is None else self.eval_active.clone()}

    def restore_checkpoint_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        self.eval_active = state.get("eval_active")

    # -- reporting ------------------------------------------------------------------------------
    @torch.no_grad()
    def measure_latency(self, model: nn.Module, batches: list[dict[str, torch.Tensor]] | None = None,
                        repeats: int = 3) -> float:
        """Forward time of the gated model over the frozen backbone (adapter off) on ``batches``.

        Median of ``repeats`` timed passes over all batches each (backbone and adapted passes
        interleaved) after one warm-up pass each; eval mode, no grad, bf16 autocast on CUDA as in
        evaluation.
        Evaluation-gate collection is paused. Returns NaN when there are no batches.
        """
        batches = self._captured if batches is None else batches
        if not batches:
            return float("nan")
        was_training, collect = model.training, self._collect
        model.eval()
        self._collect = False
        dev = next(model.parameters()).device
        autocast = dev.type == "cuda"

        def timed(enabled: bool) -> float:
            self._enabled = enabled
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            for b in batches:
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                    model(**b)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            return time.perf_counter() - t0

        base, adapted = [], []
        try:
            timed(False), timed(True)  # warm-up
            for _ in range(repeats):  # interleaved, so drifting machine load hits both alike
                base.append(timed(False))
                adapted.append(timed(True))
        finally:
            self._enabled = True
            self._collect = collect
            model.train(was_training)
        return statistics.median(adapted) / statistics.median(base)

    def active_per_matrix(self) -> list[float]:
        """Mean active gates of each target (ctx.targets order) at the last evaluation (NaN before)."""
        if self.eval_active is None:
            return [float("nan")] * len(self.ctx.targets)
        return [float(self.eval_active[self.slot[t.name]]) for t in self.ctx.targets]

    def param_counts(self, model: nn.Module) -> dict[str, int]:
        adapter = sum(p.numel() for p in self.hyper.parameters() if p.requires_grad)
        head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and is_head_param(n))
        return {"adapter_params": adapter, "head_params": head}

    def summary(self, model: nn.Module) -> dict[str, Any]:
        if self._latency is None:
            self._latency = self.measure_latency(model)
        act = self.active_per_matrix()
        n = GateHyperNetwork.count(self.d_model, len(self.layers), len(self.kinds), self.rank, self.hidden)
        per_layer = float("nan") if self.eval_active is None else float(self.eval_active.sum(1).mean())
        return {"gates_per_matrix": self.rank, "hidden": self.hidden,
                "mean_active_gates": float(sum(act) / len(act)) if act else float("nan"),
                "mean_active_gates_per_layer": per_layer,
                **budget_flags(n, self.ctx.budget_params), "budget_target_params": float(self.ctx.budget_params),
                "latency_ratio": float(self._latency)}

    def tables(self, model: nn.Module) -> dict:
        act = self.active_per_matrix()
        r = self.rank
        return {"ranks": ranks_frame(self.ctx.targets, act, None, gates=[r] * len(act),
                                     active_frac=[a / r for a in act])}
