"""The identity of one training run: (model, task, method, budget, seed).

:class:`RunKey` is the one place that knows how a run is written as a directory
(``{model}/{task}/{method}/b{budget}/s{seed}``, the budget as its token: ``b0.5``, ``br8``), as
command-line arguments and as table columns, and that budget-free methods (full fine-tuning) are
stored under the full budget (token ``"100"``). The budget is a :class:`peftbench.budget.Budget`. The
Snakefile's rule paths, the ``train`` CLI, the run's output tables and ``aggregate`` all go
through it, so a run key is never re-encoded or re-parsed anywhere else.

Torch-free.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from .budget import Budget
from .methods import method_info

#: Column names (and order) of the run key in every table.
KEY_COLUMNS: tuple[str, ...] = ("model", "task", "method", "budget", "seed")

#: The run directory below the runs root, as a Snakemake wildcard pattern.
RUN_PATTERN = "{model}/{task}/{method}/b{budget}/s{seed}"

#: Where run directories live.
RUNS_ROOT = "results/runs"
#: Where checkpoints live (outside the run outputs, so Snakemake never deletes them).
CHECKPOINTS_ROOT = "results/checkpoints"


def format_budget(budget: Budget | float | str) -> str:
    """A budget as written in paths: ``0.5`` -> ``"0.5"``, ``1.0`` -> ``"1"``, ``100`` -> ``"100"``,
    ``"r8"`` -> ``"r8"`` (:attr:`Budget.token`).

    Raises:
        peftbench.budget.BudgetError: not a budget (see :meth:`Budget.parse`).
    """
    return Budget.parse(budget).token


def _budget_arg(text: str) -> Budget:
    """``--budget`` of the command line (argparse shows the :class:`BudgetError` message)."""
    try:
        return Budget.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@dataclass(frozen=True, order=True)
class RunKey:
    """One run of the grid.

    Attributes:
        model: a key of ``models:`` in the config.
        task: a task of the task table (:data:`peftbench.vocab.TASKS`: GLUE or causal-LM).
        method: a method key (:data:`peftbench.methods.METHODS`).
        budget: the trainable-parameter budget (a percentage or a LoRA-rank equivalent);
            :meth:`Budget.full` for budget-free methods (use :meth:`of` to get that right).
        seed: the run's seed.
    """

    model: str
    task: str
    method: str
    budget: Budget
    seed: int

    @classmethod
    def of(cls, model: str, task: str, method: str, budget: Budget | float | str, seed: int | str) -> "RunKey":
        """The key of a grid point (budget in any spelling of :meth:`Budget.parse`); a budget-free
        method's budget becomes :meth:`Budget.full` whatever is given.

        Raises:
            KeyError: unknown method.
            peftbench.budget.BudgetError: a budget that is not a percentage in (0, 100) or ``r<N>``,
                or the full budget (100) for a method that is not budget-free.
        """
        if method_info(method).budget_free:
            b = Budget.full()
        else:
            b = Budget.parse(budget)
            if b.is_full:
                from .budget import BudgetError

                raise BudgetError(f"method {method!r}: budget {b.token} is the full budget of budget-free "
                                  f"methods; give a percentage in (0, 100) or a LoRA-rank equivalent r<N>")
        return cls(str(model), str(task), str(method), b, int(seed))

    # -- paths ------------------------------------------------------------------------------------
    @property
    def budget_token(self) -> str:
        """The budget as written in paths and tables (:attr:`Budget.token`)."""
        return self.budget.token

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
            return cls(parts[0], parts[1], parts[2], Budget.parse(parts[3][1:]), int(parts[4][1:]))
        except ValueError:
            raise ValueError(f"{run_dir} is not a run directory (…/{RUN_PATTERN}): the budget is not a "
                             f"percentage or r<N>, or the seed is not a number") from None

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
        parser.add_argument("--budget", type=_budget_arg, required=True,
                            help="trainable-parameter budget: a percentage of the denominator "
                                 "(--budget 0.5) or a LoRA-rank equivalent (--budget r8); ignored by full")
        parser.add_argument("--seed", type=int, required=True)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RunKey":
        """The key from arguments added by :meth:`add_arguments`."""
        return cls.of(args.model_name, args.task, args.method, args.budget, args.seed)

    # -- tables -------------------------------------------------------------------------------------
    def columns(self) -> dict[str, Any]:
        """``{model, task, method, budget, seed}`` as table columns (budget its token string, e.g.
        ``"0.5"``, ``"r8"``, ``"100"``; seed int)."""
        return {"model": self.model, "task": self.task, "method": self.method, "budget": self.budget.token,
                "seed": self.seed}

    def __str__(self) -> str:
        return f"{self.model}/{self.task}/{self.method} b{self.budget_token} s{self.seed}"
