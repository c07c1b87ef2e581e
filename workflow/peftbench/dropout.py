"""Dropout for CPU training that draws its random numbers 16 bits at a time.

``torch.nn.Dropout`` on a CPU spends about 6 ns per element drawing a Bernoulli variable with
torch's Mersenne-Twister generator: on this project's 2-core machine that was half of a LoRA
training step (MiniLM, batch 32, bf16: 0.335 s with the adapters' dropout 0.1, 0.178 s without),
because peft draws one mask per adapted matrix over that matrix's input. :class:`FastDropout`
draws the same distribution from 64-bit words of the same generator (``torch.randint``), cut into
four 16-bit integers, each compared with a threshold: about a third of the time per element.

The result is dropout (Srivastava et al. 2014, JMLR 15:1929) as ``nn.Dropout`` defines it — each
element kept independently and scaled by ``1 / (1 - p)`` — with ``p`` rounded to a multiple of
``2**-16`` (:func:`drop_probability`; 0.1 becomes 0.1000061, and the scale follows the rounded
value, so the output stays unbiased). The masks are another random draw than torch's with the
same seed, which is why the choice is a speed knob that is not tracked, like ``length_buckets``.
On CUDA torch's fused Philox dropout is already fast, and under ``torch.compile`` inductor draws
its own random numbers, so ``dropout_kernel: auto`` uses this kernel only for eager CPU training
(:func:`resolve_dropout_kernel`).
"""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

log = logging.getLogger(__name__)

#: Values of the ``dropout_kernel`` runtime key.
DROPOUT_KERNELS = ("auto", "torch", "fast")
#: Mask resolution: ``p`` is rounded to a multiple of ``1 / LEVELS``.
LEVELS = 1 << 16


def drop_probability(p: float) -> float:
    """The drop probability :class:`FastDropout` realises for a requested ``p`` in [0, 1]:
    ``round(p · 2**16) / 2**16`` (at most ``2**-17`` away)."""
    return round(p * LEVELS) / LEVELS


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu",
              generator: torch.Generator | None = None) -> torch.Tensor:
    """A boolean mask of ``shape``, each element True (kept) with probability
    ``1 - drop_probability(p)``, independently.

    Draws ``ceil(numel / 4)`` uniform 64-bit words from ``generator`` (torch's default generator of
    ``device`` when None, so ``torch.manual_seed`` makes it reproducible) and reads them as 16-bit
    integers ``u``, uniform on [-2**15, 2**15); an element is dropped when
    ``u < round(p · 2**16) - 2**15``.

    Raises:
        ValueError: ``p`` outside [0, 1].
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    drops = round(p * LEVELS)
    if drops >= LEVELS:  # the threshold 2**15 does not fit an int16 comparison
        return torch.zeros(shape, dtype=torch.bool, device=device)
    n = math.prod(shape)
    words = torch.randint(-(1 << 63), (1 << 63) - 1, ((n + 3) // 4,), dtype=torch.int64, device=device,
                          generator=generator)
    bits = words.view(torch.int16)[:n].view(shape)
    return bits >= drops - LEVELS // 2


class _MaskedScale(torch.autograd.Function):
    """``x · keep / (1 - q)``, saving only the boolean mask for the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * _scaled_mask(keep, x.dtype, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return grad * _scaled_mask(keep, grad.dtype, ctx.scale), None, None


def _scaled_mask(keep: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    # bool -> uint8 is a view; uint8 -> float and a multiply are vectorised (torch.where and
    # bool -> float conversions are several times slower on a CPU)
    return keep.view(torch.uint8).to(dtype).mul_(scale)


class FastDropout(nn.Dropout):
    """``nn.Dropout`` with masks from :func:`keep_mask` (the module's ``p`` rounded by
    :func:`drop_probability`; ``inplace`` is ignored: the output is a new tensor).

    Input and output: any shape and floating dtype; in eval mode, or with ``p = 0``, the input
    itself. The backward pass keeps only the boolean mask (one byte per element).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        q = drop_probability(self.p)
        if q >= 1.0:
            return x * 0.0
        return _MaskedScale.apply(x, keep_mask(x.shape, self.p, x.device), 1.0 / (1.0 - q))


def check_dropout_kernel(kernel: str) -> None:
    """Raise unless ``kernel`` is a ``dropout_kernel`` value (before a run loads anything).

    Raises:
        ValueError: an unknown ``kernel`` (the message lists :data:`DROPOUT_KERNELS`).
    """
    if kernel not in DROPOUT_KERNELS:
        raise ValueError(f"dropout_kernel must be one of {list(DROPOUT_KERNELS)}, got {kernel!r}")


def resolve_dropout_kernel(kernel: str, device: torch.device, compiled: bool) -> str:
    """``torch`` or ``fast``: what ``dropout_kernel`` means for a run on ``device``. ``auto`` is
    ``fast`` for eager training on a CPU and ``torch`` on CUDA; under ``torch.compile`` it is
    always ``torch`` (Dynamo cannot trace :func:`keep_mask`'s ``randint`` over a symbolic size,
    and inductor generates its own random numbers), so ``fast`` asked for a compiled run falls
    back to ``torch`` with a log line.

    Raises:
        ValueError: an unknown ``kernel`` (the message lists :data:`DROPOUT_KERNELS`).
    """
    check_dropout_kernel(kernel)
    if compiled:
        if kernel == "fast":
            log.warning("dropout_kernel fast does not trace under torch.compile: the compiled run uses torch's dropout")
        return "torch"
    if kernel == "auto":
        return "fast" if device.type == "cpu" else "torch"
    return kernel


def use_dropout_kernel(model: nn.Module, kernel: str) -> int:
    """Switch every dropout module of ``model`` (``nn.Dropout`` and :class:`FastDropout`, with
    ``p > 0``) to ``kernel`` (``fast`` or ``torch``) in place, by class: the modules, their
    ``p`` and the state dict stay the same objects. Call again after a method replaces modules.

    Returns:
        The number of dropout modules with ``p > 0`` now of that kernel.

    Raises:
        ValueError: ``kernel`` is not ``fast`` or ``torch`` (resolve ``auto`` first).
    """
    if kernel not in ("fast", "torch"):
        raise ValueError(f"use_dropout_kernel takes 'fast' or 'torch' (resolve 'auto' first), got {kernel!r}")
    cls = FastDropout if kernel == "fast" else nn.Dropout
    n = 0
    for m in model.modules():
        if type(m) in (nn.Dropout, FastDropout) and m.p > 0:
            m.__class__ = cls
            n += 1
    return n
