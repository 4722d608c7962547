"""NSED: the knapsack broker against brute force, peer review, quadratic voting (budget and
its degenerate cases), the recurrent consensus, and the experiment at smoke scale."""

from __future__ import annotations

import math
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gatelab.ensemble.nsed import (
    NSED,
    NSEDConfig,
    aggregate,
    consensus_nll,
    deliberate,
    peer_review,
    plurality,
    propose,
    quadratic_votes,
)
from gatelab.ensemble.nsed_broker import ExpertiseBroker, knapsack, knapsack_exhaustive

# -- the knapsack -------------------------------------------------------------------------

# Integer-valued floats: every sum is exact, so ties are real ties and the DP and the
# oracle must return the very same subset under the shared tie-break.
small_ints = st.integers(min_value=0, max_value=6).map(float)


@settings(max_examples=300, deadline=None)
@given(
    items=st.lists(
        st.tuples(st.integers(min_value=-3, max_value=8).map(float), small_ints), max_size=9
    ),
    budget=st.integers(min_value=0, max_value=25).map(float),
)
def test_knapsack_matches_brute_force_with_ties(items, budget):
    values, costs = [v for v, _ in items], [c for _, c in items]
    assert knapsack(values, costs, budget) == knapsack_exhaustive(values, costs, budget)


@settings(max_examples=150, deadline=None)
@given(
    items=st.lists(
        st.tuples(
            st.floats(min_value=0.0, max_value=1.0), st.floats(min_value=0.0, max_value=1e-3)
        ),
        min_size=1,
        max_size=10,
    ),
    fraction=st.floats(min_value=0.0, max_value=1.0),
)
def test_knapsack_real_costs_reach_the_optimum(items, fraction):
    """Real-valued latencies (no grid): the same optimal value, within budget."""
    values, costs = [v for v, _ in items], [c for _, c in items]
    budget = fraction * sum(costs)
    dp, oracle = knapsack(values, costs, budget), knapsack_exhaustive(values, costs, budget)
    assert dp.cost <= budget
    assert dp.value == pytest.approx(oracle.value, abs=1e-12)
    assert dp.value == pytest.approx(sum(values[i] for i in dp.members), abs=1e-12)


def test_knapsack_zero_budget_and_ties():
    # zero budget: only free members; a free member of value 0 is left out (smaller mask)
    assert knapsack([1.0, 2.0, 0.0], [0.0, 1.0, 0.0], 0.0).members == (0,)
    assert knapsack([1.0, 2.0], [1.0, 1.0], 0.0).members == ()
    # all equal: the lowest indices of the largest affordable count
    assert knapsack([1.0] * 4, [1.0] * 4, 2.5).members == (0, 1)
    # equal value, different cost: the cheaper one
    assert knapsack([3.0, 1.0, 2.0], [2.0, 0.5, 1.0], 2.0).members == (1, 2)
    # equal value and cost: the smaller mask ({0} = 1 < {1, 2} = 6)
    assert knapsack([3.0, 1.0, 2.0], [2.0, 1.0, 1.0], 2.0).members == (0,)
    assert knapsack([3.0, 3.0], [2.0, 1.0], 2.0).members == (1,)
    # negative values are never taken; an empty pool gives the empty set
    assert knapsack([-1.0, 2.0], [0.0, 1.0], 5.0).members == (1,)
    assert knapsack([], [], 1.0).members == ()


@pytest.mark.parametrize(
    ("values", "costs", "budget", "match"),
    [
        ([1.0], [1.0, 2.0], 1.0, "one entry per member"),
        ([1.0], [-1.0], 1.0, "costs must be"),
        ([math.nan], [1.0], 1.0, "values must be finite"),
        ([1.0], [1.0], -1.0, "budget must be"),
    ],
)
def test_knapsack_bad_input(values, costs, budget, match):
    with pytest.raises(ValueError, match=match):
        knapsack(values, costs, budget)


def _fake_pool(log_probs: torch.Tensor, latencies: list[float]):
    members = [SimpleNamespace(name=f"m{i}") for i in range(log_probs.shape[0])]
    return SimpleNamespace(
        members=members,
        log_probs=lambda x: log_probs,
        costs=lambda: {"latency_s": torch.tensor(latencies, dtype=torch.float64)},
    )


def test_broker_binds_by_value_and_latency():
    # member 0 always right, 1 right half the time, 2 always wrong (value floored at 0)
    y = torch.tensor([0, 1, 2, 3])
    right = torch.nn.functional.one_hot(y, 4).float()
    half = torch.nn.functional.one_hot(torch.tensor([0, 1, 0, 0]), 4).float()
    wrong = torch.nn.functional.one_hot(torch.tensor([1, 2, 3, 0]), 4).float()
    log_probs = torch.log_softmax(torch.stack([right, half, wrong]) * 5, dim=-1)
    broker = ExpertiseBroker.from_validation(_fake_pool(log_probs, [3.0, 1.0, 0.5]), None, y)
    assert broker.values == pytest.approx([0.75, 0.25, 0.0])
    assert broker.bind(4.0).council == (0, 1)
    assert broker.bind(2.0).council == (1,)
    assert broker.bind(0.0).council == ()
    broker.observe(0, 1.0)  # member 0 got faster: the moving average is now 2.0
    assert broker.latency_s[0] == pytest.approx(2.0)
    assert broker.bind(3.0).names == ("m0", "m1")
    with pytest.raises(ValueError, match="latency_s"):
        broker.observe(0, -1.0)


