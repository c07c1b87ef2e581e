"""Evaluation with peft's low-rank adapters merged into the frozen weights, restored bit-exactly.

A LoRA layer's forward is ``W0 x + s B A x`` (Hu et al. 2021, arXiv:2106.09685, Eq. 3; AdaLoRA's
``W0 x + α P (Λ ⊙ Q x) / (ranknum + 1e-5)``, ``ΔW = P Λ Q`` of Zhang et al. 2023, arXiv:2303.10512,
Eq. 3, in peft's form):
per adapted matrix two extra matmuls and two passes over the ``(batch, tokens, d_out)`` output
(scale, add; AdaLoRA a third: the division by the rank). In evaluation nothing is trained, so
the same function is ``(W0 + ΔW) x`` with ``ΔW = s B A`` computed once per evaluation. Measured on
this project's 2-core CPU (MiniLM, STS-B dev, 1,500 pairs, bf16 autocast, batch 128): an
evaluation pass took 4.2–4.8 s for full fine-tuning, 5.7–5.9 s for LoRA, 8.0–8.7 s for AdaLoRA
with the adapters unmerged.

:func:`merged_adapters` merges with peft's own ``LoraLayer.merge`` (the code peft uses for
inference) and, on leaving, ``unmerge`` plus a copy of the weights saved on entry: a
merge–unmerge round trip in floating point does not give ``W0`` back bit for bit, the copy does,
so training after an evaluation (and a resumed run) sees exactly the weights it would have seen
without it. Memory: one copy of every adapted base weight while evaluating.

Numerics: the merged forward rounds ``W0 + ΔW`` once (fp32 master weights; under bf16 autocast
the merged weight is cast to bf16 where the unmerged forward casts ``W0`` and the adapter
separately), so logits differ from the unmerged forward's by rounding only (fidelity table,
``workflow/docs/fidelity.md``).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """Every peft ``LoraLayer`` of ``model`` (AdaLoRA's ``SVDLinear`` included) with an adapter
    to merge, in module order; ``[]`` for a model without peft LoRA layers (full fine-tuning, the
    spectral and gated adapters) or when peft is not imported."""
    import sys

    if "peft" not in sys.modules:  # nothing built with peft in this process: no LoRA layer to find
        return []
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer) and not m.merged and not m.disable_adapters]


@contextmanager
def merged_adapters(model: nn.Module) -> Iterator[int]:
    """Within the block, every peft LoRA layer of ``model`` computes ``(W0 + ΔW) x`` from merged
    weights (see the module docstring); on leaving (also on an exception) the adapters are
    unmerged and the base weights and biases are the saved originals, bit for bit.

    Yields:
        The number of layers merged.
    """
    layers = lora_layers(model)
    saved = []
    with torch.no_grad():
        for m in layers:
            base = m.get_base_layer()
            saved.append((m, base.weight.detach().clone(),
                          None if getattr(base, "bias", None) is None else base.bias.detach().clone()))
    try:
        for m, _, _ in saved:
            m.merge()
        yield len(layers)
    finally:
        with torch.no_grad():
            for m, weight, bias in saved:
                if m.merged:
                    m.unmerge()
                base = m.get_base_layer()
                base.weight.copy_(weight)
                if bias is not None:
                    base.bias.copy_(bias)
