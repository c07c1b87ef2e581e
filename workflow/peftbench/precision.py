"""Numeric precision of a run: the ``precision`` recipe key (``auto`` | ``fp32`` | ``bf16``).

``bf16`` trains and evaluates under ``torch.autocast(dtype=torch.bfloat16)``: matmuls and
convolutions run in bfloat16 with fp32 accumulation, the weights, optimizer moments and loss
stay fp32 (mixed precision; Micikevicius et al. 2018, arXiv:1710.03740, with bf16 instead of fp16
so no loss scaling is needed; Kalamkar et al. 2019, arXiv:1905.12322). ``auto`` resolves per
device: bf16 on a CUDA GPU that supports it and on a CPU with native bf16 matmul instructions
(AVX512_BF16 or AMX-BF16: oneDNN runs bf16 GEMMs there at about twice the fp32 rate), fp32
otherwise. The resolved precision is written to ``metrics.parquet`` (column ``precision``), so
two runs of ``auto`` on different machines can be told apart.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
"""Values of the ``precision`` recipe key."""

CPU_BF16_FLAGS: tuple[str, ...] = ("avx512_bf16", "amx_bf16")
"""``/proc/cpuinfo`` flags that mean native bf16 matmul on an x86 CPU."""


@functools.lru_cache(maxsize=None)
def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, ...]:
    """The flags of :data:`CPU_BF16_FLAGS` this CPU reports (empty off Linux/x86)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return ()
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return tuple(f for f in CPU_BF16_FLAGS if f in flags)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matmuls natively (a bf16-capable GPU, or a CPU with
    AVX512_BF16 / AMX-BF16)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return bool(cpu_bf16_flags())
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a run uses on ``device``: ``fp32`` or ``bf16``.

    Args:
        precision: the recipe's ``precision`` (``auto``, ``fp32`` or ``bf16``).
        device: the training device.

    Returns:
        ``bf16`` or ``fp32`` (``auto``: bf16 where :func:`native_bf16`, else fp32).

    Raises:
        ValueError: ``precision`` is not one of :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)} "
                         "(set training.defaults.precision, or a layer of it, to one of them)")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16" and not native_bf16(device):
        log.warning("precision bf16 on %s without native bf16 matmul: autocast emulates it and is slower "
                    "than fp32 (precision: auto picks fp32 here)", device)
    return precision
