"""Dynamic-k routing (DynaMoE percentile threshold, top-p) and the K_max schedules over depth."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import grads_of, identity_router

from gatelab.dispatch import grouped_dispatch, loop_dispatch
from gatelab.experiments import dynamoe
from gatelab.experts import ExpertBank
from gatelab.layers import MoE
from gatelab.models import LM, ConfigError, LMConfig, MLPClassifier, MLPConfig, dense_equivalent
from gatelab.routing import (
    EMPTY,
    K_SCHEDULES,
    ROUTERS,
    DynamicKRouter,
    TopPRouter,
    resolve_k_schedule,
)


def probs_router(cls, probs, **kwargs):
    """A router over E = len(probs[0]) experts whose input x = log(probs) gives scores = probs."""
    probs = torch.tensor(probs, dtype=torch.float64)
    e = probs.shape[1]
    router = identity_router(cls(e, e, **kwargs))
    return router, probs.log().float()


# -- schedules ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("uniform", [4, 4, 4, 4, 4]),
        ("descending", [4, 3, 3, 2, 1]),  # 4 - 3 * l / 4, rounded half up
        ("ascending", [1, 2, 3, 3, 4]),
        ("pyramid", [1, 3, 4, 3, 1]),
        ("valley", [4, 3, 1, 3, 4]),
        ("wave", [4, 1, 4, 1, 4]),
    ],
)
def test_schedules_by_hand(name, expected):
    assert resolve_k_schedule(name, 5, 1, 4) == expected
    assert [K_SCHEDULES.get(name)(i, 5, 1, 4) for i in range(5)] == expected


def test_six_schedules_registered_and_one_layer_gets_k_max():
    assert set(K_SCHEDULES.names()) == {
        "uniform",
        "descending",
        "ascending",
        "pyramid",
        "valley",
        "wave",
    }
    for name in K_SCHEDULES.names():
        assert resolve_k_schedule(name, 1, 2, 3) == [3]
        values = resolve_k_schedule(name, 7, 2, 6)
        assert all(2 <= k <= 6 for k in values) and max(values) == 6


def test_schedule_list_and_callable():
    assert resolve_k_schedule([1, 3, 2], 3, 1, 4, num_experts=4) == [1, 3, 2]
    assert resolve_k_schedule(lambda i, n, lo, hi: lo + i, 3, 1, 4) == [1, 2, 3]


@pytest.mark.parametrize(
    "args, match",
    [
        (([1, 2], 3, 1, 4), "gives 2 values for 3 MoE layers"),
        (([1, 2, 9], 3, 1, 9, 8), "k_max=9 exceeds num_experts=8"),
        (([1, 2, 9], 3, 1, 4, 8), "K_max=9 for MoE layer 2"),
        (("uniform", 3, 3, 2), "k_min=3 exceeds k_max=2"),
        (("steps", 3, 1, 2), "unknown k schedule 'steps'"),
        (("uniform", 0, 1, 2), "num_layers must be a positive int"),
        ((lambda *a: 0, 2, 1, 2), "every K_max must be an int"),
        ((3.5, 2, 1, 2), "a k schedule is a name"),
    ],
)
def test_schedule_errors(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        resolve_k_schedule(*args)


# -- the percentile (DynaMoE) router ---------------------------------------------------------

# Scores of two tokens, sorted over the batch: .05 .10 .12 .15 .18 .30 .40 .70
PROBS = [[0.7, 0.15, 0.1, 0.05], [0.4, 0.3, 0.18, 0.12]]


@pytest.mark.parametrize(
    "percentile, top_k, experts, weights",
    [
        # rank ceil(.5 * 8) = 4 -> tau = .15: token 0 keeps .7; token 1 keeps .4, .3, .18
        (0.5, 3, [[0, EMPTY, EMPTY], [0, 1, 2]], [[0.7, 0, 0], [0.4, 0.3, 0.18]]),
        (0.5, 2, [[0, EMPTY], [0, 1]], [[0.7, 0], [0.4, 0.3]]),  # K_max caps token 1
        # rank 6 -> tau = .30 (not kept: strictly above)
        (
            0.75,
            4,
            [[0, EMPTY, EMPTY, EMPTY], [0, EMPTY, EMPTY, EMPTY]],
            [[0.7, 0, 0, 0], [0.4, 0, 0, 0]],
        ),
        # rank 1 -> tau = .05: everything above it, token 0 loses only its last expert
        (0.1, 4, [[0, 1, 2, EMPTY], [0, 1, 2, 3]], [[0.7, 0.15, 0.1, 0], [0.4, 0.3, 0.18, 0.12]]),
    ],
)
def test_percentile_router_by_hand(percentile, top_k, experts, weights):
    router, x = probs_router(DynamicKRouter, PROBS, top_k=top_k, percentile=percentile)
    routing = router(x)
    assert routing.experts.tolist() == experts
    torch.testing.assert_close(routing.weights, torch.tensor(weights), atol=1e-6, rtol=0)
    assert routing.num_slots == top_k


def test_percentile_router_k_min_and_normalize():
    router, x = probs_router(DynamicKRouter, PROBS, top_k=3, percentile=0.75, k_min=2)
    assert router(x).experts.tolist() == [[0, 1, EMPTY], [0, 1, EMPTY]]
    router.normalize = True
    torch.testing.assert_close(router(x).weights.sum(1), torch.ones(2))


def test_percentile_router_running_threshold():
    router, x = probs_router(DynamicKRouter, PROBS, top_k=3, percentile=0.5, momentum=0.25)
    router.eval()  # before any training batch: the batch threshold
    assert float(router(x).aux["threshold"]) == pytest.approx(0.15, abs=1e-6)
    router.train()
    router(x)  # the first batch sets the running threshold
    assert float(router.running_threshold) == pytest.approx(0.15, abs=1e-6)
    y = torch.tensor([[0.25, 0.25, 0.25, 0.25]]).log()  # tau = .25 for this batch
    router(y)
    assert float(router.running_threshold) == pytest.approx(0.75 * 0.15 + 0.25 * 0.25, abs=1e-6)
    router.eval()  # eval routes by the running threshold, token by token
    routing = router(y)
    assert float(routing.aux["threshold"]) == pytest.approx(0.175, abs=1e-6)
    assert bool(routing.valid.all())  # all four 0.25 > 0.175: K_max = 3 slots, all used


def test_percentile_router_mean_k_follows_the_percentile():
    # Before the K_max clamp, (1 - q) * E experts per token on average.
    router = DynamicKRouter(16, 8, top_k=8, percentile=0.75)
    routing = router(torch.randn(400, 16))
    assert float(routing.valid.sum(1).float().mean()) == pytest.approx(2.0, abs=0.05)
    counts = routing.valid.sum(1)
    assert int(counts.min()) >= 1 and int(counts.max()) > 2  # the number varies per token


# -- top-p ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "top_p, top_k, experts",
    [
        (0.45, 4, [[0, EMPTY, EMPTY, EMPTY]]),  # 0.5 already holds 0.45
        (0.6, 4, [[0, 1, EMPTY, EMPTY]]),  # 0.5 < 0.6, then 0.8 >= 0.6
        (0.85, 4, [[0, 1, 2, EMPTY]]),
        (0.85, 2, [[0, 1]]),  # K_max caps it
        (0.99, 4, [[0, 1, 2, 3]]),
    ],
)
def test_top_p_by_hand(top_p, top_k, experts):
    router, x = probs_router(TopPRouter, [[0.5, 0.3, 0.15, 0.05]], top_k=top_k, top_p=top_p)
    routing = router(x)
    assert routing.experts.tolist() == experts
    expected = torch.tensor([0.5, 0.3, 0.15, 0.05])[: routing.num_slots] * routing.valid[0]
    torch.testing.assert_close(routing.weights[0], expected, atol=1e-6, rtol=0)


def test_top_p_depends_on_each_token_alone():
    router = TopPRouter(8, 6, top_k=6, top_p=0.7)
    x = torch.randn(20, 8)
    assert torch.equal(router(x).experts[:5], router(x[:5]).experts)


# -- shared router behaviour -------------------------------------------------------------------

DYNAMIC = {
    "dynamic_k": {"percentile": 0.6},
    "top_p": {"top_p": 0.6},
}


@pytest.mark.parametrize("name", sorted(DYNAMIC))
def test_router_gradient_reaches_router_weight(name):
    router = ROUTERS.get(name)(6, 5, 3, **DYNAMIC[name])
    routing = router(torch.randn(30, 6))
    (routing.weights * torch.randn_like(routing.weights)).sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(DYNAMIC))
@pytest.mark.parametrize("glu", [True, False])
@pytest.mark.parametrize("tokens", [0, 1, 37])
@pytest.mark.parametrize("top_k", [1, 3, 5])
def test_dispatch_of_dynamic_routing_equals_loop_oracle(name, glu, tokens, top_k):
    torch.manual_seed(tokens + top_k)
    router = ROUTERS.get(name)(6, 5, top_k, **DYNAMIC[name]).double()
    bank = ExpertBank(5, 6, 4, act="relu" if glu else "gelu", glu=glu, bias=True).double()
    x = torch.randn(tokens, 6, dtype=torch.float64, requires_grad=True)
    routing = router(x)
    assert routing.experts.shape == (tokens, top_k)
    if tokens > 10 and top_k > 1:
        assert (routing.experts == EMPTY).any() and (routing.valid.sum(1) > 1).any()
    # Leaves of their own, so the two dispatches do not share (and free) the router's graph.
    x = x.detach().requires_grad_()
    weights = routing.weights.detach().double().requires_grad_()
    w = bank.weights()
    inputs = [x, weights, w.w_in, w.w_out, w.b_in, w.b_out]
    ref = loop_dispatch(x, routing.experts, weights, w)
    out = grouped_dispatch(x, routing.experts, weights, w)
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads_of(out, inputs), grads_of(ref, inputs), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", sorted(DYNAMIC))
def test_moe_layer_with_dynamic_router_edge_cases(name):
    moe = MoE(6, 4, 5, top_k=5, router=name, router_kwargs=DYNAMIC[name], experts="mlp")
    assert moe(torch.randn(0, 6)).shape == (0, 6)
    assert moe.last_routing.experts.shape == (0, 5)
    y = moe(torch.randn(1, 6))  # one token: the batch is its 5 scores
    assert y.shape == (1, 6) and 1 <= int(moe.last_routing.valid.sum()) <= 5
    moe(torch.randn(2, 7, 6)).sum().backward()  # k_max = E on a batch of sequences
    assert moe.router.weight.grad is not None


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (DynamicKRouter, {"percentile": 0.0}, "percentile must lie strictly between 0 and 1"),
        (DynamicKRouter, {"percentile": 1.0}, "percentile must lie strictly between 0 and 1"),
        (DynamicKRouter, {"momentum": 0.0}, "momentum must lie in"),
        (TopPRouter, {"top_p": 1.5}, "top_p must lie strictly between 0 and 1"),
        (TopPRouter, {"top_p": -0.1}, "top_p must lie strictly between 0 and 1"),
        (TopPRouter, {"top_k": 2, "k_min": 3}, "k_min must be an int in 1..top_k=2"),
        (DynamicKRouter, {"top_k": 9}, "top_k=9 exceeds num_experts=8"),
    ],
)
def test_router_argument_errors(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(4, 8, **kwargs)


# -- configs ------------------------------------------------------------------------------------


def test_mlp_config_schedule_sets_each_layers_k_max():
    cfg = MLPConfig(
        hidden_dims=[64, 64, 64, 64],
        moe_layers=[1, 2, 3],
        top_k=4,
        router="dynamic_k",
        k_schedule="descending",
    )
    assert cfg.moe_top_ks() == [4, 3, 1]  # 3 MoE layers: positions 0, 1/2, 1
    model = MLPClassifier(cfg)
    assert [(m.top_k, m.router.top_k) for m in model.moe_layers().values()] == [
        (4, 4),
        (3, 3),
        (1, 1),
    ]
    out = model(torch.randn(5, 64), torch.randint(0, 10, (5,)))
    assert out.loss.isfinite()
    assert MLPConfig.from_dict(cfg.to_dict()) == cfg


def test_lm_config_schedule_and_dense_equivalent():
    cfg = LMConfig(
        vocab_size=16,
        dim=16,
        num_layers=3,
        num_heads=2,
        expert_hidden_dim=8,
        num_experts=4,
        top_k=3,
        router="top_p",
        k_schedule=[1, 3, 2],
    )
    model = LM(cfg)
    assert [b.ffn.top_k for b in model.blocks] == [1, 3, 2]
    assert model(torch.randint(0, 16, (2, 5))).logits.shape == (2, 5, 16)
    with pytest.raises(ConfigError, match="dense_equivalent needs one top_k"):
        dense_equivalent(cfg)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"k_schedule": [1, 2]}, "gives 2 values for 3 MoE layers"),
        ({"k_schedule": [1, 2, 5]}, "K_max=5 for MoE layer 2"),
        ({"k_schedule": "descendin"}, "did you mean 'descending'"),
        ({"k_schedule": "uniform", "k_schedule_min": 4}, "k_min=4 exceeds k_max=3"),
    ],
)
def test_config_schedule_errors(changes, match):
    base = {
        "vocab_size": 16,
        "dim": 16,
        "num_layers": 3,
        "num_heads": 2,
        "num_experts": 4,
        "top_k": 3,
        "expert_hidden_dim": 8,
    }
    with pytest.raises(ConfigError, match=match):
        LMConfig.from_dict({**base, **changes})


def test_dynamoe_experiment_smoke(tmp_path):
    result = dynamoe.run("smoke", seed=0, out_dir=tmp_path)
    assert "| descending | [4, 3, 2, 1] |" in result["table"]
    for summary in result["summary"].values():
        assert 1.0 <= summary["experts_per_token"] <= 4.0
        assert math.isfinite(summary["loss"][0])
    # the last layer of the descending stack has K_max = 1: exactly one expert per token
    assert result["summary"]["descending"]["per_layer"][-1] == 1.0
    lm = result["lm_runs"]
    assert lm["ascending"]["k_max"] == [1, 2, 3, 4]
    assert all(math.isfinite(r["prose"]) and math.isfinite(r["code"]) for r in lm.values())
    json.dumps(result, allow_nan=False)  # `gatelab experiment` writes it as JSON
