"""Typed method options: the base every method's ``Options`` dataclass derives from.

Modelled on peft's ``LoraConfig``: one ``@dataclass`` per method, each field with its default and a
``metadata={"help": ...}`` sentence, checks in ``__post_init__`` that name the field. The config
check builds every grid method's options from ``method_options.<name>`` when the DAG is planned
(:func:`peftbench.config.check`), so a bad value fails before any job runs; the training job
builds the same object from the same dict.

Torch-free.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal


class OptionsError(ValueError):
    """A method option that is unknown or has a value the method does not allow."""


@dataclasses.dataclass
class MethodOptions:
    """Base of every method's options (a method without options uses it as it is).

    Subclasses declare fields with defaults and ``metadata={"help": ...}`` and extend
    ``__post_init__`` with range checks through :meth:`require`; field types are checked here.
    """

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _matches(value, hints[f.name]):
                raise OptionsError(f"{f.name}: {value!r} is not of type {_type_name(hints[f.name])}")
            if isinstance(value, int) and not isinstance(value, bool) and _accepts_float(hints[f.name]):
                object.__setattr__(self, f.name, float(value))

    def require(self, field: str, ok: bool, allowed: str) -> None:
        """Raise :class:`OptionsError` ``"<field>: <value> — <allowed>"`` unless ``ok``."""
        if not ok:
            raise OptionsError(f"{field}: {getattr(self, field)!r} — {allowed}")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None, where: str = "options"):
        """Build the options from a config mapping; missing keys take the field defaults.

        Args:
            values: ``method_options.<name>`` of the config (``None`` = all defaults).
            where: the config key path used in error messages (``method_options.glora``).

        Raises:
            OptionsError: an unknown key (the message lists the allowed ones) or a bad value
                (the message names ``<where>.<field>``, the value and what is allowed).
        """
        values = dict(values or {})
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise OptionsError(f"config key {where}: unknown option(s) {unknown}; allowed: {names or 'none'}")
        hints = typing.get_type_hints(cls)
        values = {k: parse_scalar(v, _hint_json_types(hints[k])) if isinstance(v, str) else v
                  for k, v in values.items()}
        try:
            return cls(**values)
        except OptionsError as exc:
            raise OptionsError(f"config key {where}.{exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """The options as a plain dict (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def help(cls) -> dict[str, str]:
        """``{field: help sentence}`` of every option."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def option(default: Any, help: str) -> Any:
    """A dataclass field with a default and a help sentence (``metadata["help"]``)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


#: Strings that mean null where the schema (or an option's type) allows null.
NULL_WORDS = ("null", "~", "None", "none", "")
_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")


def parse_scalar(value: str, types: set[str]) -> Any:
    """``value`` (a string from the command line) as the JSON type it is meant to be.

    ``types`` are the JSON-schema types allowed where it stands (``null``, ``boolean``,
    ``integer``, ``number``, ``string`` …). Returns the string unchanged when the place accepts
    strings (unless it is a null word and null is allowed) or when it parses as none of the
    allowed types (validation then names the key).
    """
    if not types:
        return value
    if "null" in types and value.strip() in NULL_WORDS:
        return None
    if "string" in types:
        return value
    v = value.strip()
    if "boolean" in types and v.lower() in _TRUE + _FALSE:
        return v.lower() in _TRUE
    if "integer" in types:
        try:
            return int(v)
        except ValueError:
            pass
    if "number" in types:
        try:
            f = float(v)
            return int(f) if "integer" in types and f.is_integer() else f
        except ValueError:
            pass
    return value


def _hint_json_types(tp) -> set[str]:
    """JSON-schema types a Python type hint accepts (for :func:`parse_scalar`)."""
    if _is_union(tp):
        return set().union(*(_hint_json_types(t) for t in _args(tp)))
    if tp is type(None):
        return {"null"}
    if typing.get_origin(tp) is Literal:
        return {"string" if isinstance(a, str) else "number" for a in _args(tp)}
    return {bool: {"boolean"}, int: {"integer"}, float: {"number"}, str: {"string"}}.get(tp, {"string"})


def _args(tp) -> tuple:
    return typing.get_args(tp)


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _accepts_float(tp) -> bool:
    if tp is float:
        return True
    return _is_union(tp) and float in _args(tp) and int not in _args(tp)


def _matches(value: Any, tp) -> bool:
    if tp is Any:
        return True
    if _is_union(tp):
        return any(_matches(value, t) for t in _args(tp))
    if tp is type(None):
        return value is None
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in _args(tp)
    if origin in (list, tuple):
        inner = _args(tp)[:1] or (Any,)
        return isinstance(value, (list, tuple)) and all(_matches(v, inner[0]) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_name(tp) -> str:
    if _is_union(tp):
        return " or ".join(_type_name(t) for t in _args(tp))
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in _args(tp))
    if typing.get_origin(tp) in (list, tuple):
        return f"list of {_type_name((_args(tp) or (Any,))[0])}"
    return getattr(tp, "__name__", str(tp))
