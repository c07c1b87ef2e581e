"""LoRA on the feed-forward (MLP) matrices only: a static baseline of phased LoRA (peftbench seed 003).

The adapter is LoRA (Hu et al. 2021, arXiv:2106.09685, Eq. 3: ``h = W0 x + (α / r) B A x``, peft
``LoraConfig``) on the feed-forward matrices of every layer (:data:`peftbench.vocab.MLP_KINDS`:
the intermediate up-projection and the output down-projection of an encoder; gate_proj, up_proj and
down_proj of a LLaMA-style decoder's gated MLP), trained for the whole run; the
attention matrices are left frozen and unadapted. It is the control for phased LoRA's MLP-only
phase (``both->mlp->attn``): the same module set, without switching.

Budget: the uniform rank that spends the whole budget on the feed-forward matrices only
(:func:`peftbench.budget.uniform_rank` over them), so the adapter holds the LoRA family's parameter
count at the same budget with a larger rank; ``capacity_limited`` where that rank hits the
smallest matrix dimension. ``ranks.parquet`` lists every target, rank 0 on the attention ones.

α, dropout and learning rate: LoRA's (:class:`peftbench.methods.lora.LoRAOptions`,
``method_options.lora_mlp``). torch.compile: ``compilable``, as LoRA.
"""
from __future__ import annotations

from ..vocab import MLP_KINDS
from . import register
from .lora import LoRA


@register
class LoRAMLP(LoRA):
    """Uniform-rank LoRA on the feed-forward matrices only (see module docstring)."""

    name = "lora_mlp"
    target_kinds = MLP_KINDS
