"""The ``generator:`` section of the config as a typed object, and its planning checks. Torch-free.

Defaults live in the schema (``workflow/schemas/config.schema.yaml``, ``generator``); this module
resolves the ``null`` entries against the grid and checks what a schema cannot.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

#: Methods whose adapters the generator can tokenise: peft LoRA with one rank for every adapted
#: matrix (the state dict layout of :mod:`peftbench.generator.params`). AdaLoRA, glora (resized
#: ranks) and the spectral methods store other tensors.
GENERATOR_METHODS: tuple[str, ...] = ("lora", "lora_attn", "lora_mlp")

#: Split names: the in-task split (held-out prompts of every task) and, per held-out task, the
#: leave-one-task-out split (trained on the other tasks' checkpoints only).
IN_TASK = "in_task"
LOTO_PREFIX = "loto_"


class GeneratorConfigError(ValueError):
    """A ``generator:`` value that is not allowed (names the key and the fix)."""


@dataclass(frozen=True)
class GeneratorSettings:
    """The resolved ``generator:`` section (see the schema for every field's meaning)."""

    name: str
    model: str
    method: str
    budget: Any
    tasks: tuple[str, ...]
    seeds: tuple[int, ...]
    encoder: str
    encoder_max_length: int
    token_width: int
    max_tokens: int
    max_checkpoints: int
    samples_per_prompt: int
    train_prompts: int
    validation_prompts: int
    prompt_seed: int
    zero_shot: bool
    latent: tuple[int, int, int]
    blocks: tuple[tuple[tuple[int, int, int], int], ...]
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    mse_weight: float
    l1_weight: float
    seed: int
    checkpoint_every: int

    def splits(self) -> list[str]:
        """Every split: ``in_task``, then ``loto_<task>`` per task when ``zero_shot``."""
        return [IN_TASK] + ([f"{LOTO_PREFIX}{t}" for t in self.tasks] if self.zero_shot else [])

    def to_json(self) -> str:
        """Canonical JSON (tracked rule param)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "GeneratorSettings":
        d = json.loads(text)
        d["tasks"], d["seeds"], d["latent"] = tuple(d["tasks"]), tuple(d["seeds"]), tuple(d["latent"])
        d["blocks"] = tuple((tuple(s), int(k)) for s, k in d["blocks"])
        return cls(**d)


def held_out_task(split: str) -> str | None:
    """The held-out task of a ``loto_<task>`` split, ``None`` for ``in_task``.

    Raises:
        ValueError: neither form.
    """
    if split == IN_TASK:
        return None
    if split.startswith(LOTO_PREFIX):
        return split[len(LOTO_PREFIX):]
    raise ValueError(f"unknown generator split {split!r}; splits are {IN_TASK!r} and {LOTO_PREFIX}<task>")


def resolve(cfg: dict) -> GeneratorSettings:
    """The ``generator:`` section of a schema-validated config, ``null`` entries resolved against
    ``grid`` (model: the first of ``grid.models``; budget: the first of ``grid.budgets``; tasks,
    seeds: the grid's), and checked.

    Raises:
        GeneratorConfigError: a method the generator cannot tokenise or that the grid does not
            train; a model, budget, task or seed outside the grid; zero_shot with fewer than two
            tasks; a last block whose ``length × height`` is not ``max_tokens``; an even kernel.
    """
    g, grid = cfg["generator"], cfg["grid"]

    def fail(key: str, msg: str):
        raise GeneratorConfigError(f"config key generator.{key}: {msg}")

    method = g["method"]
    if method not in GENERATOR_METHODS:
        fail("method", f"{method!r} cannot be tokenised; allowed: {list(GENERATOR_METHODS)} (uniform-rank peft LoRA)")
    if method not in grid["methods"]:
        fail("method", f"{method!r} is not in grid.methods {grid['methods']}; add it so its runs are trained")
    model = g["model"] if g["model"] is not None else grid["models"][0]
    if model not in grid["models"]:
        fail("model", f"{model!r} is not in grid.models {grid['models']}")
    budget = g["budget"] if g["budget"] is not None else grid["budgets"][0]
    from ..budget import Budget

    tokens = {Budget.parse(b).token: b for b in grid["budgets"]}
    if Budget.parse(budget).token not in tokens:
        fail("budget", f"{budget!r} is not in grid.budgets {grid['budgets']}")
    budget = tokens[Budget.parse(budget).token]
    tasks = tuple(g["tasks"] if g["tasks"] is not None else grid["tasks"])
    for t in tasks:
        if t not in grid["tasks"]:
            fail("tasks", f"{t!r} is not in grid.tasks {grid['tasks']}")
    if not tasks:
        fail("tasks", "empty; list at least one task of grid.tasks (two for zero_shot)")
    seeds = tuple(g["seeds"] if g["seeds"] is not None else grid["seeds"])
    for s in seeds:
        if s not in grid["seeds"]:
            fail("seeds", f"{s!r} is not in grid.seeds {grid['seeds']}")
    if g["zero_shot"] and len(tasks) < 2:
        fail("zero_shot", f"leave-one-task-out needs at least two tasks (generator.tasks: {list(tasks)}); "
                          f"add a task or set zero_shot: false")
    blocks = tuple((tuple(int(v) for v in b["shape"]), int(b["kernel"])) for b in g["blocks"])
    for i, (_, k) in enumerate(blocks):
        if k % 2 == 0:
            fail(f"blocks.{i}.kernel", f"{k} is even; 'same' padding needs an odd kernel size")
    length, height, _ = blocks[-1][0]
    if length * height != g["max_tokens"]:
        fail("blocks", f"the last block's length × height ({length} × {height} = {length * height}) must equal "
                       f"generator.max_tokens ({g['max_tokens']}): the output is (length·height) tokens of width D")
    return GeneratorSettings(
        name=g["name"], model=model, method=method, budget=budget, tasks=tasks, seeds=seeds, encoder=g["encoder"],
        encoder_max_length=g["encoder_max_length"], token_width=g["token_width"], max_tokens=g["max_tokens"],
        max_checkpoints=g["max_checkpoints"], samples_per_prompt=g["samples_per_prompt"],
        train_prompts=g["train_prompts"], validation_prompts=g["validation_prompts"], prompt_seed=g["prompt_seed"],
        zero_shot=g["zero_shot"], latent=tuple(g["latent"]), blocks=blocks, epochs=g["epochs"],
        batch_size=g["batch_size"], lr=g["lr"], weight_decay=g["weight_decay"], mse_weight=g["mse_weight"],
        l1_weight=g["l1_weight"], seed=g["seed"], checkpoint_every=g["checkpoint_every"])


def check(cfg: dict) -> None:
    """Planning checks of an enabled ``generator:`` section (nothing when disabled): :func:`resolve`,
    and every generator task's runs save snapshots (the runtime key ``snapshots`` ≥ 1).

    Raises:
        GeneratorConfigError: see :func:`resolve`; a task whose runs of ``generator.method`` save no
            snapshots (names the key to set).
    """
    if not cfg["generator"]["enabled"]:
        return
    s = resolve(cfg)
    from ..config import runtime_for

    for t in s.tasks:
        if runtime_for(cfg, t, s.method).snapshots < 1:
            raise GeneratorConfigError(
                f"config key training: the {s.method} runs of task {t!r} save no adapter snapshots, the generator's "
                f"training data; set training.methods.{s.method}.snapshots (e.g. 8) or training.defaults.snapshots")
