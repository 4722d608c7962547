"""Auxiliary losses against hand-computed values (and HF's load_balancing_loss_func)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_routing

from gatelab.routing import (
    EMPTY,
    LOSSES,
    Routing,
    TopKRouter,
    cv_squared,
    importance_loss,
    load_loss,
    switch_balance_loss,
    z_loss,
)

SCORES = [[0.7, 0.3], [0.4, 0.6]]


def scored(experts, weights=None):
    scores = torch.tensor(SCORES)
    return make_routing(experts, weights, logits=scores.log(), scores=scores)


def test_loss_registry():
    assert sorted(LOSSES) == ["balance", "importance", "load", "z"]
    assert LOSSES["balance"] is switch_balance_loss and LOSSES["z"] is z_loss


# -- switch balance ---------------------------------------------------------------------


def test_switch_balance_balanced():
    # f = [1/2, 1/2], P = [0.55, 0.45]: 2 * (0.5 * 0.55 + 0.5 * 0.45) = 1
    assert switch_balance_loss(scored([[0], [1]])).item() == pytest.approx(1.0)


def test_switch_balance_collapsed():
    # f = [1, 0]: 2 * (1 * 0.55) = 1.1
    assert switch_balance_loss(scored([[0], [0]])).item() == pytest.approx(1.1)


def test_switch_balance_token_mask():
    # Only token 0 counts: f = [1, 0], P = [0.7, 0.3] -> 2 * 0.7
    r = scored([[0], [1]])
    assert switch_balance_loss(r, torch.tensor([True, False])).item() == pytest.approx(1.4)
    assert switch_balance_loss(r, torch.tensor([1.0, 0.0])).item() == pytest.approx(1.4)
    assert switch_balance_loss(r, torch.tensor([[1, 1]])).item() == pytest.approx(1.0)


def test_switch_balance_top2_and_empty_slots():
    # k = 2 over E = 2: f = [1, 1] (sums to k), P = [0.55, 0.45] -> 2 * 1 = 2
    assert switch_balance_loss(scored([[0, 1], [1, 0]])).item() == pytest.approx(2.0)
    # An empty slot is not counted: f = [1, 1/2] -> 2 * (0.55 + 0.225) = 1.55
    r = scored([[0, 1], [0, EMPTY]], [[0.5, 0.5], [1.0, 0.0]])
    assert switch_balance_loss(r).item() == pytest.approx(1.55)


def test_switch_balance_uniform_is_k():
    e, k = 4, 2
    experts = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]])
    r = make_routing(experts, torch.full((4, 2), 0.5), logits=torch.zeros(4, e))
    assert switch_balance_loss(r).item() == pytest.approx(k)


def test_switch_balance_gradient_flows_to_scores():
    logits = torch.randn(6, 4, requires_grad=True)
    scores = logits.softmax(-1)
    weights, experts = scores.topk(2, dim=-1)
    switch_balance_loss(Routing(logits, scores, experts, weights)).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_switch_balance_zero_tokens():
    r = make_routing(torch.zeros(0, 2, dtype=torch.long), num_experts=3)
    assert switch_balance_loss(r).item() == 0.0


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_switch_balance_matches_hf(top_k, masked):
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    batch, seq, e = 3, 5, 6
    logits = torch.randn(batch * seq, e)
    attention_mask = None
    if masked:
        attention_mask = torch.ones(batch, seq, dtype=torch.long)
        attention_mask[0, 3:] = 0
        attention_mask[2, :1] = 0
    want = mixtral.load_balancing_loss_func((logits,), e, top_k, attention_mask)
    router = TopKRouter(e, e, top_k)
    with torch.no_grad():
        router.weight.copy_(torch.eye(e))
    r = router(logits)
    got = switch_balance_loss(r, attention_mask)
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=1e-6)


# -- z-loss -------------------------------------------------------------------------------


def test_z_loss():
    logits = [[0.0, 0.0], [math.log(3.0), 0.0]]  # logsumexp: log 2 and log 4
    r = make_routing([[0], [0]], logits=logits)
    want = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert z_loss(r).item() == pytest.approx(want, rel=1e-6)
    assert z_loss(r, torch.tensor([0, 1])).item() == pytest.approx(math.log(4) ** 2, rel=1e-6)
    zero = make_routing(torch.zeros(0, 1, dtype=torch.long), num_experts=2)
    assert z_loss(zero).item() == 0.0


def test_z_loss_gradient():
    logits = torch.tensor([[1.0, 2.0]], requires_grad=True)
    r = Routing(logits, logits.softmax(-1), torch.tensor([[1]]), torch.ones(1, 1))
    z_loss(r).backward()
    # d/dl lse(l)^2 = 2 lse(l) softmax(l)
    lse = math.log(math.exp(1) + math.exp(2))
    want = [2 * lse * math.exp(v) / (math.exp(1) + math.exp(2)) for v in (1.0, 2.0)]
    assert logits.grad[0].tolist() == pytest.approx(want, rel=1e-6)


# -- Shazeer CV^2 -----------------------------------------------------------------------------


def test_cv_squared():
    # [1, 0.5, 0.5]: mean 2/3, unbiased var (1/9 + 1/36 + 1/36) / 2 = 1/12 -> 0.1875
    assert cv_squared(torch.tensor([1.0, 0.5, 0.5])).item() == pytest.approx(0.1875, rel=1e-5)
    assert cv_squared(torch.tensor([2.0, 2.0, 2.0])).item() == pytest.approx(0.0, abs=1e-7)
    assert cv_squared(torch.tensor([3.0])).item() == 0.0
    assert cv_squared(torch.tensor([4, 0])).item() == pytest.approx(2.0, rel=1e-6)


def test_importance_loss():
    # importance = column sums of the dense weights = [1.0, 0.5, 0.5]
    r = make_routing(
        [[0, 1], [0, 2], [1, EMPTY]],
        [[0.6, 0.2], [0.4, 0.5], [0.3, 0.0]],
        num_experts=3,
    )
    assert importance_loss(r).item() == pytest.approx(0.1875, rel=1e-5)
    # Without token 2: importance [1.0, 0.2, 0.5], mean 17/30
    imp = torch.tensor([1.0, 0.2, 0.5])
    want = (imp.var() / imp.mean() ** 2).item()
    got = importance_loss(r, torch.tensor([True, True, False])).item()
    assert got == pytest.approx(want, rel=1e-5)


def test_importance_loss_has_gradient():
    weights = torch.tensor([[0.6, 0.4], [0.9, 0.1]], requires_grad=True)
    r = Routing(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([[0, 1], [0, 2]]), weights)
    importance_loss(r).backward()
    assert weights.grad is not None and weights.grad.abs().sum() > 0


def test_load_loss():
    # loads [2, 1, 1]: mean 4/3, unbiased var (4/9 + 1/9 + 1/9) / 2 = 1/3 -> 0.1875
    r = make_routing([[0, 1], [0, 2]], num_experts=3)
    assert load_loss(r).item() == pytest.approx(0.1875, rel=1e-5)
    # Only token 0: loads [1, 1, 0], mean 2/3, var 1/3 -> 0.75
    assert load_loss(r, torch.tensor([1, 0])).item() == pytest.approx(0.75, rel=1e-5)


def test_losses_reject_bad_mask():
    r = scored([[0], [1]])
    for loss in (switch_balance_loss, z_loss, importance_loss, load_loss):
        with pytest.raises(ValueError, match="token_mask has 3 elements for 2 tokens"):
            loss(r, torch.ones(3))
