"""The method registry: one file per method, each registering one :class:`Method` subclass.

``get_method("lora")`` returns the class; :data:`METHODS` lists every key. A new method is a new
file in this folder that defines ``@register class MyMethod(Method): name = "mymethod"`` and is
imported below.
"""
from __future__ import annotations

import importlib

from .base import BuildContext, LoopState, Method, ranks_frame

METHODS: dict[str, type[Method]] = {}

_MODULES = ["full", "lora", "adalora", "glora", "fwlora", "spectral_a", "spectral_r", "gsa", "dynacsg", "phased"]


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add ``cls`` to :data:`METHODS` under ``cls.name``.

    Raises:
        ValueError: empty or duplicate name.
    """
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"method name {cls.name!r} is empty or registered twice")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    """The registered class for ``name``.

    Raises:
        KeyError: unknown method, listing the registered ones.
    """
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; registered methods: {', '.join(METHODS)}") from None


for _m in _MODULES:
    try:
        importlib.import_module(f"{__name__}.{_m}")
    except ModuleNotFoundError as exc:  # a method file not written yet
        if exc.name != f"{__name__}.{_m}":
            raise

__all__ = ["BuildContext", "LoopState", "Method", "METHODS", "get_method", "ranks_frame", "register"]
