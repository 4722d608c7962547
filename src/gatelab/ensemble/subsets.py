"""Choosing a subset of members under budgets: exhaustive search and a monotone branch-and-bound.

The coarse level of MoE² ("MoE²: Optimizing Collaborative Inference for Edge Large Language
Models", Jin et al., arXiv 2501.09410): choose the subset S of experts that minimises the
loss L(S) subject to resource budgets, where L is non-increasing in S (adding an expert
never hurts under the optimal gate) and every cost is non-decreasing in S. The paper solves
it by discrete monotonic optimisation (a polyblock outer approximation); we use the
branch-and-bound form of the same idea, which is exact for any monotone instance:

- the optimum is a *maximal* feasible subset (extending a feasible S never raises L);
- at a node (included members I, candidates C that each still fit with I), the set
  B = I ∪ C contains every feasible subset of the node, so L(B) bounds the node's losses
  from below; if B itself is feasible it is the node's best point (no branching), and if
  L(B) is no better than the incumbent the node is pruned.

:func:`exhaustive_search` evaluates L on every feasible subset (the oracle for small pools).
Both return how many subsets they evaluated L on and how long they took.

Costs: ``costs`` [R, M] with one row per resource (energy, latency of each query category),
combined over S by ``"sum"`` (members run one after another) or ``"max"`` (members run in
parallel on their own servers); both are non-decreasing in S, which the bound needs.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "SearchResult",
    "SubsetProblem",
    "exhaustive_search",
    "greedy_by_value_per_cost",
    "monotone_search",
    "monotonicity_violations",
    "coverage_instance",
    "monotone_hull",
    "random_feasible",
]

Subset = frozenset[int]


@dataclass
class SubsetProblem:
    """min L(S) over subsets S of range(M) with aggregate(costs[r, S]) <= budgets[r] for all r.

    ``loss``: L as a function of a frozenset of member indices (L(∅) must be defined).
    ``costs`` [R, M] >= 0; ``budgets`` [R]; ``aggregate``: "sum" or "max" per resource
    (one string for all). ``resources``: a name per row, for messages and tables.
    """

    loss: Callable[[Subset], float]
    costs: Tensor
    budgets: Tensor
    aggregate: str | Sequence[str] = "sum"
    resources: Sequence[str] | None = None
    _cache: dict[Subset, float] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        self.costs = torch.as_tensor(self.costs, dtype=torch.float64)
        self.budgets = torch.as_tensor(self.budgets, dtype=torch.float64).reshape(-1)
        if self.costs.dim() != 2 or self.costs.shape[0] != self.budgets.shape[0]:
            raise ValueError(
                f"costs must be [R, M] with R = len(budgets); got costs {tuple(self.costs.shape)}"
                f" and budgets {tuple(self.budgets.shape)}"
            )
        if (self.costs < 0).any():
            raise ValueError("costs must be >= 0 (a negative cost breaks monotonicity)")
        aggregates = (
            [self.aggregate] * len(self.budgets)
            if isinstance(self.aggregate, str)
            else list(self.aggregate)
        )
        if len(aggregates) != len(self.budgets) or set(aggregates) - {"sum", "max"}:
            raise ValueError(f"aggregate must be 'sum' or 'max' per resource, got {aggregates}")
        self._max_rows = torch.tensor([a == "max" for a in aggregates])

    @property
    def size(self) -> int:
        return self.costs.shape[1]

    def usage(self, subset: Subset) -> Tensor:
        """[R]: each resource's cost of running ``subset``."""
        if not subset:
            return torch.zeros(len(self.budgets), dtype=torch.float64)
        cols = self.costs[:, sorted(subset)]
        return torch.where(self._max_rows, cols.max(dim=1).values, cols.sum(dim=1))

    def feasible(self, subset: Subset) -> bool:
        return bool((self.usage(subset) <= self.budgets * (1 + 1e-12)).all())

    def evaluate(self, subset: Subset) -> float:
        """L(subset), memoised; ``evaluations`` counts the distinct subsets evaluated."""
        if subset not in self._cache:
            self._cache[subset] = float(self.loss(subset))
        return self._cache[subset]

    @property
    def evaluations(self) -> int:
        return len(self._cache)

    def reset(self) -> None:
        """Forget the memoised losses (so a search's evaluation count starts at 0)."""
        self._cache.clear()


@dataclass
class SearchResult:
    subset: Subset  # the chosen member indices
    loss: float
    evaluated: int  # distinct subsets on which L was evaluated
    seconds: float


def exhaustive_search(problem: SubsetProblem) -> SearchResult:
    """The oracle: L on every feasible subset of the 2^M, the least loss (ties: the larger
    subset, then the first in the enumeration order)."""
    problem.reset()
    start = time.perf_counter()
    best, best_loss = frozenset(), float("inf")
    for size in range(problem.size, -1, -1):
        for combo in itertools.combinations(range(problem.size), size):
            subset = frozenset(combo)
            if problem.feasible(subset):
                loss = problem.evaluate(subset)
                if loss < best_loss:
                    best, best_loss = subset, loss
    return SearchResult(best, best_loss, problem.evaluations, time.perf_counter() - start)


