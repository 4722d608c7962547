"""The experiments' small training loop (:func:`gatelab.train.loop.train_loop`, re-exported
here), and the batch sources and schedules they feed it.

An experiment builds its model and optimizer with its own hyper-parameters (they are part of
the claim it reproduces), picks a schedule (``gatelab.train.WarmupCosine``, or
:func:`warmup_times_cosine` where the recipe multiplies a warm-up ramp into a cosine over the
whole run) and hands :func:`train_loop` a loss function of ``(model, batch)`` and an iterator
of batches. The loop is the Trainer's step without its checkpoints and logs:

    zero_grad -> loss.backward() -> clip (optional) -> optimizer.step() -> schedule.step()

Experiments whose algorithm *is* the loop (adversarial alternation, S-KAN's phases, L-BFGS
closures, the Trainer-driven EvoMoE stages) keep their own and say why there.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from ..train.loop import train_loop

__all__ = [
    "random_batches",
    "shuffled_batches",
    "train_loop",
    "warmup_then_cosine",
    "warmup_times_cosine",
]


def random_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless index batches [batch_size] drawn with replacement from ``range(n)``."""
    while True:
        yield torch.randint(n, (batch_size,), generator=generator)


def shuffled_batches(
    n: int, batch_size: int, epochs: int, generator: torch.Generator
) -> Iterator[Tensor]:
    """``epochs`` passes over ``range(n)``, each a fresh permutation split into batches."""
    for _ in range(epochs):
        yield from torch.randperm(n, generator=generator).split(batch_size)


def warmup_then_cosine(
    optimizer: torch.optim.Optimizer, warmup: int, steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr * (s+1)/warmup`` for ``s < warmup``, then a cosine from ``lr`` to 0 at ``steps``.

    The schedule of :class:`gatelab.train.WarmupCosine` with ``min_lr_ratio=0``, written as
    the recipes that use it were tuned: ``cos(pi * (s - warmup) / decay)``, where WarmupCosine
    rounds ``cos(pi * ((s - warmup) / decay))``. The two differ in the last bit of some
    rates, and so in the experiments' numbers; this keeps them where they were.
    """

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warmup_times_cosine(
    optimizer: torch.optim.Optimizer, warmup: int, steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr * min(1, (s+1)/warmup) * 0.5 * (1 + cos(pi * s / steps))``.

    Unlike :func:`warmup_then_cosine` the cosine runs over the whole run and the warm-up ramp
    multiplies into it: the schedule several recipes were tuned with, kept so their numbers
    do not move.
    """

    def factor(s: int) -> float:
        return min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
