"""The MoE layer: every router with both dispatchers, shared experts, capacity, losses, compile."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from gatelab import MoE
from gatelab.dispatch import get_dispatcher
from gatelab.routing import ROUTERS, switch_balance_loss, z_loss

DIM, HIDDEN, EXPERTS = 8, 16, 4
SHAPES = [(7, DIM), (2, 3, DIM), (0, DIM)]


def make_moe(router: str, dispatcher: str = "loop", **kwargs) -> MoE:
    top_k = 1 if router == "hash" else 2
    return MoE(DIM, HIDDEN, EXPERTS, top_k, router=router, dispatcher=dispatcher, **kwargs)


def with_dispatcher(moe: MoE, name: str) -> MoE:
    twin = copy.deepcopy(moe)
    twin.dispatcher = name
    return twin


def forward_backward(moe: MoE, x: torch.Tensor, **kwargs):
    """Output, and gradients wrt x and every parameter (zeros where unused)."""
    x = x.clone().requires_grad_()
    out = moe(x, **kwargs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    inputs = [x, *moe.parameters()]
    out.backward(g)  # must work for every batch, empty ones included
    grads = [torch.zeros_like(i) if i.grad is None else i.grad for i in inputs]
    return out.detach(), grads


def token_ids_for(router: str, shape):
    return torch.randint(0, 100, shape[:-1]) if router == "hash" else None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("router", ROUTERS.names())
def test_dispatchers_agree_for_every_router(router, shape, dtype):
    moe = make_moe(router).to(dtype)
    x = torch.randn(shape, dtype=dtype)
    ids = token_ids_for(router, shape)
    grouped = with_dispatcher(moe, "grouped")
    ref, ref_grads = forward_backward(moe, x, token_ids=ids)
    out, grads = forward_backward(grouped, x, token_ids=ids)
    assert out.shape == shape and out.dtype == dtype
    tol = {"atol": 1e-10, "rtol": 1e-9} if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-4}
    torch.testing.assert_close(out, ref, **tol)
    names = ["x", *(n for n, _ in moe.named_parameters())]
    for name, got, want in zip(names, grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, **tol, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("router", ROUTERS.names())
def test_output_is_the_dispatch_of_last_routing(router):
    moe = make_moe(router, dispatcher="grouped")
    x = torch.randn(2, 5, DIM)
    out = moe(x, token_ids=token_ids_for(router, x.shape))
    r = moe.last_routing
    assert r.num_tokens == 10 and r.num_experts == EXPERTS
    want = get_dispatcher("loop")(
        x.reshape(-1, DIM), r.experts, r.weights, moe.experts.weights(), True
    )
    torch.testing.assert_close(out.reshape(-1, DIM), want)


def test_a_single_vector_is_one_token():
    moe = make_moe("topk")
    x = torch.randn(DIM)
    out = moe(x)
    assert out.shape == (DIM,)
    torch.testing.assert_close(out, moe(x.reshape(1, DIM)).reshape(DIM))


@pytest.mark.parametrize("num_experts,top_k", [(1, 1), (4, 4)])
@pytest.mark.parametrize("dispatcher", ["loop", "grouped"])
def test_single_expert_and_k_equals_e(num_experts, top_k, dispatcher):
    moe = MoE(
        DIM, HIDDEN, num_experts, top_k, dispatcher=dispatcher, router_kwargs={"normalize": True}
    )
    x = torch.randn(6, DIM)
    out = moe(x)
    # Every token uses every expert with normalised weights: a weighted sum of all experts.
    dense = moe.last_routing.dense_weights()
    want = sum(dense[:, e : e + 1] * moe.experts.forward_expert(e, x) for e in range(num_experts))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)


# -- shared experts ---------------------------------------------------------------------


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dispatcher", ["loop", "grouped"])
def test_shared_expert(gated, dispatcher):
    moe = make_moe("topk", dispatcher=dispatcher, shared_hidden_dim=12, shared_gate=gated)
    x = torch.randn(2, 3, DIM)
    out = moe(x)
    flat = x.reshape(-1, DIM)
    r = moe.last_routing
    routed = get_dispatcher("loop")(flat, r.experts, r.weights, moe.experts.weights(), True)
    s = moe.shared_experts
    gate, up = s.ffn.gate_up_proj(flat).chunk(2, dim=-1)
    shared = s.ffn.down_proj(F.silu(gate) * up)
    if gated:
        shared = torch.sigmoid(flat @ s.shared_expert_gate.weight.t()) * shared
    else:
        assert s.shared_expert_gate is None
    torch.testing.assert_close(out.reshape(-1, DIM), routed + shared)


def test_shared_experts_keyword_is_the_deprecated_name_of_shared_hidden_dim():
    torch.manual_seed(0)
    new = make_moe("topk", shared_hidden_dim=12)
    torch.manual_seed(0)
    with pytest.warns(
        DeprecationWarning, match="shared expert's hidden width.*shared_hidden_dim=12"
    ):
        old = make_moe("topk", shared_experts=12)
    assert old.shared_experts.state_dict().keys() == new.shared_experts.state_dict().keys()
    x = torch.randn(5, DIM)
    torch.testing.assert_close(old(x), new(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="pass only shared_hidden_dim"):
        make_moe("topk", shared_experts=12, shared_hidden_dim=12)


@pytest.mark.parametrize("gated", [False, True])
def test_shared_expert_dispatchers_agree(gated):
    moe = make_moe("sigmoid", shared_hidden_dim=12, shared_gate=gated).double()
    x = torch.randn(2, 3, DIM, dtype=torch.float64)
    grouped = with_dispatcher(moe, "grouped")
    ref, ref_grads = forward_backward(moe, x)
    out, grads = forward_backward(grouped, x)
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want)


# -- capacity ----------------------------------------------------------------------------


@pytest.mark.parametrize("router", ["topk", "sigmoid", "expert_choice"])
def test_capacity_dispatchers_agree(router):
    moe = make_moe(router, capacity_factor=0.25).double()
    x = torch.randn(3, 4, DIM, dtype=torch.float64)
    grouped = with_dispatcher(moe, "grouped")
    ref, ref_grads = forward_backward(moe, x)
    assert int(moe.last_routing.aux["dropped"]) > 0
    out, grads = forward_backward(grouped, x)
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want)


# -- last_routing and aux losses -----------------------------------------------------------


def test_last_routing_and_aux_losses():
    moe = make_moe("topk", loss_weights={"balance": 0.01, "z": 0.001})
    assert moe.last_routing is None and moe.aux_losses == {}
    assert moe.aux_loss.item() == 0.0
    x = torch.randn(2, 5, DIM)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    moe.train()
    moe(x, token_mask=mask)
    r = moe.last_routing
    assert set(moe.aux_losses) == {"balance", "z"}
    torch.testing.assert_close(moe.aux_losses["balance"], 0.01 * switch_balance_loss(r, mask))
    torch.testing.assert_close(moe.aux_losses["z"], 0.001 * z_loss(r, mask))
    torch.testing.assert_close(moe.aux_loss, moe.aux_losses["balance"] + moe.aux_losses["z"])
    moe.aux_loss.backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    moe.eval()
    moe(x)
    assert moe.aux_losses == {} and moe.aux_loss.item() == 0.0


def test_aux_losses_are_computed_before_capacity():
    moe = make_moe("topk", capacity_factor=0.25, loss_weights={"balance": 1.0})
    moe.train()
    x = torch.randn(12, DIM)
    moe(x)
    full = moe.router(x)
    assert int(moe.last_routing.aux["dropped"]) > 0
    torch.testing.assert_close(moe.aux_losses["balance"], switch_balance_loss(full))


def test_routing_edit_is_applied_before_dispatch():
    moe = make_moe("topk")
    x = torch.randn(6, DIM)
    out = moe(x, routing_edit=lambda r: r.mask_experts([0, 1, 2, 3]))
    assert (moe.last_routing.experts == -1).all()
    assert torch.count_nonzero(out) == 0


def test_zero_token_routing():
    moe = make_moe("topk", loss_weights={"balance": 1.0, "z": 1.0})
    moe.train()
    out = moe(torch.randn(0, DIM))
    assert out.shape == (0, DIM)
    assert moe.last_routing.num_tokens == 0
    assert all(v.item() == 0.0 for v in moe.aux_losses.values())


# -- torch.compile --------------------------------------------------------------------------


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def check_compiled(moe: MoE, backend: str, x: torch.Tensor, **kwargs):
    compiled = copy.deepcopy(moe)
    ref, ref_grads = forward_backward(moe, x, **kwargs)
    compiled.forward = torch.compile(compiled.forward, backend=backend)
    out, grads = forward_backward(compiled, x, **kwargs)
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(compiled.last_routing.weights, moe.last_routing.weights)


@pytest.mark.parametrize("router", ROUTERS.names())
def test_compile_eager_backend_default_dispatcher(router, fresh_dynamo):
    moe = MoE(DIM, HIDDEN, EXPERTS, 1 if router == "hash" else 2, router=router)
    x = torch.randn(2, 3, DIM)
    check_compiled(moe, "eager", x, token_ids=token_ids_for(router, x.shape))


@pytest.mark.parametrize("dispatcher", ["loop", "grouped"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile(dispatcher, backend, fresh_dynamo):
    moe = make_moe("topk", dispatcher=dispatcher, shared_hidden_dim=8, capacity_factor=1.0)
    check_compiled(moe, backend, torch.randn(2, 3, DIM))


def test_layer_refuses_a_bank_or_router_it_would_misreport():
    """A bank of another width, or a router of another top_k, was accepted and the layer
    reported hidden_dim/top_k values it did not use."""
    from gatelab import ExpertBank

    with pytest.raises(ValueError, match="hidden_dim=16.*hidden_dim=32"):
        MoE(8, 32, 4, experts=ExpertBank(4, 8, 16))
    with pytest.raises(ValueError, match="top_k=1.*top_k=2"):
        MoE(8, 32, 4, top_k=2, router=ROUTERS.get("topk")(8, 4, 1))
    layer = MoE(
        8, 16, 4, top_k=1, router=ROUTERS.get("topk")(8, 4, 1), experts=ExpertBank(4, 8, 16)
    )
    assert "hidden_dim=16" in repr(layer) and "top_k=1" in repr(layer)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"capacity_factor": float("inf")}, "capacity_factor must be > 0 and a finite number"),
        ({"capacity_factor": "2"}, "capacity_factor must be > 0 and a finite number"),
        ({"capacity_factor": True}, "capacity_factor must be > 0 and a finite number"),
        ({"loss_weights": {"balance": float("nan")}}, "balance=nan must be a finite number"),
        ({"loss_weights": {"balance": float("inf")}}, "balance=inf must be a finite number"),
        ({"loss_weights": {"balance": "0.1"}}, "balance='0.1' must be a finite number"),
        ({"loss_weights": {"balance": -1.0}}, "balance=-1.0 must be a finite number"),
    ],
)
def test_layer_refuses_non_finite_or_non_numeric_settings(kwargs, match):
    """NaN loss weights were dropped silently; inf ones and capacity_factor=inf crashed
    mid-run; strings ended in a TypeError from a comparison."""
    with pytest.raises(ValueError, match=match):
        MoE(8, 16, 4, **kwargs)


def test_layer_keeps_zero_loss_weights_out():
    assert MoE(8, 16, 4, loss_weights={"balance": 0, "z": 0.5}).loss_weights == {"z": 0.5}


@pytest.mark.parametrize("experts", ["glu", "mlp"])
def test_a_whole_layer_pickles(tmp_path, experts):
    """torch.save(model) and multiprocessing pickle whole modules; the activation's kernel
    table holds lambdas, so the activation pickles by name."""
    import pickle

    torch.manual_seed(0)
    moe = MoE(dim=8, hidden_dim=16, num_experts=4, top_k=2, experts=experts, act="gelu")
    copy = pickle.loads(pickle.dumps(moe))
    x = torch.randn(5, 8)
    torch.testing.assert_close(copy(x), moe(x), rtol=0, atol=0)
    torch.save(moe, tmp_path / "moe.pt")
    loaded = torch.load(tmp_path / "moe.pt", weights_only=False)
    torch.testing.assert_close(loaded(x), moe(x), rtol=0, atol=0)
