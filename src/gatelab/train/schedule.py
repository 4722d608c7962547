"""Learning-rate schedule: linear warm-up, then cosine decay to a floor.

A small class rather than ``LambdaLR``: its whole state is one integer and the base rates, so
it goes into a checkpoint's JSON as is (``LambdaLR`` cannot serialise a lambda), and the rate
at any step is a pure function, which the tests and the resume logic rely on.
"""

from __future__ import annotations

import math

import torch

__all__ = ["WarmupCosine", "warmup_cosine"]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """The factor on the base rate for optimizer step ``step`` (0-based).

    Warm-up: ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps (never 0, so the
    first step already learns). Then a half cosine from 1 down to ``min_ratio``, reached at
    ``total_steps`` and held after it.
    """
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must lie in [0, 1], got {min_ratio}")
    if warmup_steps < 0 or total_steps < 0:
        raise ValueError(f"warmup_steps and steps must be >= 0, got {warmup_steps}, {total_steps}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Sets ``lr = base_lr * warmup_cosine(step, ...)`` on every param group of an optimizer.

    The rate for the coming step is applied at construction and after each :meth:`step`, so the
    usual order (``optimizer.step(); scheduler.step()``) holds. Base rates are read once from the
    groups' ``lr`` and kept as ``initial_lr`` (as torch's schedulers do).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int,
        total_steps: int,
        min_lr_ratio: float = 0.1,
    ):
        self.optimizer = optimizer
        self.warmup_steps, self.total_steps = int(warmup_steps), int(total_steps)
        self.min_lr_ratio = float(min_lr_ratio)
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.last_step = 0
        warmup_cosine(0, self.warmup_steps, self.total_steps, self.min_lr_ratio)  # validate
        self._apply()

    def factor(self, step: int | None = None) -> float:
        step = self.last_step if step is None else step
        return warmup_cosine(step, self.warmup_steps, self.total_steps, self.min_lr_ratio)

    def _apply(self) -> None:
        factor = self.factor()
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {
            "last_step": self.last_step,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "min_lr_ratio": self.min_lr_ratio,
        }

    def load_state_dict(self, state: dict) -> None:
        self.warmup_steps = int(state["warmup_steps"])
        self.total_steps = int(state["total_steps"])
        self.min_lr_ratio = float(state["min_lr_ratio"])
        self.last_step = int(state["last_step"])
        self._apply()
