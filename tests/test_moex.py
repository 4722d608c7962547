"""MoE-X: the sparsity-aware router, and MoE <-> wide masked MLP (exact, both ways)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import grads_of

from gatelab.convert import moe_to_wide, wide_to_moe
from gatelab.dispatch import grouped_dispatch, loop_dispatch
from gatelab.experiments import moex
from gatelab.experts import ExpertBank
from gatelab.layers import (
    MoE,
    WideMLP,
    mask_to_routing,
    moex_layer,
    routing_mask,
)
from gatelab.models import MLPClassifier, MLPConfig
from gatelab.routing import EMPTY, ROUTERS, SparsityAwareRouter


def bank_with(rows, bias=None, glu=False):
    """A plain ReLU bank [E, F, D] with the given first-layer rows (and biases)."""
    rows = torch.as_tensor(rows, dtype=torch.float64)
    e, f, d = rows.shape
    bank = ExpertBank(e, d, f // 2 if glu else f, act="relu", glu=glu, bias=bias is not None)
    bank = bank.double()
    with torch.no_grad():
        getattr(bank, bank.in_name).copy_(rows)
        if bias is not None:
            getattr(bank, bank.in_name + "_bias").copy_(torch.as_tensor(bias))
    return bank


# -- the router -----------------------------------------------------------------------------


def test_router_by_hand():
    # expert 0: rows (1, 0), (3, 0): mean (2, 0), var (1, 0); expert 1: rows (0, 1), (0, -1):
    # mean (0, 0), var (0, 1). At x = (1, 1): z_0 = 2 / 1, z_1 = 0 / 1.
    bank = bank_with([[[1, 0], [3, 0]], [[0, 1], [0, -1]]])
    router = SparsityAwareRouter(2, 2, top_k=1, eps=1e-12).bind_experts(bank)
    routing = router(torch.tensor([[1.0, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(routing.logits, torch.tensor([[-2.0, 0.0]]))
    assert routing.experts.tolist() == [[1]]  # expert 1 is the sparser one
    torch.testing.assert_close(routing.weights, torch.tensor([[1 / (1 + math.exp(-2))]]))
    phi = 0.5 * (1 + math.erf(2 / math.sqrt(2)))
    torch.testing.assert_close(routing.aux["expected_l0"], torch.tensor([[2 * phi, 1.0]]))
    # the actual L0 of ReLU(W_e x): expert 0 -> relu(1, 3) = 2 units, expert 1 -> relu(1, -1) = 1
    x = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    actual = [int((bank.weights().activate(x @ bank.up_proj[e].T) > 0).sum()) for e in range(2)]
    assert actual == [2, 1]


def test_router_bias_enters_mean_and_variance():
    bank = bank_with([[[1.0], [1.0]], [[1.0], [1.0]]], bias=[[1.0, 3.0], [-2.0, -2.0]])
    router = SparsityAwareRouter(1, 2, top_k=2, eps=1e-12).bind_experts(bank)
    z = router.standardized_mean(torch.tensor([[0.0]], dtype=torch.float64))
    # x = 0: expert 0's pre-activations are its biases, mean 2, var 1; expert 1: mean -2, var 0
    assert float(z[0, 0].detach()) == pytest.approx(2.0)
    assert float(z[0, 1].detach()) < -1e5


def test_glu_bank_uses_gate_rows_only():
    torch.manual_seed(0)
    bank = ExpertBank(4, 6, 5, act="relu", glu=True)
    router = SparsityAwareRouter(6, 4, top_k=2).bind_experts(bank)
    x = torch.randn(7, 6)
    before = router(x).logits
    with torch.no_grad():
        bank.gate_up_proj[:, 5:].normal_()  # the up rows
    torch.testing.assert_close(router(x).logits, before)
    with torch.no_grad():
        bank.gate_up_proj[:, :5].normal_()  # the gate rows
    assert not torch.allclose(router(x).logits, before)


def test_score_correlates_negatively_with_actual_l0():
    # Experts with different bias levels differ a lot in sparsity; the router must rank them.
    torch.manual_seed(1)
    bank = ExpertBank(8, 16, 64, act="relu", glu=False, bias=True)
    with torch.no_grad():
        bank.up_proj_bias.copy_(
            torch.linspace(-1.0, 1.0, 8).unsqueeze(1) + 0.1 * torch.randn(8, 64)
        )
    router = SparsityAwareRouter(16, 8, top_k=2).bind_experts(bank)
    x = torch.randn(200, 16)
    scores = router(x).scores.double()
    wide = moe_to_wide(bank)
    l0 = (wide.hidden(x) > 0).unflatten(1, (8, 64)).sum(-1).double()
    rho = moex.spearman_rows(scores, l0)
    assert float(rho.mean()) < -0.8


def test_gradient_flows_into_expert_weights_unless_detached():
    bank = ExpertBank(4, 6, 5, act="relu", glu=False, bias=True)
    for detach in (False, True):
        router = SparsityAwareRouter(6, 4, top_k=2, detach_experts=detach).bind_experts(bank)
        x = torch.randn(9, 6, requires_grad=True)
        weights = router(x).weights
        grads = torch.autograd.grad(weights.sum(), [x, bank.up_proj], allow_unused=True)
        assert grads[0] is not None and grads[0].abs().sum() > 0
        assert (grads[1] is None) == detach


def test_unbound_router_and_wrong_bank_are_clear_errors():
    router = ROUTERS.get("moex")(6, 4, 2)
    with pytest.raises(RuntimeError, match="bind it first with router.bind_experts"):
        router(torch.randn(3, 6))
    with pytest.raises(ValueError, match="num_experts=4, rows, dim=6"):
        router.bind_experts(ExpertBank(5, 6, 3))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SparsityAwareRouter(6, 4, 2, temperature=0.0)


@pytest.mark.parametrize("tokens", [0, 1, 30])
def test_moex_dispatch_equals_loop_oracle(tokens):
    moe = moex_layer(6, 5, 4, top_k=4, bias=True).double()  # k_max = E
    x = torch.randn(tokens, 6, dtype=torch.float64)
    routing = moe.router(x)
    keep = torch.rand(routing.experts.shape) > 0.4  # some empty slots too
    routing = routing.keep_slots(keep)
    w = moe.experts.weights()
    x = x.requires_grad_()
    weights = routing.weights.detach().double().requires_grad_()
    ref = loop_dispatch(x, routing.experts, weights, w)
    out = grouped_dispatch(x, routing.experts, weights, w)
    torch.testing.assert_close(out, ref)
    inputs = [x, weights, w.w_in, w.w_out, w.b_in, w.b_out]
    for got, want in zip(grads_of(out, inputs), grads_of(ref, inputs), strict=True):
        torch.testing.assert_close(got, want)


def test_config_binds_the_router():
    cfg = MLPConfig(hidden_dims=[64, 64], moe_layers="all", router="moex", act="relu")
    model = MLPClassifier(cfg)
    for moe in model.moe_layers().values():
        assert moe.router.bank is moe.experts
        assert moe.router.state_dict() == {}  # the bank is not stored twice
    out = model(torch.randn(4, 64), torch.randint(0, 10, (4,)))
    out.total_loss.backward()
    assert all(m.experts.up_proj.grad is not None for m in model.moe_layers().values())


# -- MoE <-> wide masked MLP -------------------------------------------------------------------


def random_params(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    return module


def drop_some(seed):
    gen = torch.Generator().manual_seed(seed)
    return lambda r: r.keep_slots(torch.rand(r.experts.shape, generator=gen) > 0.3)


@pytest.mark.parametrize("glu, act", [(False, "relu"), (True, "silu"), (False, "gelu")])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("router", ["topk", "dynamic_k", "moex"])
@pytest.mark.parametrize("tokens", [0, 1, 25])
def test_moe_to_wide_is_exact(glu, act, bias, router, tokens):
    bank = random_params(ExpertBank(5, 6, 4, act=act, glu=glu, bias=bias).double(), 3)
    moe = MoE(6, 4, 5, top_k=3, router=router, experts=bank).double()
    x = torch.randn(tokens, 6, dtype=torch.float64)
    y = moe(x, routing_edit=drop_some(tokens))
    routing = moe.last_routing
    if tokens > 10:
        assert (routing.experts == EMPTY).any()
    wide = moe_to_wide(moe)
    assert wide.width == 5 * 4 and wide.glu == glu
    torch.testing.assert_close(wide(x, routing_mask(routing, 4)), y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("glu, act", [(False, "relu"), (True, "silu")])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tokens", [0, 1, 25])
def test_wide_to_moe_is_exact(glu, act, bias, tokens):
    wide = random_params(WideMLP(6, 5, 4, act=act, glu=glu, bias=bias).double(), 7)
    gen = torch.Generator().manual_seed(tokens)
    gates = torch.rand(tokens, 5, generator=gen, dtype=torch.float64)
    gates = gates * (torch.rand(tokens, 5, generator=gen) > 0.5)  # idle experts
    if tokens:
        gates[0] = 0  # a token with no expert at all
    mask = gates.repeat_interleave(4, dim=1)
    x = torch.randn(tokens, 6, dtype=torch.float64, generator=gen)
    moe = wide_to_moe(wide, top_k=5)
    routing = mask_to_routing(mask, 4)
    y = moe(x, routing_edit=lambda r: mask_to_routing(mask, 4, r.num_slots))
    torch.testing.assert_close(y, wide(x, mask), rtol=1e-12, atol=1e-12)
    ref = loop_dispatch(x, routing.experts, routing.weights.double(), moe.experts.weights())
    torch.testing.assert_close(ref, wide(x, mask), rtol=1e-12, atol=1e-12)
    # and back again: the same weights
    again = moe_to_wide(moe)
    for a, b in zip(again.parameters(), wide.parameters(), strict=True):
        assert torch.equal(a, b)


def test_mask_to_routing_by_hand():
    # 3 blocks of 2 units; token 0 uses blocks 0 and 2, token 1 none, token 2 block 1
    mask = torch.tensor([[0.5, 0.5, 0, 0, 0.25, 0.25], [0.0] * 6, [0, 0, 1.0, 1.0, 0, 0]])
    routing = mask_to_routing(mask, 2)
    assert routing.experts.tolist() == [[0, 2], [EMPTY, EMPTY], [1, EMPTY]]
    assert routing.weights.tolist() == [[0.5, 0.25], [0.0, 0.0], [1.0, 0.0]]
    torch.testing.assert_close(routing_mask(routing, 2), mask)
    with pytest.raises(ValueError, match="raise num_slots to at least 2"):
        mask_to_routing(mask, 2, num_slots=1)
    with pytest.raises(ValueError, match="not constant within each block"):
        mask_to_routing(torch.tensor([[1.0, 0.5, 0, 0]]), 2)


def test_wide_mlp_errors():
    wide = WideMLP(4, 3, 2, bias=True)
    with pytest.raises(ValueError, match="mask must be"):
        wide(torch.randn(2, 4), torch.ones(2, 5))
    with pytest.raises(ValueError, match="not constant within each block"):
        wide(torch.randn(1, 4), torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0, 0.0]]))
    # without biases any unit mask is a valid wide MLP
    WideMLP(4, 3, 2)(torch.randn(1, 4), torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="shared expert"):
        moe_to_wide(MoE(4, 2, 3, shared_hidden_dim=4))


def test_moex_experiment_smoke(tmp_path):
    result = moex.run("smoke", seed=0, out_dir=tmp_path)
    runs = result["runs"]
    assert set(runs) == {"topk-gelu", "topk-relu", "moex"}
    # GELU is never exactly 0: every routed unit counts; ReLU experts are sparser
    assert runs["topk-gelu"][0]["fraction"] == pytest.approx([1.0, 1.0], abs=1e-3)
    assert all(f < 1.0 for f in runs["moex"][0]["fraction"])
    assert "| moex |" in result["table"]
    json.dumps(result, allow_nan=False)  # `gatelab experiment` writes it as JSON
