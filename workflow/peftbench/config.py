"""Loading, validating and resolving the workflow configuration.

The JSON schema (``workflow/schemas/config.schema.yaml``) checks structure, types and ranges and
holds every default; :func:`check` adds what a schema cannot know (the method table, the GLUE task
table, model names, each method's typed options). :func:`recipe_for` and :func:`runtime_for`
resolve one run's :class:`~peftbench.recipe.Recipe` (tracked) and
:class:`~peftbench.recipe.Runtime` (speed knobs, untracked) through the layers, least specific
first:

1. ``training.defaults``
2. ``training.adapters`` (every adapter method, i.e. every method that is not budget-free)
3. ``training.tasks.<task>``
4. ``training.tasks.<task>.adapters``
5. ``training.methods.<method>``
6. ``training.tasks.<task>.methods.<method>``

plus ``data.max_*_samples`` and the method's options (``method_options.<method>``).

Snakemake 9 passes nested ``--config`` values as strings (``--config 'data={max_train_samples:
64}'`` gives ``"64"``); :func:`coerce` turns them into the types the schema expects before
validation, so overrides work as a user types them.
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import yaml

from .budget import DENOMINATORS, Budget, BudgetError
from .methods.options import OptionsError, parse_scalar
from .recipe import RECIPE_KEYS, RUNTIME_KEYS, TOKENIZE_KEYS, Recipe, Runtime

SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A config value that is not allowed; the message names key, value and what is allowed."""


@functools.lru_cache(maxsize=1)
def _parsed_schema() -> dict:
    """The schema file parsed once per process (YAML parsing it took ~0.15 s; validating the
    research config asked for it 385 times, once per recipe default, before this cache)."""
    return yaml.safe_load(SCHEMA.read_text())


def load_schema() -> dict:
    """The config JSON schema as a dict (a fresh deep copy on every call: callers may mutate it)."""
    return copy.deepcopy(_parsed_schema())


def schema_defaults(*path: str) -> dict[str, Any]:
    """The schema's ``default`` of every property of the object at ``path`` (e.g.
    ``schema_defaults("analysis")``, ``schema_defaults("training", "defaults")``).

    The schema is the only place that states a default; code that needs one (argparse, dataclass
    defaults for runs without Snakemake) reads it here.

    Raises:
        KeyError: ``path`` names no object of the schema.
    """
    node = _parsed_schema()  # read-only here: the defaults below are deep-copied
    for key in path:
        node = node["properties"][key]
    return {k: copy.deepcopy(v["default"]) for k, v in node.get("properties", {}).items() if "default" in v}


def coerce(config: dict, schema: dict | None = None) -> dict:
    """A copy of ``config`` with string scalars turned into the types the schema expects there.

    Snakemake 9 parses nested ``--config`` values with YAML's base loader, so every scalar inside
    a mapping or list arrives as a string (``"64"``, ``"true"``, ``"null"``, ``["1", "2"]``). Where
    the schema does not accept a string (or accepts null and the string is ``null``/``~``), the
    string is parsed as null, a boolean, an integer or a number, in that order of what the schema
    allows; anything else is left for validation to reject with its key. Free-form sections
    (``method_options``) are coerced against each method's typed options in :func:`check`.
    """
    root = schema or load_schema()
    return _coerce(copy.deepcopy(config), root, root)


def _resolve(node: dict, root: dict) -> dict:
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        target = root
        for part in ref.lstrip("#/").split("/"):
            target = target[part]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node if isinstance(node, dict) else {}


def _branches(node: dict, root: dict) -> list[dict]:
    node = _resolve(node, root)
    subs = node.get("oneOf") or node.get("anyOf")
    if subs:
        return [b for s in subs for b in _branches(s, root)]
    return [node]


