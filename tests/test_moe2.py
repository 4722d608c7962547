"""MoE² (arXiv 2501.09410): the monotone subset search against the exhaustive oracle, the
gate's top-k mixture within a subset, and the experiment at smoke scale."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gatelab.ensemble.moe2 import MixtureLoss, SubsetGate, moe2_problem, subset_mask, train_gate
from gatelab.ensemble.subsets import (
    SubsetProblem,
    coverage_instance,
    exhaustive_search,
    greedy_by_value_per_cost,
    monotone_hull,
    monotone_search,
    monotonicity_violations,
    random_feasible,
)

# -- the subset search --------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 9),
    seed=st.integers(0, 10_000),
    resources=st.integers(1, 3),
    fraction=st.floats(0.0, 1.2),
)
def test_monotone_search_finds_the_exhaustive_optimum(size, seed, resources, fraction):
    gen = torch.Generator().manual_seed(seed)
    problem = coverage_instance(size, gen, resources=resources, budget_fraction=fraction)
    exact = exhaustive_search(problem)
    found = monotone_search(problem)
    assert found.loss == pytest.approx(exact.loss, abs=1e-12)
    assert problem.feasible(found.subset)
    assert found.evaluated <= 2**size


@settings(max_examples=30, deadline=None)
@given(size=st.integers(1, 7), seed=st.integers(0, 10_000), agg=st.sampled_from(["sum", "max"]))
def test_monotone_search_is_exact_on_the_hull_of_any_loss(size, seed, agg):
    """An arbitrary (non-monotone) L: on its monotone hull the search matches the oracle,
    and the hull's optimum is the raw loss's optimum."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.rand(2**size, generator=gen, dtype=torch.float64).tolist()
    costs = torch.rand(2, size, generator=gen, dtype=torch.float64)
    raw = SubsetProblem(
        lambda s: values[sum(1 << i for i in s)], costs, costs.sum(1) * 0.5, aggregate=agg
    )
    hull = monotone_hull(raw)
    assert monotonicity_violations(hull.loss, size)[0] == 0
    exact = exhaustive_search(raw)
    assert monotone_search(hull).loss == pytest.approx(exact.loss)
    assert exhaustive_search(hull).loss == pytest.approx(exact.loss)


def test_search_counts_fewer_evaluations_on_a_larger_instance():
    problem = coverage_instance(14, torch.Generator().manual_seed(3), budget_fraction=0.3)
    exact, found = exhaustive_search(problem), monotone_search(problem)
    assert found.loss == pytest.approx(exact.loss)
    assert found.evaluated < exact.evaluated / 2  # exhaustive: every feasible subset


def test_edge_cases_of_the_search():
    costs = torch.tensor([[1.0, 2.0, 3.0]])
    problem = SubsetProblem(lambda s: 1.0 / (1 + len(s)), costs, torch.tensor([0.5]))
    assert monotone_search(problem).subset == frozenset()  # nothing fits
    assert exhaustive_search(problem).subset == frozenset()
    roomy = SubsetProblem(lambda s: 1.0 / (1 + len(s)), costs, torch.tensor([100.0]))
    assert monotone_search(roomy).subset == frozenset({0, 1, 2})  # everything fits
    assert monotone_search(roomy).evaluated == 2  # ∅ and the full set: no branching
    assert random_feasible(problem, torch.Generator(), 3) == []
    assert greedy_by_value_per_cost(roomy, torch.ones(3)) == frozenset({0, 1, 2})
    maxed = SubsetProblem(lambda s: -len(s), costs, torch.tensor([2.0]), aggregate="max")
    assert maxed.usage(frozenset({0, 1})).item() == 2.0
    assert monotone_search(maxed).subset == frozenset({0, 1})


