"""The configuration reference (``workflow/docs/config.md``), rendered from the config JSON schema.

The schema (``workflow/schemas/config.schema.yaml``) is the one source of truth for config keys:
:func:`render` turns it into Markdown and :func:`undocumented` lists the keys that still lack a
``description``. Regenerate the committed reference after every schema change with::

    python -m peftbench config-reference --out workflow/docs/config.md

Layout: one ``##`` section per top-level key; one table per object (the section's table starts
with the top-level key's own row), with the columns key path, type, default, allowed and
description. Nested objects, ``$ref`` targets and map values (``additionalProperties`` given a
schema) are followed recursively and get their own ``###`` table (a map whose values are objects
shows the table of its value, e.g. ``training.methods.<method>``). Key paths are dotted; a map key
is written as a placeholder, ``<task>`` under ``tasks``, ``<method>`` under ``methods``, ``<name>``
elsewhere (a schema may set ``x-key-name`` on the map to choose another); array items are
written ``path[]``. Only local ``$ref``\\ s (``#/...``) are resolved; a ``$ref`` cycle is not
followed a second time.

Torch-free: needs only the standard library (and PyYAML to load the schema from a file).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

#: The command that regenerates the committed reference (written into its header line).
REGENERATE = "python -m peftbench config-reference --out workflow/docs/config.md"
SCHEMA_PATH = "workflow/schemas/config.schema.yaml"
#: Placeholder names of map keys, by the map's own key; ``<name>`` for any other map.
MAP_KEY_NAMES = {"tasks": "task", "methods": "method"}
COLUMNS = ("key path", "type", "default", "allowed", "description")


@dataclass
class _Node:
    """One key of the config: its dotted path, its schema (``$ref`` resolved) and how it appears."""

    path: str
    schema: dict
    raw: dict
    named: bool  # a ``properties`` entry (False: a map value or array items)
    required: bool
    refs: tuple[str, ...]  # $ref chain followed to reach this node (cycle guard)


def load(path: str | Path) -> dict:
    """Read a YAML (or JSON) schema file into a dict."""
    import yaml

    return yaml.safe_load(Path(path).read_text())


def _resolve(root: dict, schema: Any, refs: tuple[str, ...] = ()) -> tuple[dict, tuple[str, ...]]:
    """``schema`` with local ``$ref``\\ s followed (sibling keywords win over the target's)."""
    if not isinstance(schema, dict):
        return {}, refs
    seen = refs
    while isinstance(schema, dict) and "$ref" in schema:
        ref = schema["$ref"]
        if not isinstance(ref, str) or not ref.startswith("#") or ref in seen:
            break
        target: Any = root
        for part in ref[1:].lstrip("/").split("/") if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise KeyError(f"unresolvable $ref {ref!r}")
            target = target[part]
        seen = seen + (ref,)
        merged = dict(target) if isinstance(target, dict) else {}
        merged.update({k: v for k, v in schema.items() if k != "$ref"})
        merged.setdefault("x-ref", ref)
        schema = merged
    return schema, seen


def _alternatives(schema: dict) -> list:
    return list(schema.get("oneOf") or []) + list(schema.get("anyOf") or [])


def _key_name(parent_key: str, schema: dict) -> str:
    return schema.get("x-key-name") or MAP_KEY_NAMES.get(parent_key, "name")


def _children(root: dict, node: _Node) -> Iterator[_Node]:
    """Direct sub-keys of ``node``: properties, the map value, array items (and those of oneOf alternatives)."""
    yield from _children_of(root, node.path, node.schema, node.refs, set())


def _children_of(root: dict, path: str, s: dict, refs: tuple[str, ...], seen: set) -> Iterator[_Node]:
    prefix = f"{path}." if path else ""
    required = set(s.get("required") or [])
    for key, sub in (s.get("properties") or {}).items():
        if key in seen:
            continue
        seen.add(key)
        res, r = _resolve(root, sub, refs)
        yield _Node(f"{prefix}{key}", res, sub if isinstance(sub, dict) else {}, True, key in required, r)
    ap = s.get("additionalProperties")
    if isinstance(ap, dict) and path and "<map>" not in seen:
        seen.add("<map>")
        res, r = _resolve(root, ap, refs)
        leaf = path.rsplit(".", 1)[-1]
        yield _Node(f"{path}.<{_key_name(leaf, s)}>", res, ap, False, False, r)
    items = s.get("items")
    if isinstance(items, dict) and path:
        res, r = _resolve(root, items, refs)
        if _is_container(res) and "<items>" not in seen:
            seen.add("<items>")
            yield _Node(f"{path}[]", res, items, False, False, r)
    for alt in _alternatives(s):
        res, r = _resolve(root, alt, refs)
        if res.get("properties") or isinstance(res.get("additionalProperties"), dict):
            yield from _children_of(root, path, res, r, seen)


def _is_container(s: dict) -> bool:
    """Whether ``s`` has sub-keys of its own (and so gets a table)."""
    if s.get("properties") or isinstance(s.get("additionalProperties"), dict):
        return True
    items = s.get("items")
    if isinstance(items, dict) and (items.get("properties") or isinstance(items.get("additionalProperties"), dict)
                                    or "$ref" in items):
        return True
    return any(isinstance(a, dict) and (a.get("properties") or "$ref" in a) for a in _alternatives(s))


def _json(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False)


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


def _unique(xs: list[str]) -> list[str]:
    return list(dict.fromkeys(xs))


def type_of(schema: dict, root: dict | None = None, _refs: tuple[str, ...] = ()) -> str:
    """A short type text: ``integer``, ``string or null``, ``array of number``, ``map of string``,
    ``object (#/$defs/recipe)``; from ``type``, ``enum``/``const``, ``oneOf``/``anyOf`` and ``$ref``."""
    root = root if root is not None else schema
    s, refs = _resolve(root, schema, _refs)
    ref = f" ({s['x-ref']})" if "x-ref" in s else ""
    t = s.get("type")
    if t is not None:
        types = [t] if isinstance(t, str) else list(t)
        out = []
        for ty in types:
            if ty == "array" and isinstance(s.get("items"), dict):
                out.append(f"array of {type_of(s['items'], root, refs)}")
            elif ty == "object" and isinstance(s.get("additionalProperties"), dict) and not s.get("properties"):
                out.append(f"map of {type_of(s['additionalProperties'], root, refs)}")
            else:
                out.append(ty)
        return " or ".join(out) + ref
    if "enum" in s:
        return " or ".join(_unique([_json_type(v) for v in s["enum"]])) + ref
    if "const" in s:
        return _json_type(s["const"]) + ref
    alts = _alternatives(s)
    if alts:
        return " or ".join(_unique([type_of(a, root, refs) for a in alts])) + ref
    if s.get("properties"):
        return "object" + ref
    return "any" + ref


def allowed_of(schema: dict, root: dict | None = None, _refs: tuple[str, ...] = ()) -> str:
    """Constraints as text: enum/const values, numeric bounds, lengths, item and entry counts."""
    root = root if root is not None else schema
    s, refs = _resolve(root, schema, _refs)
    parts: list[str] = []
    if "const" in s:
        parts.append(f"`{_json(s['const'])}`")
    if "enum" in s:
        parts.append("one of " + ", ".join(f"`{_json(v)}`" for v in s["enum"]))
    for kw, op in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<")):
        if kw in s and not isinstance(s[kw], bool):
            parts.append(f"{op} {_json(s[kw])}")
    if "multipleOf" in s:
        parts.append(f"multiple of {_json(s['multipleOf'])}")
    for kw, text in (("minLength", "length ≥ {}"), ("maxLength", "length ≤ {}"),
                     ("minItems", "≥ {} items"), ("maxItems", "≤ {} items"),
                     ("minProperties", "≥ {} entries"), ("maxProperties", "≤ {} entries")):
        if kw in s:
            parts.append(text.format(_json(s[kw])))
    if s.get("uniqueItems"):
        parts.append("unique items")
    if "pattern" in s:
        parts.append(f"pattern `{s['pattern']}`")
    items = s.get("items")
    if isinstance(items, dict):
        inner = allowed_of(items, root, refs)
        if inner:
            parts.append(f"items: {inner}")
    alts = _alternatives(s)
    if alts:
        texts = []
        for a in alts:
            inner = allowed_of(a, root, refs)
            if inner:
                texts.append(f"{type_of(a, root, refs)}: {inner}" if len(alts) > 1 else inner)
        if texts:
            parts.append("; ".join(texts))
    return ", ".join(parts)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _row(root: dict, node: _Node) -> str:
    s = node.schema
    default = f"`{_json(s['default'])}`" if "default" in s else ""
    allowed = allowed_of(node.raw, root) if node.raw else allowed_of(s, root)
    if node.required:
        allowed = "**required**" + (f", {allowed}" if allowed else "")
    desc = _description(node)
    return "| " + " | ".join(_cell(c) for c in (f"`{node.path}`", type_of(node.raw or s, root), default, allowed,
                                                   desc)) + " |"


def _table(root: dict, rows: list[_Node]) -> list[str]:
    return ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS), *(_row(root, n) for n in rows)]