# -- peer review and quadratic voting ----------------------------------------------------


def _random_log_probs(m: int, n: int, c: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.log_softmax(2 * torch.randn(m, n, c, generator=gen, dtype=torch.float64), -1)


def test_peer_review_is_cross_entropy_without_self_review():
    lp = _random_log_probs(3, 5, 4)
    scores = peer_review(lp, lp)
    for j in range(3):
        for i in range(3):
            if i == j:
                assert torch.isneginf(scores[j, i]).all()
            else:
                expected = (lp[i].exp() * lp[j]).sum(-1)
                torch.testing.assert_close(scores[j, i], expected)


@settings(max_examples=100, deadline=None)
@given(
    m=st.integers(min_value=2, max_value=6),
    credits=st.floats(min_value=0.0, max_value=10.0),
    temperature=st.floats(min_value=0.1, max_value=5.0),
    seed=st.integers(min_value=0, max_value=1000),
)
def test_quadratic_votes_spend_exactly_the_budget(m, credits, temperature, seed):
    lp = _random_log_probs(m, 3, 5, seed)
    scores = peer_review(lp, lp)
    votes = quadratic_votes(scores, credits, temperature)
    assert (votes >= 0).all()
    assert (votes.diagonal(dim1=0, dim2=1) == 0).all()  # nobody votes for itself
    spent = (votes**2).sum(dim=1)  # credits each reviewer spent, [M, N]
    torch.testing.assert_close(spent, torch.full_like(spent, credits))
    # votes are proportional to the utilities exp(score / tau) (the QV optimum)
    u = (scores / temperature).exp()
    ratio = votes / u.clamp_min(1e-300)
    off = ~torch.eye(m, dtype=torch.bool)
    r = ratio.permute(0, 2, 1)[off.unsqueeze(1).expand(m, 3, m)].reshape(m, 3, m - 1)
    if credits > 0:
        torch.testing.assert_close(r, r[..., :1].expand_as(r))


def test_quadratic_voting_optimum_beats_other_allocations():
    """For linear utility u, v = sqrt(B) u/|u| maximises u.v under |v|^2 <= B: compare with
    random allocations on the budget sphere."""
    scores = torch.tensor([[[-math.inf], [-0.2], [-1.5]]], dtype=torch.float64)  # 1 reviewer
    votes = quadratic_votes(scores, credits=4.0)[0, :, 0]
    u = scores[0, :, 0].exp()
    gen = torch.Generator().manual_seed(0)
    other = torch.rand(1000, 3, generator=gen, dtype=torch.float64)
    other[:, 0] = 0
    other = 2.0 * other / other.norm(dim=1, keepdim=True)
    assert (other @ u <= votes @ u + 1e-12).all()


def _one_hot_log_probs(answers: list[list[int]], classes: int) -> torch.Tensor:
    one_hot = torch.nn.functional.one_hot(torch.tensor(answers), classes).double()
    return one_hot.log()  # [M, N, C] with -inf off the answer


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_quadratic_voting_is_plurality_on_one_hot_members(data):
    """Proof. One-hot members (q_i = p_i = e_{a_i}): score[j, i] = log p_j(a_i) is 0 when
    a_j = a_i and -inf otherwise, so u is 1 or 0. Reviewer j spends its B credits equally on
    its k = n_{a_j} - 1 agreeing peers, sqrt(B/k) votes each (none if k = 0). A proposal of
    class c (held by n_c members) receives (n_c - 1) sqrt(B/(n_c - 1)) = sqrt(B (n_c - 1))
    votes, so class c's consensus mass is n_c sqrt(B (n_c - 1)) / total: strictly
    increasing in n_c. Hence a unique plurality class with n_c >= 2 wins; when every
    answer is distinct no vote is cast, the aggregate is the mean of the proposals, and
    its argmax (the smallest class present) is plurality's tie-break too."""
    m = data.draw(st.integers(min_value=2, max_value=7))
    answers = data.draw(st.lists(st.integers(0, 4), min_size=m, max_size=m))
    counts = Counter(answers).most_common()
    unique_top = len(counts) == 1 or counts[0][1] > counts[1][1]
    all_distinct = counts[0][1] == 1
    lp = _one_hot_log_probs([[a] for a in answers], 5)
    consensus, _ = aggregate(lp, quadratic_votes(peer_review(lp, lp), credits=2.0))
    if unique_top or all_distinct:
        assert (
            int(consensus.argmax(-1))
            == int(plurality(lp))
            == (counts[0][0] if unique_top else min(answers))
        )
    assert torch.isfinite(consensus).all()


@settings(max_examples=100, deadline=None)
@given(answers=st.lists(st.integers(0, 3), min_size=2, max_size=7))
def test_equal_utilities_give_the_mean_proposal_and_plurality(answers):
    """Reviewers that find every proposal equally likely (uniform p_j) give every proposal
    the same (M - 1) sqrt(B / (M - 1)) votes, so the consensus is the mean proposal; on
    one-hot proposals its argmax is the plurality (first class on ties)."""
    m = len(answers)
    proposals = _one_hot_log_probs([[a] for a in answers], 4)
    uniform = torch.full((m, 1, 4), -math.log(4), dtype=torch.float64)
    votes = quadratic_votes(peer_review(proposals, uniform), credits=1.0)
    consensus, weights = aggregate(proposals, votes)
    torch.testing.assert_close(weights, torch.full_like(weights, math.sqrt(m - 1)))
    torch.testing.assert_close(consensus, proposals.exp().mean(0))
    assert int(consensus.argmax(-1)) == int(plurality(proposals))


def test_plurality_against_counting():
    lp = _random_log_probs(5, 40, 3, seed=1)
    answers = lp.argmax(-1)
    for n in range(40):
        counts = Counter(answers[:, n].tolist())
        top = max(counts.values())
        assert int(plurality(lp)[n]) == min(c for c, k in counts.items() if k == top)


# -- the recurrent consensus -------------------------------------------------------------


def test_deliberation_rounds_and_forget_gate():
    lp = _random_log_probs(4, 6, 5, seed=2)
    trace = deliberate(lp, NSEDConfig(rounds=4, forget=0.3, prior_weight=0.5))
    assert trace.states.shape == (4, 6, 5) and trace.weights.shape == (4, 4, 6)
    torch.testing.assert_close(trace.states.sum(-1), torch.ones(4, 6, dtype=torch.float64))
    one = deliberate(lp, NSEDConfig(rounds=1))
    torch.testing.assert_close(trace.states[0], one.final)
    for r in range(1, 4):  # s_r = f s_{r-1} + (1 - f) a_r
        torch.testing.assert_close(
            trace.states[r], 0.3 * trace.states[r - 1] + 0.7 * trace.aggregates[r]
        )
    # round r's proposals mix the previous state in as a prior
    q = propose(lp, trace.states[0], 0.5)
    consensus, _ = aggregate(q, quadratic_votes(peer_review(q, lp)))
    torch.testing.assert_close(consensus, trace.aggregates[1])
    # f = 1 keeps round 1's answer; beta = 0 makes every round's aggregate the same
    frozen = deliberate(lp, NSEDConfig(rounds=3, forget=1.0))
    torch.testing.assert_close(frozen.states[2], frozen.states[0])
    static = deliberate(lp, NSEDConfig(rounds=3, forget=0.0, prior_weight=0.0))
    torch.testing.assert_close(static.states[2], static.states[0])


def test_nsed_fit_learns_gate_on_validation():
    gen = torch.Generator().manual_seed(3)
    y = torch.randint(0, 5, (60,), generator=gen)
    noise = torch.randn(4, 60, 5, generator=gen, dtype=torch.float64)
    lp = torch.log_softmax(noise * 2 + 1.5 * torch.nn.functional.one_hot(y, 5), -1)
    nsed = NSED(_fake_pool(lp, [1.0] * 4), council=[0, 1, 3], config=NSEDConfig(rounds=3))
    before = consensus_nll(nsed(None).final, y)
    chosen = nsed.fit(None, y)
    assert chosen["val_nll"] <= before + 1e-12
    assert nsed.config.forget == chosen["forget"]
    assert consensus_nll(nsed(None).final, y) == pytest.approx(chosen["val_nll"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"rounds": 0}, "rounds"), ({"forget": 1.5}, "forget"), ({"prior_weight": -0.1}, "prior")],
)
def test_config_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NSEDConfig(**kwargs)


def test_protocol_bad_input():
    with pytest.raises(ValueError, match="at least 2 members"):
        deliberate(_random_log_probs(1, 2, 3))
    with pytest.raises(ValueError, match="members, queries, classes"):
        deliberate(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="council"):
        NSED(object(), council=[0])
    with pytest.raises(ValueError, match="credits"):
        quadratic_votes(torch.zeros(2, 2, 1), credits=-1.0)


# -- the experiment ----------------------------------------------------------------------


def test_nsed_experiment_smoke(tmp_path):
    from gatelab.experiments import get

    result = get("nsed").run("smoke", seed=0, out_dir=tmp_path)
    assert "| budget" in result["table"] and (tmp_path / "nsed.png").exists()
    assert "| rotated |" in result["table"]
    run = result["runs"][0]["clean"]
    assert run["knapsack"]["agree"] == run["knapsack"]["budgets"]
    full = run["budgets"]["1.0"]
    # the whole budget binds every member worth more than chance
    assert set(full["council"]) == {n for n, m in run["pool"].items() if m["value"] > 0}
    assert len(full["fixed"]) == len(full["learned"]) == 3
    assert all(0.0 <= a <= 1.0 for a in full["fixed"] + full["learned"])
