"""The temperature and activation dense-to-sparse gates (routing/temperature.py).

Routers get D = E and an identity weight (``identity_router``), so the input rows are
W x and every expected value follows by hand from them, the bias and tau.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DispatchCase, grads_of, identity_router

from gatelab import MoE
from gatelab.dispatch import grouped_dispatch, loop_dispatch
from gatelab.routing import (
    GATE_ACTIVATIONS,
    ROUTERS,
    ActivationTemperatureRouter,
    TemperatureRouter,
    activation_scores,
    attach_schedule,
    step_schedules,
    temperature_scores,
    z_loss,
)

ROWS = [[1.0, 2.0, 3.0, 0.0], [0.0, -1.0, 5.0, 1.0], [0.5, 0.7, -2.0, 2.5]]


def softmax(row):
    exps = [math.exp(v) for v in row]
    return [v / sum(exps) for v in exps]


def set_tau_and_bias(router, tau, bias):
    with torch.no_grad():
        router.log_temperature.fill_(math.log(tau))
        router.bias.copy_(torch.tensor(bias))
    return router


def test_registered_by_name():
    assert ROUTERS.get("temperature") is TemperatureRouter
    assert ROUTERS.get("activation_temperature") is ActivationTemperatureRouter


def test_temperature_gate_by_hand():
    bias, tau = [0.5, 0.0, -0.5, 0.0], 2.0
    router = set_tau_and_bias(identity_router(TemperatureRouter(4, 4, top_k=2)), tau, bias)
    r = router(torch.tensor(ROWS))
    for t, row in enumerate(ROWS):
        shifted = [(v + b) / tau for v, b in zip(row, bias, strict=True)]
        probs = softmax(shifted)
        best = sorted(range(4), key=lambda e, p=probs: -p[e])[:2]
        assert r.experts[t].tolist() == best
        assert r.weights[t].tolist() == pytest.approx([probs[e] for e in best], rel=1e-6)
        assert r.scores[t].tolist() == pytest.approx(probs, rel=1e-6)
        assert r.logits[t].tolist() == pytest.approx(shifted, rel=1e-6)
    assert r.aux["temperature"].item() == pytest.approx(tau)
    # (W x + b) / 2: row 0 [0.75, 1, 1.25, 0] -> 2, 1; row 1 [0.25, -0.5, 2.25, 0.5] -> 2, 3.
    assert r.experts[:2].tolist() == [[2, 1], [2, 3]]


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "gelu", "identity"])
def test_activation_gate_by_hand(activation):
    ref = {
        "tanh": math.tanh,
        "sigmoid": lambda z: 1 / (1 + math.exp(-z)),
        "gelu": lambda z: 0.5 * z * (1 + math.erf(z / math.sqrt(2))),
        "identity": lambda z: z,
    }[activation]
    bias, tau = [0.5, 0.0, -1.0, 0.0], 0.5
    router = ActivationTemperatureRouter(4, 4, top_k=3, activation=activation, normalize=True)
    router = set_tau_and_bias(identity_router(router), tau, bias)
    r = router(torch.tensor(ROWS))
    for t, row in enumerate(ROWS):
        probs = softmax([ref(v + b) / tau for v, b in zip(row, bias, strict=True)])
        best = sorted(range(4), key=lambda e, p=probs: -p[e])[:3]
        assert r.experts[t].tolist() == best
        chosen = [probs[e] for e in best]
        assert r.weights[t].tolist() == pytest.approx([p / sum(chosen) for p in chosen], rel=1e-5)
        assert r.scores[t].tolist() == pytest.approx(probs, rel=1e-5)


def test_identity_activation_equals_temperature_gate():
    x = torch.randn(9, 5)
    plain = TemperatureRouter(5, 6, top_k=2, temperature=0.7)
    act = ActivationTemperatureRouter(5, 6, top_k=2, temperature=0.7, activation="identity")
    act.load_state_dict(plain.state_dict())
    a, b = plain(x), act(x)
    assert torch.equal(a.experts, b.experts)
    torch.testing.assert_close(a.weights, b.weights)


def test_functional_forms_match_routers():
    logits = torch.randn(7, 4, dtype=torch.float64)
    tau = torch.tensor(0.3, dtype=torch.float64)
    torch.testing.assert_close(temperature_scores(logits, tau), (logits / tau).softmax(-1))
    torch.testing.assert_close(
        activation_scores(logits, tau, "tanh"), (logits.tanh() / tau).softmax(-1)
    )


@pytest.mark.parametrize("cls", [TemperatureRouter, ActivationTemperatureRouter])
def test_gradients_reach_tau_weight_and_bias(cls):
    router = cls(6, 5, top_k=2, temperature=1.5)
    r = router(torch.randn(11, 6))
    loss = (r.weights * torch.tensor([1.0, -0.5])).sum() + 0.1 * z_loss(r)
    loss.backward()
    for name in ("log_temperature", "weight", "bias"):
        grad = getattr(router, name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_tau_gradient_matches_finite_difference():
    router = ActivationTemperatureRouter(3, 4, top_k=4, temperature=0.8).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    g = torch.randn(5, 4, dtype=torch.float64)

    def objective():
        return (router(x).weights.double() * g).sum()

    objective().backward()
    analytic = router.log_temperature.grad.item()
    eps = 1e-2
    with torch.no_grad():
        router.log_temperature += eps
        up = objective().item()
        router.log_temperature -= 2 * eps
        down = objective().item()
    # Scores are float32 (the Router contract): a wide step and a 1% tolerance.
    assert analytic == pytest.approx((up - down) / (2 * eps), rel=1e-2)


def test_fixed_temperature_is_a_buffer():
    router = TemperatureRouter(4, 4, top_k=1, temperature=0.25, learn_temperature=False)
    assert "log_temperature" not in dict(router.named_parameters())
    assert "log_temperature" in dict(router.named_buffers())
    assert router.temperature.item() == pytest.approx(0.25)


def test_a_schedule_can_anneal_a_fixed_temperature():
    router = TemperatureRouter(4, 4, top_k=1, learn_temperature=False)
    attach_schedule(
        router, "temperature", {"kind": "linear", "start": 2.0, "end": 0.5, "steps": 10}
    )
    assert router.temperature.item() == pytest.approx(2.0)
    step_schedules(router, 10)
    assert router.temperature.item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        router.temperature = 0.0


@pytest.mark.parametrize("cls", [TemperatureRouter, ActivationTemperatureRouter])
def test_small_tau_gives_the_argmax_limit(cls):
    x = torch.randn(64, 8)
    router = cls(8, 6, top_k=2, temperature=1e-4)
    r = router(x)
    pre = router.gate_input(x) * router.temperature  # sigma(W x + b), tau removed
    assert torch.equal(r.experts[:, 0], pre.argmax(dim=1))
    torch.testing.assert_close(r.weights[:, 0], torch.ones(64))
    torch.testing.assert_close(r.weights[:, 1], torch.zeros(64), atol=1e-6, rtol=0)
    # Large tau gives the dense, uniform limit.
    dense = cls(8, 6, top_k=6, temperature=1e6)(x)
    torch.testing.assert_close(dense.scores, torch.full((64, 6), 1 / 6), atol=1e-5, rtol=0)


@pytest.mark.parametrize("tau", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_temperature(tau):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        TemperatureRouter(4, 4, temperature=tau)


def test_unknown_activation_names_the_choices():
    with pytest.raises(ValueError, match="unknown activation 'relu6'.*gelu, identity, sigmoid"):
        ActivationTemperatureRouter(4, 4, activation="relu6")
    assert sorted(GATE_ACTIVATIONS) == ["gelu", "identity", "sigmoid", "tanh"]


def test_nan_input_raises():
    with pytest.raises(FloatingPointError):
        TemperatureRouter(3, 3)(torch.tensor([[float("nan"), 0.0, 0.0]]))


def test_zero_tokens():
    r = ActivationTemperatureRouter(4, 5, top_k=2)(torch.zeros(0, 4))
    assert r.experts.shape == (0, 2) and r.weights.shape == (0, 2)


@pytest.mark.parametrize("name", ["temperature", "activation_temperature"])
def test_dispatch_equals_loop_oracle(name):
    case = DispatchCase(33, 6, 10, 5, 2, seed=3)
    x, _, _, bank = case.build()
    router = ROUTERS.get(name)(6, 5, top_k=2, temperature=0.6).double()
    params = [x, router.weight, router.bias, router.log_temperature]
    outs, grads = [], []
    for dispatch in (loop_dispatch, grouped_dispatch):
        r = router(x)  # one graph per dispatcher: grads_of frees what it walks
        outs.append(dispatch(x, r.experts, r.weights.double(), bank))
        grads.append(grads_of(outs[-1], params))
    torch.testing.assert_close(outs[1], outs[0])
    assert grads[0][3].abs() > 0  # tau gets a gradient through the dispatch
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want)


def test_moe_layer_builds_by_name_and_trains_tau():
    layer = MoE(8, 16, 4, top_k=2, router="activation_temperature", dispatcher="grouped")
    layer(torch.randn(2, 5, 8)).square().mean().backward()
    assert layer.router.log_temperature.grad is not None
    assert "temperature" in layer.last_routing.aux
