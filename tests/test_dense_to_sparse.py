"""EvoMoE's dense-to-sparse gate against the reference rule, its phases, bounds and errors."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import identity_router

from gatelab import MoE
from gatelab.dispatch import get_dispatcher
from gatelab.routing import EMPTY, ROUTERS, DenseToSparseRouter, switch_balance_loss
from gatelab.routing.schedules import Linear, Step

E = 6


def make(**kwargs) -> DenseToSparseRouter:
    return identity_router(DenseToSparseRouter(E, E, **kwargs))


def reference(router: DenseToSparseRouter, logits: torch.Tensor, gumbel: torch.Tensor):
    """[T, E] combine weights of the released code's soft phase: mask * softmax or mask * g."""
    g = ((logits + gumbel) / router.tau).softmax(-1)
    mask = (g > router.threshold).float()
    return mask * (g if router.gumbel_weights else logits.softmax(-1))


def noise_of(router: DenseToSparseRouter, logits: torch.Tensor) -> torch.Tensor:
    """The Gumbel noise the router's next training forward will draw."""
    return copy.deepcopy(router)._gumbel(logits)


def test_registered_and_built_by_name():
    assert ROUTERS.get("dense_to_sparse") is DenseToSparseRouter
    moe = MoE(8, 16, 4, 4, router="dense_to_sparse", router_kwargs={"tau_max": 1.0})
    assert isinstance(moe.router, DenseToSparseRouter) and moe.router.top_k == 4


def test_default_bound_is_num_experts():
    assert DenseToSparseRouter(8, 5).top_k == 5
    assert DenseToSparseRouter(8, 5, top_k=2).top_k == 2


@pytest.mark.parametrize("gumbel_weights", [False, True])
def test_soft_phase_matches_the_reference_rule(gumbel_weights):
    router = make(tau_max=0.3, tau_min=0.3, decay_steps=1, gumbel_weights=gumbel_weights)
    x = torch.randn(50, E) * 2
    want = reference(router, x, noise_of(router, x))
    r = router(x)
    torch.testing.assert_close(r.dense_weights(), want)
    # Slots hold the passing experts in descending order of g, then EMPTY.
    assert r.num_slots == E
    counts = r.valid.sum(1)
    assert ((counts >= 1) & (counts <= E)).all() and counts.float().std() > 0  # varies
    assert (r.valid[:, :-1] | ~r.valid[:, 1:]).all()  # no used slot after an empty one
    assert r.aux["tau"].item() == pytest.approx(0.3)
    torch.testing.assert_close(r.scores, x.softmax(-1))


def test_tau_decay_goes_from_dense_to_the_sparse_limit():
    router = make(tau_max=50.0, tau_min=1e-3, decay_steps=100, decay="exponential")
    x = torch.randn(400, E)
    dense = router(x)
    assert (dense.valid.sum(1) == E).all()  # g ~ uniform 1/E > 0.001: every expert
    torch.testing.assert_close(dense.weights.sum(1), torch.ones(400))
    router.set_step(100)
    assert router.tau == pytest.approx(1e-3)
    noise = noise_of(router, x)
    sparse = router(x)
    # g is one-hot, one expert per token, unless two perturbed logits lie within
    # tau * ln(1 / threshold) of each other (a few tokens at tau = 0.001).
    top2 = (x + noise).topk(2, dim=-1).values
    clear = top2[:, 0] - top2[:, 1] > 1e-3 * torch.log(torch.tensor(1e3))
    counts = sparse.valid.sum(1)
    assert (counts[clear] == 1).all() and (counts >= 1).all()
    assert counts.float().mean() < 1.02
    # That expert is the argmax of the Gumbel-perturbed logits, weighted by softmax(logits).
    assert sparse.experts[:, 0].tolist() == (x + noise).argmax(-1).tolist()
    first = sparse.experts[:, :1]
    torch.testing.assert_close(sparse.weights[:, :1], x.softmax(-1).gather(1, first))


