"""Routing telemetry against hand-computed cases."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_routing

from gatelab import MoE
from gatelab.inspect import RoutingMonitor, routing_stats
from gatelab.routing import EMPTY, apply_capacity

# 4 experts, 2 slots. Scores are chosen per token so their entropies are easy:
#   token 0 uniform over 4 -> log 4; token 1 one-hot -> 0;
#   token 2 uniform over 2 -> log 2; token 3 uniform over 4 -> log 4.
SCORES = [
    [0.25, 0.25, 0.25, 0.25],
    [1.0, 0.0, 0.0, 0.0],
    [0.5, 0.5, 0.0, 0.0],
    [0.25, 0.25, 0.25, 0.25],
]
EXPERTS = [[0, 1], [0, EMPTY], [1, 0], [EMPTY, EMPTY]]


def example(**aux):
    return make_routing(EXPERTS, scores=SCORES, aux=aux)


def test_routing_stats_hand_computed():
    s = routing_stats(example())
    assert s["num_tokens"] == 4 and s["num_experts"] == 4 and s["top_k"] == 2
    assert s["tokens_per_expert"] == [3, 2, 0, 0]
    assert s["load_share"] == pytest.approx([0.6, 0.4, 0.0, 0.0])
    assert s["dead_experts"] == [2, 3] and s["num_dead_experts"] == 2
    assert s["routing_entropy"] == pytest.approx((2 * math.log(4) + math.log(2)) / 4)
    h = -(0.6 * math.log(0.6) + 0.4 * math.log(0.4))
    assert s["load_entropy"] == pytest.approx(h / math.log(4))
    assert s["empty_slots"] == 3
    assert s["dropped_slots"] == 0
    assert s["unrouted_tokens"] == 1
    assert s["max_load_ratio"] == pytest.approx(3 / (5 / 4))


def test_routing_stats_token_mask():
    # Drop tokens 0 and 3: loads [2, 1, 0, 0] from tokens 1 and 2.
    s = routing_stats(example(), torch.tensor([False, True, True, False]))
    assert s["num_tokens"] == 2
    assert s["tokens_per_expert"] == [2, 1, 0, 0]
    assert s["load_share"] == pytest.approx([2 / 3, 1 / 3, 0, 0])
    assert s["routing_entropy"] == pytest.approx(math.log(2) / 2)
    assert s["empty_slots"] == 1 and s["unrouted_tokens"] == 0
    assert s["max_load_ratio"] == pytest.approx(2 / (3 / 4))
    # A [B, S] mask works too.
    s2 = routing_stats(example(), torch.tensor([[0, 1], [1, 0]]))
    assert s2 == s


def test_routing_stats_is_json_serialisable():
    s = routing_stats(example(dropped=torch.tensor(2)))
    assert json.loads(json.dumps(s)) == s
    assert s["dropped_slots"] == 2


def test_dropped_slots_from_capacity():
    r = make_routing([[0, 1], [0, 1], [0, 1], [1, 0]], num_experts=2)
    s = routing_stats(apply_capacity(r, 0.5))  # 4 slots dropped (see test_capacity)
    assert s["dropped_slots"] == 4
    assert s["empty_slots"] == 4
    assert s["tokens_per_expert"] == [2, 2]
    assert s["unrouted_tokens"] == 1


def test_balanced_and_single_expert():
    r = make_routing([[0, 1], [2, 3], [1, 0], [3, 2]], logits=torch.zeros(4, 4))
    s = routing_stats(r)
    assert s["load_entropy"] == pytest.approx(1.0)
    assert s["max_load_ratio"] == pytest.approx(1.0)
    assert s["routing_entropy"] == pytest.approx(math.log(4))
    one = routing_stats(make_routing([[0], [0]], num_experts=1))
    assert one["load_entropy"] == 1.0 and one["max_load_ratio"] == 1.0
    assert one["routing_entropy"] == 0.0


def test_sigmoid_scores_are_normalised_for_entropy():
    # Unnormalised scores [0.5, 0.5] and [0.9, 0.3]: entropies log 2 and H(0.75, 0.25).
    r = make_routing([[0], [1]], scores=[[0.5, 0.5], [0.9, 0.3]])
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert routing_stats(r)["routing_entropy"] == pytest.approx((math.log(2) + h) / 2)


def test_no_tokens():
    r = make_routing(torch.zeros(0, 2, dtype=torch.long), num_experts=3)
    s = routing_stats(r)
    assert s["num_tokens"] == 0 and s["tokens_per_expert"] == [0, 0, 0]
    assert s["dead_experts"] == [0, 1, 2]
    assert s["routing_entropy"] == 0.0 and s["load_entropy"] == 0.0
    assert s["max_load_ratio"] == 0.0 and s["unrouted_tokens"] == 0


def test_bad_mask():
    with pytest.raises(ValueError, match="token_mask has 3 elements for 4 tokens"):
        routing_stats(example(), torch.ones(3))


# -- the monitor -----------------------------------------------------------------------------


def test_monitor_record_accumulates():
    monitor = RoutingMonitor()
    monitor.record("a", example())
    monitor.record("a", example(), torch.tensor([False, True, True, False]))
    monitor.record("b", example())
    summary = monitor.summary()
    assert set(summary) == {"a", "b"}
    a = summary["a"]
    assert a["calls"] == 2 and summary["b"]["calls"] == 1
    assert a["num_tokens"] == 6
    assert a["tokens_per_expert"] == [5, 3, 0, 0]
    assert a["dead_experts"] == [2, 3]
    assert a["empty_slots"] == 4 and a["unrouted_tokens"] == 1
    want_entropy = (2 * math.log(4) + math.log(2) + math.log(2)) / 6
    assert a["routing_entropy"] == pytest.approx(want_entropy)
    assert a["max_load_ratio"] == pytest.approx(5 / 2)
    assert json.loads(json.dumps(summary)) == summary
    monitor.reset()
    assert monitor.summary() == {}


def test_monitor_reduce_applies_a_function_to_the_counts():
    """``reduce(fn)`` as a distributed run uses it (fn an all-reduce): here fn doubles, as a
    sum over two ranks that saw the same tokens would; ``calls`` stays per process."""
    monitor = RoutingMonitor()
    monitor.record("a", example())
    monitor.record("b", example(), torch.tensor([False, True, True, False]))
    once = monitor.summary()
    seen = []

    def double(flat):
        seen.append(flat.dtype)
        return flat * 2

    monitor.reduce(double)
    twice = monitor.summary()
    assert seen == [torch.float64, torch.float64]
    for name in ("a", "b"):
        assert twice[name]["tokens_per_expert"] == [2 * n for n in once[name]["tokens_per_expert"]]
        assert twice[name]["num_tokens"] == 2 * once[name]["num_tokens"]
        assert twice[name]["empty_slots"] == 2 * once[name]["empty_slots"]
        assert twice[name]["routing_entropy"] == pytest.approx(once[name]["routing_entropy"])
        assert twice[name]["calls"] == once[name]["calls"]
        assert isinstance(twice[name]["num_tokens"], int)


def test_monitor_rejects_mixed_layers():
    monitor = RoutingMonitor()
    monitor.record("a", example())
    with pytest.raises(ValueError, match="num_experts=4, now 2"):
        monitor.record("a", make_routing([[0]], num_experts=2))


def test_monitor_hooks_every_moe():
    model = torch.nn.Sequential(
        MoE(8, 16, 4, 2),
        torch.nn.Linear(8, 8),
        MoE(8, 16, 6, 1, capacity_factor=0.5, router="sigmoid"),
    )
    x = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 2:] = False
    with RoutingMonitor().attach(model) as monitor:
        model(x)
        model[0](x, token_mask=mask)  # the mask given by keyword is honoured
        summary = monitor.summary()
    assert set(summary) == {"0", "2"}
    first = summary["0"]
    assert first["calls"] == 2 and first["num_tokens"] == 10 + 7
    assert sum(first["tokens_per_expert"]) == 2 * 17
    last = summary["2"]
    assert last["calls"] == 1 and last["num_experts"] == 6
    r = model[2].last_routing
    assert last["dropped_slots"] == int(r.aux["dropped"]) > 0
    assert last == {**routing_stats(r), "calls": 1}
    # After the with block the hooks are gone.
    model(x)
    assert monitor.summary() == summary


def test_monitor_positional_mask():
    moe = MoE(8, 16, 4, 2)
    monitor = RoutingMonitor().attach(moe)
    mask = torch.tensor([True, False, True])
    moe(torch.randn(3, 8), None, mask)
    s = monitor.summary()[type(moe).__name__]
    assert s["num_tokens"] == 2
    monitor.remove()
