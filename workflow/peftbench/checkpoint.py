"""Checkpoint and resume of one run (bitwise on a CPU), and reload of a finished run.

A checkpoint (``checkpoint.pt`` in the run's checkpoint directory, written atomically) holds the
trainable parameters (and any parameter that ever was trainable), optimizer and scheduler states,
the RNG states (torch, CUDA, numpy, the data-order generator), the loop's :class:`Progress` and
:meth:`Method.checkpoint_state`. It carries a :func:`fingerprint` of what defines the run, so a
checkpoint of another configuration is never resumed.

A finished run is reloaded (:func:`load_trained`, the OOD stage) along the same path: the method
state the run wrote at its end (``method_state.pt``, :meth:`Method.checkpoint_state`) is restored
first, so a method that changed its structure during training (GLoRA's re-allocated ranks, AdaLoRA's
rank pattern, phased LoRA's frozen factors) rebuilds it, then ``adapter.safetensors`` is loaded.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .methods import LoopState

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Everything of the loop's progress that a checkpoint must carry besides tensors."""

    epoch: int = 0            # epoch being run
    b_next: int = 0           # next batch index within that epoch
    gen_state: Any = None     # data-order generator state at the start of ``epoch``
    curve: list = field(default_factory=list)
    gradrows: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    last_finite: float = float("nan")
    train_s: float = 0.0
    eval_s: float = 0.0
    seen: int = 0
    steps: int = 0            # optimizer steps taken
    loss_sum: float = 0.0     # training loss summed since the last logged step
    n_acc: int = 0
    compile_s: float = 0.0    # seconds of steps that compiled or recorded a graph (not in train_s)
    compile_seen: int = 0     # examples of those steps (not in samples_per_s)
    shape_calls: dict = field(default_factory=dict)  # batch shape -> compiled calls so far
    logits_last: Any = None   # (epoch, {split: (n, C) float32 logits}) of the latest evaluation
    logits_best: Any = None   # (epoch, logits, main metric) of the first best evaluation


def fingerprint(*parts) -> str:
    """A hash of what defines a run; a checkpoint of another configuration is not resumed."""
    import hashlib
    import json

    raw = json.dumps([dataclasses.asdict(x) if dataclasses.is_dataclass(x) else str(x) for x in parts],
                     sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


class Checkpointer:
    """Saves and restores one run's last checkpoint (``checkpoint.pt``, written atomically).

    A checkpoint holds the trainable parameters (and any parameter that ever was trainable),
    optimizer and scheduler states, the RNG states (torch, CUDA, numpy, the data-order
    generator), the loop's progress and :meth:`Method.checkpoint_state`.
    """

    def __init__(self, directory: str | Path, fingerprint: str):
        self.dir = Path(directory)
        self.path = self.dir / "checkpoint.pt"
        self.fingerprint = fingerprint

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, model, method, state: LoopState, p: Progress) -> None:
        from .io import atomic_path

        payload = {
            "fingerprint": self.fingerprint,
            "step": state.step,
            "params": {n: q.detach().cpu().clone() for n, q in model.named_parameters() if q.requires_grad},
            "method": method.checkpoint_state(model),
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "progress": p.__dict__,
        }
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            torch.save(payload, tmp)
        log.info("checkpoint at step %d -> %s", state.step, self.path)

    def load(self, model, method, state: LoopState, gen: torch.Generator, p: Progress,
             new_optimizer: Callable[[], tuple[torch.optim.Optimizer, Any]]) -> bool:
        """Restore the checkpoint into the freshly built run.

        ``new_optimizer()`` builds AdamW and its schedule over the method's current parameter
        groups (after :meth:`Method.restore_checkpoint_state`, which may resize modules); their
        saved states are then loaded into them.

        Returns:
            False (and a warning) if it belongs to another configuration or cannot be read.

        Raises:
            RuntimeError: a saved parameter does not fit the model (names the checkpoint to delete).
        """
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as exc:  # a truncated file cannot happen (atomic), but be safe
            log.warning("cannot read checkpoint %s (%s); starting from scratch", self.path, exc)
            return False
        if payload.get("fingerprint") != self.fingerprint:
            log.warning("checkpoint %s belongs to another configuration of this run; starting from scratch", self.path)
            return False
        method.restore_checkpoint_state(model, payload["method"])
        named = dict(model.named_parameters())
        for n, t in payload["params"].items():
            if n not in named or named[n].shape != t.shape:
                raise RuntimeError(f"checkpoint {self.path}: parameter {n} does not fit the model "
                                   f"({None if n not in named else tuple(named[n].shape)} vs {tuple(t.shape)}); "
                                   f"delete the checkpoint to start over")
            with torch.no_grad():
                named[n].copy_(t.to(named[n].device))
        # The schedule first (it writes the step-0 lr into the groups), then the saved groups' lr.
        state.optimizer, state.scheduler = new_optimizer()
        state.optimizer.load_state_dict(payload["optimizer"])
        state.scheduler.load_state_dict(payload["scheduler"])
        state.step = payload["step"]
        p.__dict__.update(payload["progress"])
        gen.set_state(p.gen_state)
        torch.set_rng_state(payload["rng"]["torch"])
        np.random.set_state(payload["rng"]["numpy"])
        if payload["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
        return True

    def remove(self) -> None:
        if self.path.is_file():
            self.path.unlink()
        try:
            self.dir.rmdir()
        except OSError:
            pass


def load_adapter(model, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy saved tensors (``adapter.safetensors``: :meth:`Method.state_to_save`) into ``model``'s
    parameters of the same names, in place.

    Raises:
        ValueError: a tensor the model lacks or whose shape differs (names it and ``source``).
    """
    named = dict(model.named_parameters())
    for n, t in tensors.items():
        if n not in named or tuple(named[n].shape) != tuple(t.shape):
            raise ValueError(f"{source}: tensor {n} {tuple(t.shape)} does not fit the rebuilt model "
                             f"({None if n not in named else tuple(named[n].shape)})")
        with torch.no_grad():
            named[n].copy_(t.to(named[n].device))


def load_trained(model, method, run_dir: str | Path) -> list[str]:
    """Load a finished run's trained state into ``model``, freshly built by ``method`` for the run.

    As the resume path of :meth:`Checkpointer.load`: :meth:`Method.restore_checkpoint_state` with
    the run's ``method_state.pt`` (the method's :meth:`Method.checkpoint_state` at the end of
    training) re-applies structural changes made during training (GLoRA resizes its LoRA factors to
    the re-allocated ranks), then every tensor of ``adapter.safetensors``
    (:meth:`Method.state_to_save`) is copied into the parameter of that name.

    Returns:
        The names of the loaded tensors.

    Raises:
        FileNotFoundError: ``adapter.safetensors`` or ``method_state.pt`` missing in ``run_dir``
            (names the file; a run trained before ``method_state.pt`` existed must be retrained).
        ValueError: an adapter tensor the model lacks, or whose shape differs (names it and both
            shapes).
    """
    from safetensors.torch import load_file

    from .vocab import RUN_FILES

    run_dir = Path(run_dir)
    adapter, state_file = run_dir / RUN_FILES["adapter"], run_dir / RUN_FILES["method_state"]
    for f in (adapter, state_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found; (re)train the run (rule train) to write it")
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    method.restore_checkpoint_state(model, state)
    saved = load_file(adapter)
    load_adapter(model, saved, f"{adapter} ({method.name} model, after restoring {state_file.name})")
    return list(saved)