def test_noise_is_a_function_of_seed_step_and_call():
    router = make(tau_max=1.0, tau_min=1.0, decay_steps=1)
    x = torch.randn(30, E)
    twin = copy.deepcopy(router)
    first, second = router(x), router(x)
    assert torch.equal(twin(x).experts, first.experts)
    assert not torch.equal(first.weights, second.weights)  # the next call draws new noise
    router.set_step(0)
    assert torch.equal(router(x).experts, first.experts)  # set_step restarts the count
    router.set_step(1)
    assert not torch.equal(router(x).experts, first.experts)
    # The seed is a persistent buffer: a fresh router loading the state draws the same.
    other = make(tau_max=1.0, tau_min=1.0, decay_steps=1)
    assert other._seed != router._seed
    other.load_state_dict(router.state_dict())
    other.set_step(0)
    assert torch.equal(other(x).experts, first.experts)


def test_gumbel_noise_is_gumbel():
    router = make()
    noise = router._gumbel(torch.zeros(200_000, 1)).squeeze(1)
    euler_gamma, var = 0.5772156649, torch.pi**2 / 6
    assert noise.mean().item() == pytest.approx(euler_gamma, abs=0.01)
    assert noise.var().item() == pytest.approx(var, rel=0.02)


@pytest.mark.parametrize("gumbel_weights", [False, True])
def test_hard_phase_is_noisy_top1(gumbel_weights):
    router = make(
        tau_max=2.0, tau_min=0.5, decay_steps=10, hard_from=5, gumbel_weights=gumbel_weights
    )
    x = torch.randn(40, E)
    router.set_step(4)
    assert not router.hard and router(x).num_slots == E
    router.set_step(5)
    assert router.hard and router.tau == pytest.approx(2.0 - 5 * 1.5 / 10)
    noise = noise_of(router, x)
    r = router(x)
    assert r.num_slots == 1
    assert r.experts[:, 0].tolist() == (x + noise).argmax(-1).tolist()
    combine = ((x + noise) / router.tau).softmax(-1) if gumbel_weights else x.softmax(-1)
    torch.testing.assert_close(r.weights, combine.gather(1, r.experts))


@pytest.mark.parametrize("eval_mode", ["top1", "dense"])
def test_eval_mode_is_deterministic(eval_mode):
    router = make(eval_mode=eval_mode).eval()
    x = torch.randn(20, E)
    r = router(x)
    assert torch.equal(r.weights, router(x).weights)
    probs = x.softmax(-1)
    if eval_mode == "top1":
        assert r.experts[:, 0].tolist() == x.argmax(-1).tolist() and r.num_slots == 1
        torch.testing.assert_close(r.weights[:, 0], probs.max(-1).values)
    else:
        torch.testing.assert_close(r.dense_weights(), probs)


def test_a_bound_below_num_experts_keeps_the_largest_passing_gates():
    router = make(top_k=2, tau_max=5.0, tau_min=5.0, decay_steps=1)
    full = make(tau_max=5.0, tau_min=5.0, decay_steps=1)
    with torch.no_grad():
        full.noise_seed.copy_(router.noise_seed)
    full._seed = router._seed
    x = torch.randn(30, E)
    r, f = router(x), full(x)
    assert r.num_slots == 2
    assert torch.equal(r.experts, f.experts[:, :2])
    torch.testing.assert_close(r.weights, f.weights[:, :2])


@pytest.mark.parametrize("gumbel_weights", [False, True])
def test_gradients_reach_the_gate(gumbel_weights):
    router = make(tau_max=0.7, tau_min=0.7, decay_steps=1, gumbel_weights=gumbel_weights)
    x = torch.randn(25, E)
    noise = noise_of(router, x)
    c = torch.randn(25, E)
    (router(x).dense_weights() * c).sum().backward()
    got = router.weight.grad.clone()
    weight = router.weight.detach().clone().requires_grad_()
    (reference(router, x @ weight.T, noise) * c).sum().backward()
    torch.testing.assert_close(got, weight.grad)
    assert got.abs().sum() > 0


