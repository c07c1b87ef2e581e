"""Loading, validating and resolving the workflow configuration.

The JSON schema (``workflow/schemas/config.schema.yaml``) checks structure, types and ranges and
fills defaults; :func:`check` adds what a schema cannot know (registered methods, the GLUE task
table, model names). :func:`recipe_for` resolves one run's training recipe with the precedence
``training.defaults`` < ``training.tasks.<task>`` < ``training.methods.<method>`` <
``training.tasks.<task>.methods.<method>``, plus ``data.max_*_samples`` and ``methods.<method>``
options.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"
TOKENIZE_KEYS = ("max_length",)


class ConfigError(ValueError):
    """A config value that is not allowed; the message names key, value and what is allowed."""


def load_schema() -> dict:
    """The config JSON schema as a dict."""
    return yaml.safe_load(SCHEMA.read_text())


def validate(config: dict) -> dict:
    """Validate ``config`` against the schema (filling defaults) and :func:`check` it.

    Returns:
        The config with defaults filled in (a deep copy).

    Raises:
        ConfigError: the first problem, as ``<key path>: <value> — <what is allowed>``.
    """
    import jsonschema

    cfg = copy.deepcopy(config)
    schema = load_schema()
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
    """Cross-field checks the schema cannot express; expands ``grid.methods: all`` in place.

    Raises:
        ConfigError: unknown method or task, a grid model missing from ``models:``, options for a
            method that does not exist, an unknown method option.
    """
    from .methods import METHODS
    from .tasks import TASKS

    grid = cfg["grid"]
    if grid["methods"] == "all":
        grid["methods"] = list(METHODS)
    for name in grid["models"]:
        if name not in cfg["models"]:
            raise ConfigError(f"config key grid.models: {name!r} is not a key of models: "
                              f"(known: {sorted(cfg['models'])}); add `{name}: <hub id, directory or package:NAME>` under models:")
    for t in grid["tasks"]:
        if t not in TASKS:
            raise ConfigError(f"config key grid.tasks: unknown task {t!r}; allowed: {sorted(TASKS)}")
    for m in grid["methods"]:
        if m not in METHODS:
            raise ConfigError(f"config key grid.methods: unknown method {m!r}; allowed: {sorted(METHODS)}")
    for m, opts in (cfg.get("methods") or {}).items():
        if m not in METHODS:
            raise ConfigError(f"config key methods.{m}: unknown method {m!r}; allowed: {sorted(METHODS)}")
        allowed = set(METHODS[m].default_options)
        for k in opts or {}:
            if k not in allowed:
                raise ConfigError(f"config key methods.{m}.{k}: unknown option; allowed: {sorted(allowed) or 'none'}")
    for block in ("tasks",):
        for t in (cfg["training"].get(block) or {}):
            if t not in TASKS:
                raise ConfigError(f"config key training.tasks.{t}: unknown task; allowed: {sorted(TASKS)}")
    ref = cfg.get("analysis", {}).get("reference_method")
    if ref is not None and ref not in METHODS:
        raise ConfigError(f"config key analysis.reference_method: unknown method {ref!r}; allowed: {sorted(METHODS)}")


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
    tr = cfg["training"]
    tcfg = dict((tr.get("tasks") or {}).get(task) or {})
    per_task_methods = tcfg.pop("methods", None) or {}
    layers = [tr.get("defaults") or {}, tcfg]
    if method is not None:
        layers += [(tr.get("methods") or {}).get(method) or {}, per_task_methods.get(method) or {}]
    return layers


def max_length(cfg: dict, task: str) -> int:
    """Tokenisation length for ``task`` (tokens)."""
    out = None
    for layer in _layers(cfg, task, None):
        out = layer.get("max_length", out)
    return int(out)


def recipe_for(cfg: dict, task: str, method: str) -> dict[str, Any]:
    """The training recipe of (task, method) as a dict for :class:`peftbench.train.Recipe`."""
    r: dict[str, Any] = {}
    for layer in _layers(cfg, task, method):
        r.update({k: v for k, v in layer.items() if k not in TOKENIZE_KEYS})
    data = cfg.get("data") or {}
    r["max_train_samples"] = data.get("max_train_samples")
    r["max_eval_samples"] = data.get("max_eval_samples")
    r["method_options"] = dict((cfg.get("methods") or {}).get(method) or {})
    return r
