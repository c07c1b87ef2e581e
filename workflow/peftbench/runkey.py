"""The identity of one training run: (model, task, method, budget, seed).

:class:`RunKey` is the one place that knows how a run is written as a directory
(``{model}/{task}/{method}/b{budget}/s{seed}``), as command-line arguments and as table columns,
and that budget-free methods (full fine-tuning) are stored under :data:`FULL_BUDGET`. The
Snakefile's rule paths, the ``train`` CLI, the run's output tables and ``aggregate`` all go
through it, so a run key is never re-encoded or re-parsed anywhere else.

Torch-free.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path, PurePath
from typing import Any

from .methods import FULL_BUDGET, method_info

#: Column names (and order) of the run key in every table.
KEY_COLUMNS: tuple[str, ...] = ("model", "task", "method", "budget", "seed")

#: The run directory below the runs root, as a Snakemake wildcard pattern.
RUN_PATTERN = "{model}/{task}/{method}/b{budget}/s{seed}"

#: Where run directories live.
RUNS_ROOT = "results/runs"
#: Where checkpoints live (outside the run outputs, so Snakemake never deletes them).
CHECKPOINTS_ROOT = "results/checkpoints"


def format_budget(budget: float) -> str:
    """A budget as written in paths: ``0.5`` -> ``"0.5"``, ``1.0`` -> ``"1"``, ``100`` -> ``"100"``."""
    return f"{float(budget):g}"


@dataclass(frozen=True, order=True)
class RunKey:
    """One run of the grid.

    Attributes:
        model: a key of ``models:`` in the config.
        task: a GLUE task (:data:`peftbench.vocab.TASKS`).
        method: a method key (:data:`peftbench.methods.METHODS`).
        budget: trainable-parameter budget in % of backbone parameters; :data:`FULL_BUDGET` for
            budget-free methods (use :meth:`of` to get that right).
        seed: the run's seed.
    """

    model: str
    task: str
    method: str
    budget: float
    seed: int

    @classmethod
    def of(cls, model: str, task: str, method: str, budget: float | str, seed: int | str) -> "RunKey":
        """The key of a grid point; a budget-free method's budget becomes :data:`FULL_BUDGET`.

        Raises:
            KeyError: unknown method.
        """
        b = FULL_BUDGET if method_info(method).budget_free else float(budget)
        return cls(str(model), str(task), str(method), b, int(seed))

    # -- paths ------------------------------------------------------------------------------------
    @property
    def budget_token(self) -> str:
        """The budget as written in paths (:func:`format_budget`)."""
        return format_budget(self.budget)

    @property
    def rel_dir(self) -> str:
        """``{model}/{task}/{method}/b{budget}/s{seed}``."""
        return RUN_PATTERN.format(model=self.model, task=self.task, method=self.method,
                                  budget=self.budget_token, seed=self.seed)

    def run_dir(self, root: str | Path = RUNS_ROOT) -> str:
        """The run directory under ``root`` (default ``results/runs``)."""
        return f"{root}/{self.rel_dir}"

    def checkpoint_dir(self, root: str | Path = CHECKPOINTS_ROOT) -> str:
        """The run's checkpoint directory under ``root`` (default ``results/checkpoints``)."""
        return f"{root}/{self.rel_dir}"

    @staticmethod
    def wildcard_dir(root: str = RUNS_ROOT) -> str:
        """The run directory as a Snakemake pattern: ``results/runs/{model}/.../s{seed}``."""
        return f"{root}/{RUN_PATTERN}"

    @classmethod
    def parse(cls, run_dir: str | Path) -> "RunKey":
        """The key of a run directory ``…/{model}/{task}/{method}/b{budget}/s{seed}``.

        Raises:
            ValueError: the path does not end in that pattern.
        """
        parts = PurePath(run_dir).parts[-5:]
        if len(parts) != 5 or not parts[3].startswith("b") or not parts[4].startswith("s"):
            raise ValueError(f"{run_dir} is not a run directory (…/{RUN_PATTERN})")
        try:
            return cls(parts[0], parts[1], parts[2], float(parts[3][1:]), int(parts[4][1:]))
        except ValueError:
            raise ValueError(f"{run_dir} is not a run directory (…/{RUN_PATTERN}): budget or seed is not a "
                             f"number") from None

    # -- command line -------------------------------------------------------------------------------
    def cli_args(self) -> list[str]:
        """``["--model-name", model, "--task", task, "--method", method, "--budget", b, "--seed", s]``."""
        return ["--model-name", self.model, "--task", self.task, "--method", self.method,
                "--budget", self.budget_token, "--seed", str(self.seed)]

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add the run-key arguments (those of :meth:`cli_args`) to ``parser``."""
        parser.add_argument("--model-name", required=True, help="short model name (a key of models:)")
        parser.add_argument("--task", required=True, help="GLUE task")
        parser.add_argument("--method", required=True, help="method key")
        parser.add_argument("--budget", type=float, required=True,
                            help="trainable-parameter budget, %% of backbone parameters (ignored by full)")
        parser.add_argument("--seed", type=int, required=True)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RunKey":
        """The key from arguments added by :meth:`add_arguments`."""
        return cls.of(args.model_name, args.task, args.method, args.budget, args.seed)

    # -- tables -------------------------------------------------------------------------------------
    def columns(self) -> dict[str, Any]:
        """``{model, task, method, budget, seed}`` as table columns (budget float, seed int)."""
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.model}/{self.task}/{self.method} b{self.budget_token} s{self.seed}"