def _json_types(node: dict, root: dict) -> set[str]:
    types: set[str] = set()
    for b in _branches(node, root):
        t = b.get("type")
        if t is not None:
            types |= {t} if isinstance(t, str) else set(t)
        for v in ([b["const"]] if "const" in b else []) + list(b.get("enum", [])):
            types.add("string" if isinstance(v, str) else "number" if isinstance(v, (int, float)) else "other")
    return types


def _coerce(value: Any, node: dict, root: dict) -> Any:
    branches = _branches(node, root)
    if isinstance(value, dict):
        obj = next((b for b in branches if "properties" in b or "additionalProperties" in b), {})
        props, extra = obj.get("properties", {}), obj.get("additionalProperties")
        return {k: _coerce(v, props[k] if k in props else (extra if isinstance(extra, dict) else {}), root)
                for k, v in value.items()}
    if isinstance(value, list):
        arr = next((b for b in branches if "items" in b), {})
        return [_coerce(v, arr.get("items", {}), root) for v in value]
    if isinstance(value, str):
        return parse_scalar(value, _json_types(node, root))
    return value


def validate(config: dict) -> dict:
    """:func:`coerce`, validate ``config`` against the schema (filling defaults) and :func:`check` it.

    Returns:
        The config with defaults filled in (a deep copy).

    Raises:
        ConfigError: the first problem, as ``<key path>: <value> — <what is allowed>``.
    """
    import jsonschema

    schema = load_schema()
    cfg = coerce(config, schema)
    validator_cls = jsonschema.validators.validator_for(schema)
    validator = _extend_with_default(validator_cls)(schema)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        key = ".".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ConfigError(f"config key {key}: {e.message}")
    check(cfg)
    return cfg


def _extend_with_default(validator_cls):
    """A validator that also sets ``default`` values from the schema (jsonschema FAQ recipe)."""
    import jsonschema

    validate_props = validator_cls.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub and prop not in instance:
                    instance[prop] = copy.deepcopy(sub["default"])
        yield from validate_props(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_cls, {"properties": set_defaults})


def check(cfg: dict) -> None:
    """Cross-field checks the schema cannot express, in place: expands ``grid.methods: all`` and
    sets ``method_options.<m>`` of every registered method to its full typed options (defaults
    filled in, strings coerced), so a bad option fails here, when the DAG is planned, and every
    run's recipe carries its method's complete options.

    Builds every method's options class, which imports the method modules (and PyTorch).

    Also checks every ``grid.budgets`` entry (:meth:`peftbench.budget.Budget.parse`: a number in
    (0, 100) or ``r<N>``; a numeric string from ``--config`` becomes a number) and
    ``grid.budget_denominator`` (:data:`peftbench.budget.DENOMINATORS`).

    Raises:
        ConfigError: unknown method or task, an encoder-only method paired with a causal-LM task
            (:func:`check_tracks`), a grid model missing from ``models:``, a bad or
            duplicated budget, an unknown budget denominator, a per-method block for a method
            that does not exist, an unknown option or a bad option value, or a bad ``tuning:``
            search space (:func:`peftbench.tuning.check_tuning`), or a bad ``generator:`` section
            (:func:`peftbench.generator.settings.check`).
    """
    from .methods import METHODS, get_method
    from .vocab import TASKS

    def known(kind: str, key: str, name: str, table) -> None:
        if name not in table:
            raise ConfigError(f"config key {key}: unknown {kind} {name!r}; allowed: {list(table)}")

    grid = cfg["grid"]
    if grid["methods"] == "all":
        grid["methods"] = list(METHODS)
    for name in grid["models"]:
        if name not in cfg["models"]:
            raise ConfigError(f"config key grid.models: {name!r} is not a key of models: "
                              f"(known: {sorted(cfg['models'])}); add `{name}: <hub id, directory or package:NAME>` under models:")
    for t in grid["tasks"]:
        known("task", "grid.tasks", t, TASKS)
    for m in grid["methods"]:
        known("method", "grid.methods", m, METHODS)
    check_tracks(grid["tasks"], grid["methods"])
    grid["budgets"] = check_budgets(grid["budgets"])
    if grid["budget_denominator"] not in DENOMINATORS:
        raise ConfigError(f"config key grid.budget_denominator: {grid['budget_denominator']!r} is not allowed; "
                          f"allowed: {list(DENOMINATORS)}")
    tr = cfg["training"]
    for m in tr.get("methods") or {}:
        known("method", f"training.methods.{m}", m, METHODS)
    for t, tcfg in (tr.get("tasks") or {}).items():
        known("task", f"training.tasks.{t}", t, TASKS)
        for m in (tcfg or {}).get("methods") or {}:
            known("method", f"training.tasks.{t}.methods.{m}", m, METHODS)
    opts = cfg.setdefault("method_options", {})
    for m in opts:
        known("method", f"method_options.{m}", m, METHODS)
    for m in METHODS:
        try:
            opts[m] = get_method(m).options_cls.from_dict(opts.get(m), where=f"method_options.{m}").to_dict()
        except OptionsError as exc:
            raise ConfigError(str(exc)) from None
    known("method", "analysis.reference_method", cfg["analysis"]["reference_method"], METHODS)
    check_one_compile_setting(cfg)
    from .tuning import TuningError, check_tuning

    try:
        check_tuning(cfg)
    except TuningError as exc:
        raise ConfigError(str(exc)) from None
    from .ood import check_ood

    for t, sets in (cfg.get("ood") or {}).get("sets", {}).items():
        known("task", f"ood.sets.{t}", t, TASKS)
        for name in sets:
            try:
                check_ood(t, name)
            except ValueError as exc:
                raise ConfigError(f"config key ood.sets.{t}: {exc}") from None
    from .generator.settings import GeneratorConfigError, check as check_generator

    try:
        check_generator(cfg)
    except GeneratorConfigError as exc:
        raise ConfigError(str(exc)) from None