def _description(node: _Node) -> str:
    return node.raw.get("description", node.schema.get("description", ""))


def _tables(root: dict, node: _Node, top: bool, desc: str | None = None) -> list[str]:
    """The table of ``node`` (with its own row first when ``top``), then those of its container children.

    A nested map whose only sub-key is its value, itself an object, gets no table of its own: its
    value's table comes instead, under the map's description.
    """
    kids = list(_children(root, node))
    out: list[str] = []
    if not top:
        desc = desc or _description(node)
        if len(kids) == 1 and not kids[0].named and _is_container(kids[0].schema):
            return _tables(root, kids[0], top=False, desc=_description(kids[0]) or desc)
        if not kids:
            return out
        out += ["", f"### `{node.path}`", ""]
        if desc:
            out += [_cell(desc), ""]
    out += _table(root, ([node] if top else []) + kids)
    for kid in kids:
        if _is_container(kid.schema):
            out += _tables(root, kid, top=False)
    return out


def render(schema: dict, source: str = SCHEMA_PATH) -> str:
    """The Markdown configuration reference of ``schema`` (a JSON schema as a dict).

    Args:
        schema: the config schema (``peftbench.config.load_schema()``).
        source: the schema's path, named in the header line.

    Returns:
        Markdown text ending in a newline: a header line saying it is generated, the schema's
        description, then one section per top-level key.
    """
    lines = ["# Configuration reference", "",
             f"_Generated from `{source}` by `{REGENERATE}`; do not edit by hand._", ""]
    if schema.get("description"):
        lines += [_cell(schema["description"]), ""]
    lines += ["Columns: **key path** (dotted; `<task>`, `<method>`, `<name>` stand for a map key you choose), "
              "**type**, **default** (filled in when the key is absent), **allowed** (values and bounds), "
              "**description**.", ""]
    root_node = _Node("", schema, schema, False, False, ())
    for node in _children(schema, root_node):
        lines += [f"## `{node.path}`", ""]
        lines += _tables(schema, node, top=True)
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def undocumented(schema: dict) -> list[str]:
    """Dotted paths of every property (a ``properties`` entry, at any depth, through ``$ref``\\ s and
    map values) that has no ``description``, on the property itself or on its ``$ref`` target."""
    out: list[str] = []

    def walk(node: _Node) -> None:
        for kid in _children(schema, node):
            if kid.named and not (kid.raw.get("description") or kid.schema.get("description")):
                out.append(kid.path)
            walk(kid)

    walk(_Node("", schema, schema, False, False, ()))
    return out