def test_bad_problems_are_refused():
    with pytest.raises(ValueError, match="costs must be"):
        SubsetProblem(len, torch.ones(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match=">= 0"):
        SubsetProblem(len, -torch.ones(1, 3), torch.ones(1))
    with pytest.raises(ValueError, match="aggregate"):
        SubsetProblem(len, torch.ones(1, 3), torch.ones(1), aggregate="mean")


# -- the gate -----------------------------------------------------------------------------


def _brute_mixture(logits, lps, subset, k):
    """Per query: the top-k members of ``subset`` by logit, softmax over them, mix."""
    out = []
    for n in range(logits.shape[0]):
        ranked = sorted(subset, key=lambda i: -float(logits[n, i]))[:k]
        w = torch.softmax(logits[n, ranked], 0)
        out.append(torch.log(sum(w[j] * lps[i, n].exp() for j, i in enumerate(ranked))))
    return torch.stack(out)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_gate_mixture_matches_brute_force(k):
    gen = torch.Generator().manual_seed(k)
    logits = torch.randn(6, 5, generator=gen)
    lps = torch.log_softmax(torch.randn(5, 6, 4, generator=gen), -1)
    gate = SubsetGate(3, 5, top_k=k)
    for r in range(1, 6):
        for subset in itertools.combinations(range(5), r):
            got = gate.mixture_log_probs(logits, lps, subset_mask(subset, 5))
            assert torch.allclose(got, _brute_mixture(logits, lps, subset, k), atol=1e-5)
    empty = gate.mixture_log_probs(logits, lps, subset_mask((), 5))
    assert torch.allclose(empty, torch.full((6, 4), -math.log(4)))


def test_gate_training_lowers_the_loss_and_checks_its_input():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, generator=gen), torch.randint(4, (40,), generator=gen)
    lps = torch.log_softmax(torch.randn(3, 40, 4, generator=gen) * 3, -1)
    gate = SubsetGate(3, 3, top_k=2)
    history = train_gate(gate, x, lps, y, steps=50, subset_dropout=0.5)
    assert history[-1] < history[0]
    loss = MixtureLoss(gate, x, lps, y)
    assert 0.0 <= loss.accuracy(frozenset({0, 1})) <= 1.0
    with pytest.raises(ValueError, match="member_log_probs"):
        train_gate(gate, x, lps[:2], y)
    with pytest.raises(ValueError, match="no member"):
        train_gate(gate, x, lps, y, mask=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="subset_dropout"):
        train_gate(gate, x, lps, y, subset_dropout=2.0)
    with pytest.raises(ValueError, match="subset"):
        subset_mask([5], 3)


# -- on the pool and the experiment -------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_pool():
    from gatelab.ensemble import digits_pool

    return digits_pool("smoke", 0)


def test_search_on_the_pool_matches_the_oracle(smoke_pool):
    pool, data = smoke_pool
    x, y = data["val"]
    lps = pool.log_probs(x)
    torch.manual_seed(0)
    gate = SubsetGate(64, len(pool), top_k=2)
    train_gate(gate, x, lps, y, steps=20, subset_dropout=0.5)
    loss = MixtureLoss(gate, x, lps, y)
    totals = {k: float(v.sum()) for k, v in pool.costs().items()}
    for fraction in (0.05, 0.3, 0.7):
        problem = moe2_problem(
            pool,
            loss,
            totals["flops"] * fraction,
            totals["latency_s"] * fraction,
            totals["batch_latency_s"] * fraction,
        )
        exact = exhaustive_search(problem)
        # The raw L of a trained gate need not be monotone; on its hull the search is exact.
        assert monotone_search(monotone_hull(problem)).loss == pytest.approx(exact.loss)
        assert monotone_search(problem).loss >= exact.loss - 1e-12


def test_moe2_experiment_smoke(tmp_path):
    from gatelab.experiments import get

    result = get("moe2").run("smoke", seed=0, out_dir=tmp_path)
    assert "| member" in result["table"]
    assert (tmp_path / "tradeoff.png").exists()
    assert all(row["bnb_loss"] >= row["exhaustive_loss"] - 1e-12 for row in result["sweep"])