def check_tracks(tasks: list[str], methods: list[str]) -> None:
    """Every method of the grid can run on every task's track: a causal-LM task (decoder,
    generation) takes only methods whose table line has no ``encoder_only`` reason.

    Raises:
        ConfigError: names the method, the causal task, the reason and the fix.
    """
    from .methods import METHODS
    from .vocab import TASKS

    causal = [t for t in tasks if TASKS[t].is_causal]
    for m in methods:
        why = METHODS[m].encoder_only
        if causal and why:
            ok = [n for n, i in METHODS.items() if not i.encoder_only]
            raise ConfigError(f"config key grid.methods: method {m!r} cannot run on the causal-LM task(s) "
                              f"{causal}: {why}. Fix: drop it from grid.methods (methods of the causal track: "
                              f"{ok}), or run it in a grid of encoder-track tasks")


#: Runtime keys that must be the same for every method compared on a task (a comparison of
#: speed or of results between a compiled and an eager method would not be fair).
COMPILE_KEYS = ("compile", "compile_mode", "compile_backend")


def check_one_compile_setting(cfg: dict) -> None:
    """Every method of the grid gets the same ``compile`` / ``compile_mode`` / ``compile_backend``
    on each task (methods that cannot compile still fall back to eager and record it in
    ``compile_note``).

    Raises:
        ConfigError: a per-method override makes them differ; names the task and the methods.
    """
    for task in cfg["grid"]["tasks"]:
        settings: dict[tuple, list[str]] = {}
        for m in cfg["grid"]["methods"]:
            rt = runtime_for(cfg, task, m)
            settings.setdefault(tuple(getattr(rt, k) for k in COMPILE_KEYS), []).append(m)
        if len(settings) > 1:
            shown = "; ".join(f"{dict(zip(COMPILE_KEYS, k))} for {ms}" for k, ms in settings.items())
            raise ConfigError(f"config key training: the methods of task {task!r} get different compile settings "
                              f"({shown}); one compile setting for all methods in a comparison: set compile, "
                              f"compile_mode and compile_backend in training.defaults or training.tasks.{task}, "
                              f"not per method or in training.adapters")