@pytest.mark.parametrize("phase", ["soft", "sparse", "hard", "eval"])
@pytest.mark.parametrize("shape", [(9, 8), (2, 5, 8), (0, 8)])
def test_dispatch_matches_the_loop_oracle(phase, shape):
    moe = MoE(
        8,
        12,
        5,
        5,
        router="dense_to_sparse",
        dispatcher="loop",
        router_kwargs={"tau_max": 1.0, "tau_min": 0.02, "decay_steps": 4, "hard_from": 8},
        loss_weights={"balance": 0.1},
    ).double()
    moe.router.set_step({"soft": 0, "sparse": 4, "hard": 8, "eval": 0}[phase])
    if phase == "eval":
        moe.eval()
    grouped = copy.deepcopy(moe)
    grouped.dispatcher = "grouped"
    x = torch.randn(shape, dtype=torch.float64)
    outs, grads = [], []
    for m in (moe, grouped):
        xi = x.clone().requires_grad_()
        out = m(xi)
        (out.square().sum() + m.aux_loss).backward()
        outs.append(out.detach())
        grads.append(
            [
                xi.grad,
                *(p.grad if p.grad is not None else torch.zeros_like(p) for p in m.parameters()),
            ]
        )
    if phase == "sparse" and shape[0]:
        assert (moe.last_routing.experts == EMPTY).any()
    torch.testing.assert_close(outs[1], outs[0])
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want)
    r = moe.last_routing
    oracle = get_dispatcher("loop")(
        x.reshape(-1, 8), r.experts, r.weights, moe.experts.weights(), True
    )
    torch.testing.assert_close(outs[0].reshape(-1, 8), oracle)


def test_balance_loss_is_the_reference_aux_loss():
    router = make(tau_max=0.2, tau_min=0.2, decay_steps=1)
    x = torch.randn(64, E)
    r = router(x)
    me = r.scores.mean(0)
    ce = torch.bincount(r.experts[r.valid], minlength=E).float() / 64
    torch.testing.assert_close(switch_balance_loss(r), E * E * (me * ce).mean())


def test_schedules_and_steps():
    router = make(tau={"kind": "step", "values": [2.0, 0.5], "boundaries": [3]})
    assert router.schedule == Step([2.0, 0.5], [3])
    router.set_step(3)
    assert router.tau == 0.5
    assert make(tau_max=1.0, tau_min=0.25, decay_steps=8).schedule == Linear(1.0, 0.25, 8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tau_max": 0.0}, "tau_max and tau_min must be > 0"),
        ({"tau_min": -1.0}, "tau_max and tau_min must be > 0"),
        ({"tau_max": 0.5, "tau_min": 1.0}, "tau_min=1.0 exceeds tau_max=0.5"),
        ({"tau": 0.0}, "tau must stay > 0"),
        ({"tau": {"kind": "linear", "start": 1.0, "end": 0.0, "steps": 10}}, "tau must stay > 0"),
        ({"decay": "cosine"}, "decay must be one of"),
        ({"decay_steps": 0}, "decay_steps must be an int >= 1"),
        ({"threshold": 0.0}, r"threshold must lie in \(0, 1\)"),
        ({"threshold": 1.0}, r"threshold must lie in \(0, 1\)"),
        ({"hard_from": -1}, "hard_from must be an int >= 0"),
        ({"eval_mode": "sparse"}, "eval_mode must be one of"),
        ({"top_k": 7}, "top_k=7 exceeds num_experts=6"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DenseToSparseRouter(E, E, **kwargs)


def test_bad_step_and_a_schedule_that_reaches_zero_late():
    router = make(tau={"kind": "step", "values": [1.0, 0.0, 1.0], "boundaries": [2, 4]})
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        router.set_step(-1)
    router.set_step(2)
    with pytest.raises(ValueError, match="tau=0.0 at step 2; tau must stay > 0"):
        router(torch.randn(3, E))


def test_zero_tokens():
    router = make()
    for training in (True, False):
        r = router.train(training)(torch.randn(0, E))
        assert r.num_tokens == 0 and r.num_experts == E
