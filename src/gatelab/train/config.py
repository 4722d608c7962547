"""The trainer's configuration, its result, and the data protocol it reads."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = ["ResumableIterator", "TrainConfig", "TrainError", "TrainResult"]


class TrainError(RuntimeError):
    """The run cannot start or continue; the message says what to change."""


@runtime_checkable
class ResumableIterator(Protocol):
    """What the trainer needs from its data: batches and a position it can save and restore."""

    def __next__(self) -> Any: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainConfig:
    """Training hyperparameters and run options (maps one-to-one onto a recipe's [train]).

    ``tensorboard = true`` (the default) writes the logged records as TensorBoard scalars
    into ``run_dir`` beside ``metrics.jsonl`` when the ``tensorboard`` package (the
    ``tensorboard`` extra) is installed, and is silently off when it is not; ``false``
    turns it off.

    Keys in :attr:`RUN_ONLY` may change between a run and its resume (they do not change the
    trajectory); any other change makes resume fail with the differing keys named.
    """

    steps: int = 1000
    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off (the norm is still logged)
    grad_accum: int = 1  # micro-batches per optimizer step
    aux_free_bias: bool = True  # run the aux-loss-free router bias update after each step
    seed: int = 0  # seeds torch, numpy and random at the start of a fresh run
    run_dir: str = "runs/train"
    eval_every: int = 0  # 0: evaluate only at the end (when an eval_fn is given)
    save_every: int = 0  # 0: save only when the run ends or stops
    keep_checkpoints: int = 2
    log_every: int = 1
    routing_every: int = 10  # 0: no routing telemetry
    time_budget_s: float | None = None  # wall-clock limit for this invocation
    progress: bool | None = None  # None: a progress bar only when stderr is a terminal
    verbose: bool = True  # one-line messages (resume, stop, save) on stderr
    tensorboard: bool = True  # also write TensorBoard scalars (when tensorboard is installed)

    RUN_ONLY = (
        "run_dir",
        "eval_every",
        "save_every",
        "keep_checkpoints",
        "log_every",
        "routing_every",
        "time_budget_s",
        "progress",
        "verbose",
        "tensorboard",
    )

    def __post_init__(self):
        from ..models.config import ConfigError, check_fields

        check_fields(self, "train")  # types: steps=2.5, steps=true, lr=inf are refused here
        checks = [
            (self.steps >= 0, "steps must be >= 0"),
            (self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.eps > 0, "eps must be > 0"),
            (all(0 <= b < 1 for b in self.betas), "betas must be two values in [0, 1)"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must lie in [0, 1]"),
            (self.grad_clip >= 0, "grad_clip must be >= 0 (0: off)"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
            (self.log_every >= 1, "log_every must be >= 1"),
            (self.eval_every >= 0, "eval_every must be >= 0 (0: only at the end)"),
            (self.save_every >= 0, "save_every must be >= 0 (0: only at the end)"),
            (self.routing_every >= 0, "routing_every must be >= 0 (0: off)"),
            (
                self.time_budget_s is None or self.time_budget_s > 0,
                "time_budget_s must be > 0 (leave it out for no budget)",
            ),
            (self.run_dir.strip() != "", "run_dir must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"train.{message}, got {self._given(message)}")

    def _given(self, message: str) -> str:
        """The value of the key a check message starts with, for the error."""
        return repr(getattr(self, message.split()[0]))

    def fingerprinted(self) -> dict[str, Any]:
        """The fields that shape the trajectory (all but :attr:`RUN_ONLY`)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.RUN_ONLY}


@dataclass
class TrainResult:
    """How a :meth:`Trainer.fit` call ended."""

    step: int
    stopped: str  # "completed", "time_budget", "interrupted" or "data_exhausted"
    checkpoint: Path | None
    elapsed_s: float
    loss: float | None = None
    eval: dict[str, float] | None = None