def monotone_search(problem: SubsetProblem) -> SearchResult:
    """Branch-and-bound over subsets ordered by inclusion, exact when L is non-increasing
    in S (see the module docstring). Depth first, including a member before excluding it,
    members taken by decreasing cost share (the members that make sets infeasible first)."""
    problem.reset()
    start = time.perf_counter()
    share = (problem.costs / problem.budgets.clamp_min(1e-300)[:, None]).max(dim=0).values
    order = sorted(range(problem.size), key=lambda i: -float(share[i]))
    state = {"best": frozenset(), "loss": problem.evaluate(frozenset())}
    stack = [(frozenset(), tuple(i for i in order if problem.feasible(frozenset([i]))))]
    while stack:
        included, candidates = stack.pop()
        bound_set = included | frozenset(candidates)
        bound = problem.evaluate(bound_set)
        if problem.feasible(bound_set):  # the best point of this node's subtree
            if bound < state["loss"]:
                state.update(best=bound_set, loss=bound)
            continue
        if bound >= state["loss"]:  # no feasible subset below can beat the incumbent
            continue
        first, rest = candidates[0], candidates[1:]
        with_first = included | {first}
        stack.append((included, rest))  # exclude `first` (explored second)
        stack.append((with_first, tuple(i for i in rest if problem.feasible(with_first | {i}))))
    return SearchResult(
        state["best"], state["loss"], problem.evaluations, time.perf_counter() - start
    )


def monotonicity_violations(
    loss: Callable[[Subset], float], size: int, tol: float = 0.0, include_empty: bool = True
):
    """Every (S, i) with i ∉ S and L(S ∪ {i}) > L(S) + tol: returns (violations, pairs,
    largest increase) over all 2^M subsets (small M only); ``include_empty=False`` leaves
    out S = ∅ (whose loss is a convention, e.g. a uniform prediction)."""
    values = {
        frozenset(c): float(loss(frozenset(c)))
        for r in range(0 if include_empty else 1, size + 1)
        for c in itertools.combinations(range(size), r)
    }
    worst, bad, pairs = 0.0, 0, 0
    for subset, value in values.items():
        for i in set(range(size)) - subset:
            pairs += 1
            increase = values[subset | {i}] - value
            worst = max(worst, increase)
            bad += increase > tol
    return bad, pairs, worst


def greedy_by_value_per_cost(problem: SubsetProblem, value: Tensor) -> Subset:
    """Baseline: add members by decreasing value / cost (cost = the sum over resources of
    the member's share of each budget) while the set stays feasible."""
    share = (problem.costs / problem.budgets.clamp_min(1e-300)[:, None]).sum(dim=0)
    ratio = torch.as_tensor(value, dtype=torch.float64) / share.clamp_min(1e-300)
    chosen: Subset = frozenset()
    for i in ratio.argsort(descending=True).tolist():
        if problem.feasible(chosen | {i}):
            chosen = chosen | {i}
    return chosen


def random_feasible(problem: SubsetProblem, generator: torch.Generator, draws: int) -> list[Subset]:
    """Baseline: ``draws`` subsets drawn uniformly from the non-empty feasible ones (by
    rejection; an empty list when only ∅ fits)."""
    feasible = [
        frozenset(c)
        for r in range(1, problem.size + 1)
        for c in itertools.combinations(range(problem.size), r)
        if problem.feasible(frozenset(c))
    ]
    if not feasible:
        return []
    picks = torch.randint(len(feasible), (draws,), generator=generator).tolist()
    return [feasible[i] for i in picks]


def coverage_instance(
    size: int, generator: torch.Generator, resources: int = 2, budget_fraction: float = 0.4
) -> SubsetProblem:
    """A random monotone instance: L(S) = mean over 32 "queries" of the least error
    min_{i ∈ S} e[q, i] (1 for ∅), random costs [R, M], budgets = ``budget_fraction`` of
    the total cost per resource. L is non-increasing in S, so the search must be exact."""
    errors = torch.rand(32, size, generator=generator, dtype=torch.float64)
    costs = torch.rand(resources, size, generator=generator, dtype=torch.float64) + 0.05

    def loss(subset: Subset) -> float:
        if not subset:
            return 1.0
        return float(errors[:, sorted(subset)].min(dim=1).values.mean())

    return SubsetProblem(loss, costs, costs.sum(dim=1) * budget_fraction)


def monotone_hull(problem: SubsetProblem) -> SubsetProblem:
    """The same problem with L replaced by L'(S) = min_{T ⊆ S} L(T) (computed over all 2^M
    subsets: small M only). L' is non-increasing, and since feasible sets are closed under
    taking subsets, min over feasible S of L' = min over feasible S of L."""
    values: dict[Subset, float] = {}
    for size in range(problem.size + 1):
        for combo in itertools.combinations(range(problem.size), size):
            subset = frozenset(combo)
            below = [values[subset - {i}] for i in subset]
            values[subset] = min([float(problem.loss(subset)), *below])
    return SubsetProblem(
        values.__getitem__,
        problem.costs,
        problem.budgets,
        resources=problem.resources,
        aggregate=["max" if m else "sum" for m in problem._max_rows.tolist()],
    )
