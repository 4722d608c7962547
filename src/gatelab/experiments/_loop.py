"""The one small training loop the experiments share, and the batch sources they feed it.

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

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "random_batches",
    "shuffled_batches",
    "train_loop",
    "warmup_then_cosine",
    "warmup_times_cosine",
]


def train_loop(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batches: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    *,
    steps: int | None = None,
    schedule: Any = None,
    clip: float = 0.0,
    before_step: Callable[[int], None] | None = None,
    evaluate: Callable[[int], None] | None = None,
    eval_every: int = 1,
) -> list[float]:
    """Train ``model`` for ``steps`` batches (all of ``batches`` if None); the loss per step.

    ``schedule`` is anything with ``step()`` (WarmupCosine, a torch scheduler), stepped after
    the optimizer. ``clip > 0`` clips the global grad norm of ``model.parameters()``.
    ``before_step(step)`` runs before step ``step`` (0-based) draws its batch;
    ``evaluate(done)`` runs after every ``eval_every``-th step with the steps done so far.
    The model is put in train mode and left there.
    """
    history = []
    model.train()
    for step, batch in enumerate(itertools.islice(iter(batches), steps)):
        if before_step is not None:
            before_step(step)
        loss = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        if schedule is not None:
            schedule.step()
        history.append(float(loss.detach()))
        if evaluate is not None and (step + 1) % eval_every == 0:
            evaluate(step + 1)
    return history


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
