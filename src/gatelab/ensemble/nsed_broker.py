"""NSED's Dynamic Expertise Broker: bind members to the council by an exact 0/1 knapsack.

Paper: "Mixture-of-Models: Unifying Heterogeneous Agents via N-Way Self-Evaluating
Deliberation" (NSED). The broker "treats model selection as a variation of the Knapsack
Problem, binding heterogeneous checkpoints to functional roles based on live telemetry and
cost constraints". The abstract gives no formula; gatelab's reading:

- One role that matters for classifiers: membership of the *council*, the members that
  propose and review each other in every round (the paper's agents can take different
  functional roles, e.g. a solver and a critic; a classifier has one function, so the role
  a member is bound to here is "in the council" or "idle").
- Cost of a member: its measured seconds per query (the live telemetry; the members run one
  after another on this machine, so the council's latency is the sum). A member's forward
  pass is computed once per query and reused by every round (the consensus enters at the
  distribution level, see :mod:`.nsed`), so the number of rounds does not scale the cost.
- Value of a member: an additive score estimated on validation data (by default its
  validation accuracy above chance, see :meth:`ExpertiseBroker.from_validation`). Additivity
  is the knapsack's assumption, not a property of ensembles: it ranks subsets by how much
  competence they bring, not by the ensemble's exact accuracy.
- ``observe`` folds new latency measurements into the telemetry by an exponential moving
  average, so a re-bind follows the machine's current speed.

:func:`knapsack` is the exact solver: a dynamic programme over the members in index order
that keeps the Pareto frontier of (cost, value) partial selections (Nemhauser-Ullmann), so
real-valued latencies need no rounding to a grid. :func:`knapsack_exhaustive` is its
brute-force oracle. Both break ties the same way: the highest value, then the lowest cost,
then the smallest bit mask (sum of 2**i over chosen i), so equal-value subsets give one
answer and the two agree exactly whenever the sums are exact in floating point.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Selection:
    """A knapsack answer: the chosen member indices (ascending), their summed value and cost."""

    members: tuple[int, ...]
    value: float
    cost: float

    @property
    def mask(self) -> int:
        return sum(1 << i for i in self.members)


def _check_instance(values: Sequence[float], costs: Sequence[float], budget: float):
    values, costs = [float(v) for v in values], [float(c) for c in costs]
    if len(values) != len(costs):
        raise ValueError(
            f"values and costs need one entry per member, got {len(values)} and {len(costs)}"
        )
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"values must be finite numbers, got {values}")
    if not all(math.isfinite(c) and c >= 0 for c in costs):
        raise ValueError(f"costs must be finite and >= 0 (e.g. seconds per query), got {costs}")
    if not (math.isfinite(float(budget)) and budget >= 0):
        raise ValueError(f"budget must be a finite number >= 0, got {budget}")
    return values, costs, float(budget)


def _key(state: tuple[float, float, int, tuple[int, ...]]) -> tuple[float, float, int]:
    cost, value, mask, _ = state
    return (-value, cost, mask)


def _pareto(states: list) -> list:
    """Drop every state another dominates: no more cost, no less value, and strictly better
    in cost, value or (all equal) a smaller mask. Sorting by (cost, -value, mask) makes a
    state undominated exactly when its value beats every earlier one's."""
    states.sort(key=lambda s: (s[0], -s[1], s[2]))
    kept, best = [], -math.inf
    for state in states:
        if state[1] > best:
            kept.append(state)
            best = state[1]
    return kept


def knapsack(values: Sequence[float], costs: Sequence[float], budget: float) -> Selection:
    """The 0/1 knapsack optimum: the member subset of the highest summed value whose summed
    cost is at most ``budget`` (ties: lower cost, then smaller mask). Exact dynamic
    programme over the (cost, value) Pareto frontier; costs may be any reals >= 0."""
    values, costs, budget = _check_instance(values, costs, budget)
    # state: (cost, value, mask, members); sums are accumulated in index order, as the
    # exhaustive oracle does, so both see the same floating-point numbers.
    states = [(0.0, 0.0, 0, ())]
    for i, (v, c) in enumerate(zip(values, costs, strict=True)):
        grown = [
            (sc + c, sv + v, mask | (1 << i), (*members, i))
            for sc, sv, mask, members in states
            if sc + c <= budget
        ]
        states = _pareto(states + grown)
    cost, value, _, members = min(states, key=_key)
    return Selection(members, value, cost)


