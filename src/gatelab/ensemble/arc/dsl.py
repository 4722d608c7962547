"""A depth-limited program search over grid transformations (the DSL solver).

The thesis (Bober-Irizar & Banerjee, "Neural networks for abstraction and reasoning:
Towards broad generalization in machines", arXiv 2402.03507) adapts DreamCoder with its
PeARL language, a neural recognition model guiding the enumeration, and learned library
abstractions. This is the much smaller symbolic core of that idea: breadth-first
enumeration of compositions of the hand-written primitives in
:mod:`~gatelab.ensemble.arc.grids` (no learned guidance, no library learning), up to
``max_depth`` steps, each program optionally followed by a colour map learned from the
demonstration pairs. A program is accepted when it reproduces every demonstration output
exactly. Duplicate intermediate states (the same grids on every input) are pruned, so the
search visits each distinct state once.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from ...data.arc import ArcTask
from .base import ATTEMPTS, SolveResult
from .grids import MARK, PRIMITIVES, apply_colour_map, learn_colour_map

__all__ = ["ProgramSearch"]

_MAX_SIDE = 30


def _key(states: tuple[np.ndarray, ...]) -> tuple:
    return tuple((g.shape, g.tobytes()) for g in states)


def _step(name: str, states: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...] | None:
    out = []
    for g in states:
        new = PRIMITIVES[name](g)
        if new is None or new.size == 0 or max(new.shape) > _MAX_SIDE:
            return None
        out.append(np.ascontiguousarray(new))
    return tuple(out)


class ProgramSearch:
    """Breadth-first search for programs consistent with all demos.

    ``max_depth`` primitives per program (default 3), at most ``max_nodes`` generated
    states (default 2000: every distinct program of depth 2 with the 41 primitives, then
    depth 3 in order until the budget) and ``time_limit`` seconds of this process's CPU
    time (default 1.0; CPU rather than wall time, so other jobs on a shared machine do not
    cut the search short) per task, whichever ends first. The node budget makes runs
    repeatable; the time limit is a safety net for grids where every state is slow. The
    search stops
    once the accepted programs give ATTEMPTS distinct answers; the attempts are the answers
    of the shortest accepted programs, in the primitives' order.
    """

    name = "dsl"
    cheap_loo = True

    def __init__(self, max_depth: int = 3, max_nodes: int = 2000, time_limit: float = 1.0):
        if max_depth < 0:
            raise ValueError(f"max_depth must be >= 0, got {max_depth}")
        if max_nodes < 1:
            raise ValueError(f"max_nodes must be >= 1, got {max_nodes}")
        self.max_depth, self.max_nodes, self.time_limit = max_depth, max_nodes, time_limit

    def _accept(self, states, targets, n_demo):
        """The colour map (None: none needed) under which ``states`` reproduce the demo
        outputs, or False."""
        demo = states[:n_demo]
        if any(g.shape != t.shape for g, t in zip(demo, targets, strict=True)):
            return False
        if all(np.array_equal(g, t) for g, t in zip(demo, targets, strict=True)):
            return None
        mapping = learn_colour_map(list(zip(demo, targets, strict=True)))
        return False if mapping is None else mapping

    def search(self, task: ArcTask) -> list[tuple[tuple[str, ...], dict | None, list]]:
        """Accepted programs as (primitive names, colour map or None, test answers)."""
        targets = [o for _, o in task.train]
        n_demo = len(targets)
        start = tuple(i for i, _ in task.train) + tuple(i for i, _ in task.test)
        queue, seen = deque([((), start)]), {_key(start)}
        found, answers, nodes = [], set(), 0
        deadline = time.process_time() + self.time_limit
        while queue and time.process_time() < deadline:
            program, states = queue.popleft()
            mapping = self._accept(states, targets, n_demo)
            if mapping is not False:
                tests = [
                    g if mapping is None else apply_colour_map(g, mapping) for g in states[n_demo:]
                ]
                key = _key(tuple(tests))
                if all(t.max() < MARK for t in tests) and key not in answers:
                    answers.add(key)
                    found.append((program, mapping, tests))
                    if len(found) == ATTEMPTS:
                        break
            if len(program) == self.max_depth:
                continue
            for name in PRIMITIVES:
                if nodes >= self.max_nodes:
                    break
                nodes += 1
                new = _step(name, states)
                if new is not None and (k := _key(new)) not in seen:
                    seen.add(k)
                    queue.append(((*program, name), new))
        self.last_nodes = nodes
        return found

    def solve(self, task: ArcTask) -> SolveResult:
        found = self.search(task)
        attempts = [[tests[t] for _, _, tests in found] for t in range(len(task.test))]
        info = {
            "programs": [" . ".join(p) or "identity" for p, _, _ in found],
            "nodes": self.last_nodes,
        }
        return SolveResult(attempts, fit=1.0 if found else 0.0, info=info)
