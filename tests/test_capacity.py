"""Expert capacity: which slots are dropped, and how the drop is recorded."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_routing
from hypothesis import given, settings
from hypothesis import strategies as st

from gatelab import MoE
from gatelab.routing import EMPTY, apply_capacity, expert_capacity


def test_expert_capacity():
    assert expert_capacity(4, 2, 2, 0.5) == 2  # ceil(0.5 * 4 * 2 / 2)
    assert expert_capacity(10, 2, 4, 1.0) == 5
    assert expert_capacity(10, 1, 4, 1.0) == 3  # ceil(2.5)
    assert expert_capacity(10, 1, 4, 1.25) == 4  # ceil(3.125)
    assert expert_capacity(0, 2, 4, 1.0) == 0


def test_drops_follow_slot_rank_then_token_order():
    # 4 tokens, k = 2, E = 2, C = ceil(0.5 * 4 * 2 / 2) = 2.
    # Priority: slot 0 of tokens 0..3, then slot 1 of tokens 0..3.
    #   expert 0 is asked by t0/s0, t1/s0, t2/s0, t3/s1 -> keeps t0/s0, t1/s0
    #   expert 1 is asked by t3/s0, t0/s1, t1/s1, t2/s1 -> keeps t3/s0, t0/s1
    r = make_routing(
        [[0, 1], [0, 1], [0, 1], [1, 0]],
        [[0.6, 0.4], [0.7, 0.3], [0.8, 0.2], [0.9, 0.1]],
        num_experts=2,
    )
    out = apply_capacity(r, 0.5)
    assert out.experts.tolist() == [[0, 1], [0, EMPTY], [EMPTY, EMPTY], [1, EMPTY]]
    torch.testing.assert_close(
        out.weights, torch.tensor([[0.6, 0.4], [0.7, 0.0], [0.0, 0.0], [0.9, 0.0]])
    )
    assert int(out.aux["dropped"]) == 4
    assert int(out.aux["capacity"]) == 2
    assert out.tokens_per_expert().tolist() == [2, 2]
    # logits and scores are untouched
    assert out.logits is r.logits and out.scores is r.scores


def test_existing_empty_slots_neither_count_nor_take_capacity():
    # E = 2, k = 2, T = 3, cf = 1/3 -> C = ceil(1/3 * 3 * 2 / 2) = 1.
    r = make_routing([[EMPTY, 0], [1, EMPTY], [0, 1]], [[0, 1], [1, 0], [0.5, 0.5]], num_experts=2)
    out = apply_capacity(r, 1 / 3)
    # slot 0: t1 -> 1 (kept), t2 -> 0 (kept); slot 1: t0 -> 0 (dropped), t2 -> 1 (dropped)
    assert out.experts.tolist() == [[EMPTY, EMPTY], [1, EMPTY], [0, EMPTY]]
    assert int(out.aux["dropped"]) == 2
    assert int(out.aux["capacity"]) == 1


def test_no_drop_when_capacity_is_large():
    r = make_routing([[0, 1], [0, 1], [0, 1]], num_experts=3)
    out = apply_capacity(r, 2.0)
    assert torch.equal(out.experts, r.experts) and torch.equal(out.weights, r.weights)
    assert int(out.aux["dropped"]) == 0


def test_aux_is_kept():
    r = make_routing([[0], [0]], num_experts=2, aux={"expert_bias": torch.ones(2)})
    out = apply_capacity(r, 0.5)
    assert set(out.aux) == {"expert_bias", "dropped", "capacity"}
    assert int(out.aux["dropped"]) == 1


def test_zero_tokens():
    r = make_routing(torch.zeros(0, 2, dtype=torch.long), num_experts=3)
    out = apply_capacity(r, 1.0)
    assert out.experts.shape == (0, 2) and int(out.aux["dropped"]) == 0


def reference_keep(experts: list[list[int]], num_experts: int, capacity: int):
    """Greedy Switch/GShard priority in plain Python: slot rank first, then token order."""
    taken = [0] * num_experts
    keep = [[False] * len(row) for row in experts]
    for s in range(len(experts[0]) if experts else 0):
        for t, row in enumerate(experts):
            e = row[s]
            if e != EMPTY and taken[e] < capacity:
                taken[e] += 1
                keep[t][s] = True
    return keep


@settings(max_examples=40, deadline=None)
@given(
    num_tokens=st.integers(0, 30),
    num_experts=st.integers(1, 6),
    data=st.data(),
    capacity_factor=st.sampled_from([0.1, 0.5, 1.0, 1.5]),
)
def test_capacity_matches_greedy_reference(num_tokens, num_experts, data, capacity_factor):
    top_k = data.draw(st.integers(1, num_experts))
    rows = [data.draw(st.permutations(range(num_experts)))[:top_k] for _ in range(num_tokens)]
    rows = [[EMPTY if data.draw(st.booleans()) else e for e in row] for row in rows]
    r = make_routing(rows or torch.zeros(0, top_k, dtype=torch.long), num_experts=num_experts)
    out = apply_capacity(r, capacity_factor)
    capacity = math.ceil(capacity_factor * num_tokens * top_k / num_experts)
    keep = reference_keep(rows, num_experts, capacity)
    want = [
        [e if k else EMPTY for e, k in zip(row, ks, strict=True)]
        for row, ks in zip(rows, keep, strict=True)
    ]
    assert out.experts.tolist() == (want or [])
    assert int(out.aux["dropped"]) == int(r.valid.sum()) - int(out.valid.sum())
    assert bool((out.tokens_per_expert() <= capacity).all())


def test_moe_capacity_records_drops():
    moe = MoE(8, 8, 4, 2, capacity_factor=0.5)
    moe(torch.randn(10, 8))
    r = moe.last_routing
    # C = ceil(0.5 * 10 * 2 / 4) = 3, so at most 12 of the 20 slots survive.
    assert int(r.aux["capacity"]) == 3
    assert int(r.aux["dropped"]) == 20 - int(r.valid.sum()) >= 8
    assert bool((r.tokens_per_expert() <= 3).all())


def test_moe_is_dropless_by_default():
    moe = MoE(8, 8, 4, 2)
    moe(torch.randn(10, 8))
    assert "dropped" not in moe.last_routing.aux
    assert bool(moe.last_routing.valid.all())


def test_moe_dropped_tokens_use_only_the_shared_expert():
    """A token whose every slot is dropped still gets the shared expert's output."""
    moe = MoE(8, 8, 4, 1, shared_hidden_dim=8, capacity_factor=0.25, dispatcher="loop")
    x = torch.randn(8, 8)
    out = moe(x)
    dropped = ~moe.last_routing.valid.any(dim=1)
    assert dropped.any()
    torch.testing.assert_close(out[dropped], moe.shared_experts(x[dropped]))


@pytest.mark.parametrize("bad", [0, -1.0])
def test_bad_capacity_factor(bad):
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        expert_capacity(4, 2, 2, bad)