def render_method_options() -> str:
    """Markdown tables of every method's typed options (``method_options.<method>.<option>``):
    type, default and help sentence, from each method's ``Options`` dataclass.

    Imports every method module (and so PyTorch), unlike :func:`render`.
    """
    import dataclasses
    import typing

    from .methods import METHOD_TABLE, get_method
    from .methods.options import _type_name

    lines = ["", "## `method_options.<method>`: typed options per method", "",
             "Declared next to each method (`workflow/peftbench/methods/<module>.py`, class `Options`); "
             "checked when the DAG is planned.", ""]
    for info in METHOD_TABLE:
        cls = get_method(info.name).options_cls
        fields = dataclasses.fields(cls)
        lines += [f"### `method_options.{info.name}` ({info.label})", ""]
        if not fields:
            lines += ["No options.", ""]
            continue
        hints = typing.get_type_hints(cls)
        lines += ["| key path | type | default | description |", "|---|---|---|---|"]
        for f in fields:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"| `method_options.{info.name}.{f.name}` | {_cell(_type_name(hints[f.name]))} | "
                         f"`{_json(default)}` | {_cell(f.metadata.get('help', ''))} |")
        lines.append("")
    return "\n".join(lines)


def reference(schema: dict, source: str = SCHEMA_PATH) -> str:
    """The whole committed reference: :func:`render` of the schema, then
    :func:`render_method_options`."""
    return render(schema, source) + render_method_options()