def check_budgets(budgets: list) -> list:
    """``grid.budgets`` checked and in canonical form: numbers stay numbers (a numeric string from
    ``--config`` becomes a float), ``r<N>`` stays a string.

    Raises:
        ConfigError: an entry that is not a budget (names ``grid.budgets.<i>``, the value and what
            is allowed), the full budget 100, or two entries with the same token (``0.5`` and ``"0.5"``).
    """
    out, seen = [], {}
    for i, value in enumerate(budgets):
        try:
            b = Budget.parse(value)
            if b.is_full:
                raise BudgetError(f"budget {value!r}: 100 is the full budget of budget-free methods, not a grid "
                                  f"budget; give a percentage in (0, 100) of grid.budget_denominator or a LoRA-rank "
                                  f"equivalent r<N>")
        except BudgetError as exc:
            raise ConfigError(f"config key grid.budgets.{i}: {exc}") from None
        if b.token in seen:
            raise ConfigError(f"config key grid.budgets.{i}: {value!r} is the same budget as grid.budgets.{seen[b.token]} "
                              f"({b.token}); list each budget once")
        seen[b.token] = i
        out.append(b.token if b.is_rank else (value if isinstance(value, (int, float)) else b.value))
    return out


def load(path: str | Path, overrides: dict | None = None) -> dict:
    """Read a YAML config, apply ``overrides`` (nested dict, merged) and :func:`validate` it."""
    cfg = yaml.safe_load(Path(path).read_text()) or {}
    if overrides:
        cfg = merge(cfg, overrides)
    return validate(cfg)


def merge(base: dict, over: dict) -> dict:
    """Recursive dict merge; values of ``over`` win."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _layers(cfg: dict, task: str, method: str | None) -> list[dict]:
    """The recipe layers of (task, method), least specific first (see the module docstring)."""
    from .methods import method_info

    tr = cfg["training"]
    tcfg = dict((tr.get("tasks") or {}).get(task) or {})
    task_adapters = tcfg.pop("adapters", None) or {}
    task_methods = tcfg.pop("methods", None) or {}
    adapter = method is not None and method_info(method).is_adapter
    layers = [tr.get("defaults") or {}, (tr.get("adapters") or {}) if adapter else {}, tcfg,
              task_adapters if adapter else {}]
    if method is not None:
        layers += [(tr.get("methods") or {}).get(method) or {}, task_methods.get(method) or {}]
    return layers


def _resolve_keys(cfg: dict, task: str, method: str | None, keys: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for layer in _layers(cfg, task, method):
        out.update({k: v for k, v in layer.items() if k in keys})
    return out


def max_length(cfg: dict, task: str) -> int:
    """Tokenisation length for ``task`` (tokens): ``training.defaults`` < ``training.tasks.<task>``."""
    return int(_resolve_keys(cfg, task, None, TOKENIZE_KEYS)["max_length"])


def recipe_for(cfg: dict, task: str, method: str) -> Recipe:
    """The tracked training recipe of (task, method) from a validated config.

    The method options are those :func:`check` built (defaults filled in).
    """
    r = _resolve_keys(cfg, task, method, RECIPE_KEYS)
    data = cfg["data"]
    return Recipe(**r, max_train_samples=data["max_train_samples"], max_eval_samples=data["max_eval_samples"],
                  resample_per_seed=bool(data["resample_per_seed"]),
                  method_options=dict((cfg.get("method_options") or {}).get(method) or {}))


def runtime_for(cfg: dict, task: str, method: str) -> Runtime:
    """The untracked runtime options (speed and logging knobs, and the ``tracking:`` section) of
    (task, method)."""
    return Runtime.from_dict({**_resolve_keys(cfg, task, method, RUNTIME_KEYS), "tracking": cfg.get("tracking")})
