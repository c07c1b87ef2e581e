"""LoRA on the attention matrices only: a static baseline of phased LoRA (peftbench seed 003).

The adapter is LoRA (Hu et al. 2021, arXiv:2106.09685, Eq. 3: ``h = W0 x + (α / r) B A x``, peft
``LoraConfig``) on the query, key, value and attention-output matrices of every layer
(:data:`peftbench.vocab.ATTENTION_KINDS`), trained for the whole run; the feed-forward matrices are
left frozen and unadapted. It is the control for phased LoRA's attention-only phase
(``both->mlp->attn``): the same module set, without switching.

Budget: the uniform rank that spends the whole budget on the attention matrices only
(:func:`peftbench.budget.uniform_rank` over them), so the adapter holds the LoRA family's parameter
count at the same budget with a larger rank; ``capacity_limited`` where that rank hits the
smallest matrix dimension. ``ranks.parquet`` lists every target, rank 0 on the feed-forward ones.

α, dropout and learning rate: LoRA's (:class:`peftbench.methods.lora.LoRAOptions`,
``method_options.lora_attn``). torch.compile: ``compilable``, as LoRA.
"""
from __future__ import annotations

from ..vocab import ATTENTION_KINDS
from . import register
from .lora import LoRA


@register
class LoRAAttention(LoRA):
    """Uniform-rank LoRA on q/k/v/attention-output only (see module docstring)."""

    name = "lora_attn"
    target_kinds = ATTENTION_KINDS
