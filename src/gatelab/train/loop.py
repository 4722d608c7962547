"""The small training loop for fits that need no checkpoints or logs (the experiments' runs,
the ensembles' per-task and gate fits): the Trainer's step without its bookkeeping,

    zero_grad -> loss.backward() -> clip (optional) -> optimizer.step() -> schedule.step()
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["train_loop"]


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
