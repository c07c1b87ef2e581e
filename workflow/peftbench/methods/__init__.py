"""The method registry: one table line and one file per method.

:data:`METHOD_TABLE` is torch-free: the Snakefile, the config check and the analysis stage read a
method's flags (``uses_svd``, ``budget_free``), display label and order from it without importing
PyTorch. :func:`get_method` imports the method's module on first use and returns its
:class:`~peftbench.methods.base.Method` subclass.

Adding a method ``mymethod``:

1. a file ``methods/mymethod.py`` holding ``@dataclass class Options(MethodOptions)`` (typed,
   documented, checked options) and ``@register class MyMethod(Method)`` with
   ``name = "mymethod"`` and ``options_cls = Options``;
2. one line in :data:`METHOD_TABLE`.

Nothing else: the grid (``grid.methods: all``), the config check (its options are built when the
DAG is planned), the PEFT learning-rate layer (``training.adapters``: every method that is not
``budget_free``), the rules, the aggregation and every plot pick it up from here.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .base import Method


@dataclass(frozen=True)
class MethodInfo:
    """One line of the method table.

    Attributes:
        name: registry key: the ``method`` wildcard, the ``method`` column and ``grid.methods``.
        module: file in this folder (without ``.py``) that registers the method's class.
        label: display name in tables and figures.
        uses_svd: the run needs the ``svd`` stage's ``factors.safetensors``.
        budget_free: the method ignores the budget (full fine-tuning): one run per task and seed,
            stored under :data:`FULL_BUDGET`; it is also left out of the ``training.adapters``
            learning-rate layer that every adapter method inherits.
        encoder_only: why the method cannot run on the causal-LM track (decoder models,
            generation tasks), or ``None`` when it runs on both tracks. The config check rejects a
            grid that pairs such a method with a causal task, quoting this reason.
    """

    name: str
    module: str
    label: str
    uses_svd: bool = False
    budget_free: bool = False
    encoder_only: str | None = None

    @property
    def is_adapter(self) -> bool:
        """Trains an adapter on a frozen backbone (every method but full fine-tuning)."""
        return not self.budget_free


#: Budget (% of backbone parameters) recorded by budget-free methods: all of the backbone.
FULL_BUDGET = 100.0

#: Why the SVD-based methods are encoder-only: the ``svd`` stage factorises the targets of an encoder
#: loaded with a classification head (:func:`peftbench.svd.compute`), and no causal run has been checked.
_SVD_ENCODER_ONLY = ("the svd stage factorises an encoder with a classifier head (peftbench.svd); it is not "
                     "built for decoder models yet")
#: Why the GLoRA / FW-LoRA families are encoder-only for now: not yet checked on a decoder (their
#: warm-up statistics read every target's frozen-weight gradient; nobody has run that on a causal LM).
_UNCHECKED = "not yet checked on a decoder model (no causal-LM test covers it)"

#: Every method, in display order (baselines first; lora_attn / lora_mlp are phased LoRA's static
#: baselines, so they stand beside it).
METHOD_TABLE: tuple[MethodInfo, ...] = (
    MethodInfo("full", "full", "full fine-tuning", budget_free=True),
    MethodInfo("lora", "lora", "LoRA"),
    MethodInfo("adalora", "adalora", "AdaLoRA"),
    MethodInfo("glora", "glora", "GLoRA (grad-norm ranks)", encoder_only=_UNCHECKED),
    MethodInfo("glora_shuffled", "glora_shuffled", "GLoRA shuffled scores (control)", encoder_only=_UNCHECKED),
    MethodInfo("glora_uniform", "glora_uniform", "GLoRA uniform scores (control)", encoder_only=_UNCHECKED),
    MethodInfo("fwlora", "fwlora", "FW-LoRA", encoder_only=_UNCHECKED),
    MethodInfo("fwlora_uniform", "fwlora_uniform", "FW-LoRA uniform weights (control)", encoder_only=_UNCHECKED),
    MethodInfo("spectral_a", "spectral_a", "Spectral Adapter^A", uses_svd=True, encoder_only=_SVD_ENCODER_ONLY),
    MethodInfo("spectral_r", "spectral_r", "Spectral Adapter^R", uses_svd=True, encoder_only=_SVD_ENCODER_ONLY),
    MethodInfo("gsa", "gsa", "GSA", uses_svd=True, encoder_only=_SVD_ENCODER_ONLY),
    MethodInfo("dynacsg", "dynacsg", "DynaCSG", uses_svd=True,
               encoder_only="its hypernetwork reads the [CLS] hidden state entering each encoder layer; a decoder "
                            "has no [CLS] token"),
    MethodInfo("lora_attn", "lora_attn", "LoRA (attention only)"),
    MethodInfo("lora_mlp", "lora_mlp", "LoRA (MLP only)"),
    MethodInfo("dynacsg_static", "dynacsg_static", "DynaCSG static gates", uses_svd=True,
               encoder_only="DynaCSG's control: its gates come from the [CLS]-conditioned hypernetwork"),
    MethodInfo("phased", "phased", "phased LoRA"),
)

#: ``{name: MethodInfo}`` in display order.
METHODS: dict[str, MethodInfo] = {m.name: m for m in METHOD_TABLE}

_CLASSES: dict[str, type] = {}


def method_info(name: str) -> MethodInfo:
    """The table line of method ``name``.

    Raises:
        KeyError: unknown method, listing the registered ones.
    """
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; registered methods: {', '.join(METHODS)}") from None


def register(cls: "type[Method]") -> "type[Method]":
    """Class decorator of a method file: bind ``cls`` to its line of :data:`METHOD_TABLE`.

    Raises:
        ValueError: ``cls.name`` has no table line, the line names another module, or the name is
            registered twice.
    """
    info = METHODS.get(cls.name)
    if info is None:
        raise ValueError(f"method class {cls.__qualname__} has name {cls.name!r}, which has no line in "
                         f"METHOD_TABLE (peftbench/methods/__init__.py); add one")
    module = cls.__module__.rsplit(".", 1)[-1]
    if module != info.module:
        raise ValueError(f"method {cls.name!r} is registered in module {module!r} but METHOD_TABLE says "
                         f"{info.module!r}")
    if cls.name in _CLASSES and _CLASSES[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} registered twice")
    _CLASSES[cls.name] = cls
    return cls


def get_method(name: str) -> "type[Method]":
    """The :class:`~peftbench.methods.base.Method` subclass of ``name`` (imports its module).

    Raises:
        KeyError: unknown method.
        ImportError: the table names a module that does not exist or fails to import (the error
            names the method, the module and the cause; never silently skipped).
        ValueError: the module imports but registers no class under ``name``.
    """
    info = method_info(name)
    if name not in _CLASSES:
        qual = f"{__name__}.{info.module}"
        try:
            importlib.import_module(qual)
        except ImportError as exc:
            raise ImportError(f"method {name!r}: METHOD_TABLE names module {qual}, which cannot be imported "
                              f"({type(exc).__name__}: {exc}); fix the module name in the table or the "
                              f"import") from exc
        if name not in _CLASSES:
            raise ValueError(f"method {name!r}: module {qual} imports but registers no Method with "
                             f"name = {name!r} (decorate the class with @register)")
    return _CLASSES[name]


def __getattr__(attr: str):
    # The torch-importing contract classes, loaded only when asked for.
    if attr in ("BuildContext", "LoopState", "Method", "MethodOptions", "ranks_frame"):
        from . import base

        return getattr(base, attr)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


__all__ = ["FULL_BUDGET", "METHODS", "METHOD_TABLE", "MethodInfo", "get_method", "method_info", "register",
           "BuildContext", "LoopState", "Method", "MethodOptions", "ranks_frame"]
