"""Choosing one ARC solver per task from task features: the ensemble as a gate.

The thesis (arXiv 2402.03507, its ensemble analysis) finds that its solvers solve different
tasks, so the union beats each one; it reports the oracle union of the systems. This module
adds the part an ensemble needs to realise that without the answers: a gate that looks only
at the demonstration pairs (grid sizes, colour counts, each solver's fit to the demos and
its leave-one-out accuracy on them, and which solvers agree on the test answer) and picks
one solver, whose attempts are submitted. Two gates:

- :class:`SolverGate`: a learned per-solver logistic model "does solver s solve this task",
  trained on the training split's tasks, picking the most probable non-abstaining solver;
- :func:`max_fit_choice`: the hand-made rule "the solver that best reproduces the demos,
  ties broken by a fixed priority".
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn

from ...data.arc import ArcTask
from ...train.loop import train_loop
from .base import SolveResult

__all__ = ["SolverGate", "max_fit_choice", "task_features"]


def _shape_features(task: ArcTask) -> list[float]:
    ins, outs = [i for i, _ in task.train], [o for _, o in task.train]
    colours = lambda gs: float(np.mean([len(np.unique(g)) for g in gs]))  # noqa: E731
    new_colours = np.mean([bool(set(np.unique(o)) - set(np.unique(i))) for i, o in task.train])
    return [
        float(len(task.train)),
        float(np.log(np.mean([g.size for g in ins]))),
        float(np.log(np.mean([g.size for g in outs]))),
        float(all(i.shape == o.shape for i, o in task.train)),
        float(len({o.shape for o in outs}) == 1),
        float(np.mean([np.log(o.size / i.size) for i, o in task.train])),
        colours(ins),
        colours(outs),
        float(new_colours),
    ]


def _agree(a: SolveResult, b: SolveResult) -> float:
    """Whether two solvers' first attempts agree on every test input."""
    if a.abstained or b.abstained:
        return 0.0
    return float(
        all(
            x and y and np.array_equal(x[0], y[0])
            for x, y in zip(a.attempts, b.attempts, strict=True)
        )
    )


def task_features(
    task: ArcTask, results: dict[str, SolveResult], loo: dict[str, float]
) -> list[float]:
    """Shape and colour statistics of the demos, then per solver (abstained, fit, LOO),
    then pairwise agreement of the solvers' first attempts (solvers in ``results`` order)."""
    feats = _shape_features(task)
    for name, r in results.items():
        feats += [float(r.abstained), r.fit, loo.get(name, 0.0)]
    for a, b in itertools.combinations(results, 2):
        feats.append(_agree(results[a], results[b]))
    return feats


def max_fit_choice(results: dict[str, SolveResult], priority: list[str]) -> str:
    """The non-abstaining solver with the highest fit to the demos; ties go to the earlier
    name in ``priority``."""
    live = [n for n in priority if not results[n].abstained] or priority
    return max(live, key=lambda n: (results[n].fit, -priority.index(n)))


class SolverGate:
    """A logistic model per solver on standardised task features, trained by Adam on the
    binary cross entropy of "solver s solved task t" (``steps``, ``lr``, ``weight_decay``);
    :meth:`choose` returns the index of the most probable non-abstaining solver."""

    def __init__(
        self, steps: int = 300, lr: float = 0.05, weight_decay: float = 1e-2, seed: int = 0
    ):
        self.steps, self.lr, self.weight_decay, self.seed = steps, lr, weight_decay, seed

    def fit(self, features: np.ndarray, solved: np.ndarray) -> SolverGate:
        """``features`` [tasks, f], ``solved`` [tasks, solvers] of 0/1."""
        if features.ndim != 2 or solved.shape[0] != features.shape[0]:
            raise ValueError(
                f"features [tasks, f] and solved [tasks, solvers] must share the "
                f"task axis, got {features.shape} and {solved.shape}"
            )
        self.mean = features.mean(0)
        self.std = features.std(0) + 1e-6
        x = torch.tensor((features - self.mean) / self.std, dtype=torch.float32)
        y = torch.tensor(solved, dtype=torch.float32)
        torch.manual_seed(self.seed)
        self.model = nn.Linear(x.shape[1], y.shape[1])
        opt = torch.optim.Adam(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        self.losses = train_loop(
            self.model,
            lambda m, _: nn.functional.binary_cross_entropy_with_logits(m(x), y),
            itertools.repeat(None),
            opt,
            steps=self.steps,
        )
        self.model.eval()
        return self

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        x = torch.tensor((features - self.mean) / self.std, dtype=torch.float32)
        with torch.no_grad():
            return torch.sigmoid(self.model(x)).numpy()

    def choose(self, features: np.ndarray, abstained: np.ndarray) -> np.ndarray:
        """Per task, the chosen solver's index; ``abstained`` [tasks, solvers] masks out
        solvers with no answer (unless all abstain)."""
        p = self.probabilities(features)
        p = np.where(abstained & ~abstained.all(1, keepdims=True), -1.0, p)
        return p.argmax(1)
