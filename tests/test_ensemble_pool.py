"""The member pool: counted multiply-adds, measured latency, stacked log-probs and costs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gatelab.ensemble import LogitsOnly, Member, MemberPool, count_flops, measure_latency
from gatelab.models import build_model


def test_count_flops_of_linear_and_conv_layers():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.ReLU(), nn.Linear(10, 3))
    assert count_flops(mlp, torch.zeros(5, 1, 8, 8)) == 64 * 10 + 10 * 3
    conv = nn.Conv2d(2, 4, 3)  # 6x6 output of 4 maps, each 2*3*3 multiply-adds
    assert count_flops(conv, torch.zeros(1, 2, 8, 8)) == 6 * 6 * 4 * 2 * 9


def test_count_flops_of_an_moe_counts_only_the_chosen_experts():
    _, model = build_model(
        "mlp",
        {
            "input_dim": 4,
            "hidden_dims": [8, 8],
            "num_classes": 3,
            "moe_layers": [1],
            "moe": {"num_experts": 4, "top_k": 2, "hidden_dim": 6},
        },
    )
    flops = count_flops(LogitsOnly(model), torch.zeros(3, 4))
    # dense 4->8, router 8*4, two experts of 8*6 + 6*8, head 8->3
    assert flops == 4 * 8 + 8 * 4 + 2 * (8 * 6 + 6 * 8) + 8 * 3


def _member(name, bias, flops=10):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        model[1].bias.fill_(bias)
    return Member(name, model.eval(), params=15, flops=flops, latency_s=0.001)


def test_pool_stacks_log_probs_and_costs():
    pool = MemberPool([_member("a", 0.0), _member("b", 1.0, flops=20)])
    x = torch.randn(5, 4)
    lps = pool.log_probs(x)
    assert lps.shape == (2, 5, 3)
    assert torch.allclose(lps.exp().sum(-1), torch.ones(2, 5))
    assert not lps.requires_grad
    costs = pool.costs()
    assert costs["flops"].tolist() == [10.0, 20.0]
    assert set(costs) >= {"latency_s", "flops", "params"}
    assert len(pool) == 2 and pool.names == ["a", "b"]


def test_pool_refuses_bad_members_and_latency_is_positive():
    with pytest.raises(ValueError, match="at least one"):
        MemberPool([])
    with pytest.raises(ValueError, match="unique"):
        MemberPool([_member("a", 0.0), _member("a", 1.0)])
    model = nn.Linear(4, 3)
    assert measure_latency(model, torch.zeros(1, 4), repeats=3) > 0
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(model, torch.zeros(1, 4), repeats=0)


def test_digits_pool_smoke():
    from gatelab.ensemble import digits_pool

    pool, data = digits_pool("smoke", 0)
    assert len(pool) >= 5
    assert set(data) == {"train", "val", "test"}
    x, y = data["val"]
    assert pool.log_probs(x).shape == (len(pool), len(y), 10)
    kinds = {type(m.model.inner).__name__ for m in pool.members}
    assert {"MLPClassifier", "LeNet5"} <= kinds
    assert any(m.classes is not None for m in pool.members)
    assert all(m.flops > 0 and m.latency_s > 0 for m in pool.members)
    with pytest.raises(ValueError, match="scale"):
        digits_pool("huge", 0)