def knapsack_exhaustive(
    values: Sequence[float], costs: Sequence[float], budget: float
) -> Selection:
    """Brute-force oracle for :func:`knapsack`: every one of the 2**M subsets (M <= 20)."""
    values, costs, budget = _check_instance(values, costs, budget)
    if len(values) > 20:
        raise ValueError(f"the exhaustive search takes at most 20 members, got {len(values)}")
    best = None
    for mask in range(1 << len(values)):
        members = tuple(i for i in range(len(values)) if mask >> i & 1)
        cost, value = 0.0, 0.0
        for i in members:
            cost, value = cost + costs[i], value + values[i]
        state = (cost, value, mask, members)
        if cost <= budget and (best is None or _key(state) < _key(best)):
            best = state
    cost, value, _, members = best
    return Selection(members, value, cost)


@dataclass(frozen=True)
class Roles:
    """The broker's binding: ``council`` proposes and reviews; the rest stay idle."""

    council: tuple[int, ...]
    names: tuple[str, ...]
    value: float
    latency_s: float
    budget_s: float


class ExpertiseBroker:
    """NSED's Dynamic Expertise Broker over M members (see the module docstring).

    ``values`` [M]: additive worth of each member; ``latency_s`` [M]: measured seconds per
    query; ``names``: for reports. ``bind(budget_s)`` returns the knapsack-optimal council.
    """

    def __init__(
        self,
        values: Sequence[float] | Tensor,
        latency_s: Sequence[float] | Tensor,
        names: Sequence[str] | None = None,
        smoothing: float = 0.5,
    ):
        self.values = [float(v) for v in values]
        self.latency_s = [float(c) for c in latency_s]
        _check_instance(self.values, self.latency_s, 0.0)
        self.names = (
            tuple(names) if names is not None else tuple(f"m{i}" for i in range(len(self.values)))
        )
        if len(self.names) != len(self.values):
            raise ValueError(f"names needs {len(self.values)} entries, got {len(self.names)}")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(
                f"smoothing must be in [0, 1) (weight of the old latency), got {smoothing}"
            )
        self.smoothing = smoothing

    @classmethod
    def from_validation(cls, pool, x_val: Tensor, y_val: Tensor, **kwargs) -> ExpertiseBroker:
        """Values from ``pool``'s validation accuracy above chance (1/C), floored at 0 (a
        member no better than guessing adds nothing); latencies from ``pool.costs()``."""
        log_probs = pool.log_probs(x_val)  # [M, N, C]
        accuracy = (log_probs.argmax(-1) == y_val).float().mean(dim=1)  # [M]
        values = (accuracy - 1.0 / log_probs.shape[-1]).clamp_min(0.0)
        names = [m.name for m in pool.members]
        return cls(values.tolist(), pool.costs()["latency_s"].tolist(), names, **kwargs)

    def observe(self, member: int, latency_s: float) -> None:
        """Fold a new latency measurement of ``member`` into the telemetry (moving average)."""
        if not (math.isfinite(latency_s) and latency_s >= 0):
            raise ValueError(f"latency_s must be finite and >= 0, got {latency_s}")
        old = self.latency_s[member]
        self.latency_s[member] = self.smoothing * old + (1.0 - self.smoothing) * latency_s

    def bind(self, budget_s: float) -> Roles:
        """The council of the highest summed value whose summed latency fits ``budget_s``."""
        best = knapsack(self.values, self.latency_s, budget_s)
        names = tuple(self.names[i] for i in best.members)
        return Roles(best.members, names, best.value, best.cost, float(budget_s))
