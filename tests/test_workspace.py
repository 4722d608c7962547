"""The CPU buffer reuse of the grouped dispatcher must never hand out memory still in use."""

import gc

import pytest
import torch

from gatelab import MoE
from gatelab.dispatch import workspace
from gatelab.dispatch.cpu_threads import forced_strategy


def _layer(seed=0):
    torch.manual_seed(seed)
    return MoE(8, 12, 4, 2, router_kwargs={"normalize": True}).double()


def _grads(layer, x, grad):
    x = x.clone().requires_grad_()
    layer.zero_grad()
    layer(x).backward(grad)
    return [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]


def test_retained_graph_survives_other_forwards():
    layer = _layer()
    x1, x2, grad = (
        torch.randn(10, 8).double(),
        torch.randn(10, 8).double(),
        torch.randn(10, 8).double(),
    )
    expected = _grads(layer, x1, grad)

    x = x1.clone().requires_grad_()
    layer.zero_grad()
    out = layer(x)
    out.backward(grad, retain_graph=True)
    layer(x2).sum().backward()  # another forward and backward reuse the pool meanwhile
    layer.zero_grad()
    x.grad = None
    out.backward(grad)  # the retained graph must still see its own pre-activation
    got = [x.grad] + [p.grad for p in layer.parameters()]
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_two_forwards_before_backward_match_separate_steps():
    layer = _layer()
    x1, x2, grad = (
        torch.randn(6, 8).double(),
        torch.randn(9, 8).double(),
        torch.randn(9, 8).double(),
    )
    g1 = _grads(layer, x1, grad[:6])
    g2 = _grads(layer, x2, grad)
    layer.zero_grad()
    (layer(x1) * grad[:6]).sum().add((layer(x2) * grad).sum()).backward()
    for p, a, b in zip(layer.parameters(), g1[1:], g2[1:], strict=True):
        torch.testing.assert_close(p.grad, a + b)


def test_saved_buffers_return_to_pool_only_when_graph_is_freed():
    workspace.release_workspace()
    layer = _layer()
    x = torch.randn(5, 8).double().requires_grad_()
    out = layer(x)
    assert not workspace._POOL.get(torch.float64)  # all held by the live graph
    out.sum().backward()
    del out
    returned = len(workspace._POOL[torch.float64])
    assert returned == 4  # gathered rows, pre-activation, activation, act(gate)
    layer(x).sum().backward()  # the next step reuses them: the pool does not grow
    assert len(workspace._POOL[torch.float64]) == returned
    with torch.no_grad():
        layer(x)  # inference saves nothing
    assert len(workspace._POOL[torch.float64]) == returned
    workspace.release_workspace()
    assert not workspace._POOL


def test_scratch_reuses_and_grows_per_name_and_dtype():
    workspace.release_workspace()
    a = workspace.scratch("t", (4, 4), torch.empty(0))
    b = workspace.scratch("t", (2, 4), torch.empty(0))
    assert a.data_ptr() == b.data_ptr()
    c = workspace.scratch("t", (8, 8), torch.empty(0))
    assert c.shape == (8, 8)
    d = workspace.scratch("t", (2, 2), torch.empty(0, dtype=torch.float64))
    assert d.dtype == torch.float64 and d.data_ptr() != c.data_ptr()
    assert workspace.scratch("u", (2, 4), torch.empty(0)).data_ptr() != c.data_ptr()
    workspace.release_workspace()


def _expert_grads(layer):
    return [layer.experts.gate_up_proj.grad, layer.experts.down_proj.grad]


@pytest.mark.parametrize("strategy", ["phases", "split"])
def test_weight_gradients_reuse_their_buffers_only_once_dropped(strategy):
    workspace.release_workspace()
    layer = _layer()
    x1, x2, grad = (torch.randn(40, 8).double() for _ in range(3))
    with forced_strategy(strategy):
        expected = _grads(layer, x2, grad)[2:]  # after x.grad and the router weight
        expected_1 = _grads(layer, x1, grad)[2:]
        pooled = {b.data_ptr() for b in _pooled_gradients(layer)}
        first = [g.data_ptr() for g in _expert_grads(layer)]
        assert set(first) <= pooled
        layer.zero_grad()  # drops the .grad views: their buffers are free again
        layer(x2).backward(grad)
        assert [g.data_ptr() for g in _expert_grads(layer)] == first
        for got, want in zip(_expert_grads(layer), expected, strict=True):
            torch.testing.assert_close(got, want)
        # Without zero_grad the next gradients are summed into the held ones: the held
        # buffers must not be handed out meanwhile.
        layer(x1).backward(grad)
        for got, a, b in zip(_expert_grads(layer), expected, expected_1, strict=True):
            torch.testing.assert_close(got, a + b)
        # Gradients returned to the caller stay theirs across later backwards.
        layer.zero_grad()
        kept = torch.autograd.grad((layer(x2) * grad).sum(), list(layer.experts.parameters()))
        layer(x1).backward(grad)
        for got, want in zip(kept, expected, strict=True):
            torch.testing.assert_close(got, want)


def _pooled_gradients(layer):
    """The gradient buffers the pool keeps for ``layer``'s expert weights."""
    return [b for p in layer.experts.parameters() for b in workspace._GRADIENTS.get(id(p), [])]


def test_release_workspace_keeps_held_gradient_buffers_only():
    workspace.release_workspace()
    layer = _layer()
    x = torch.randn(6, 8).double()
    layer(x).sum().backward()
    held = {g.data_ptr() for g in _expert_grads(layer)}
    layer.zero_grad()
    layer(x).sum().backward()  # reuses the two buffers
    assert {b.data_ptr() for b in _pooled_gradients(layer)} == held
    workspace.release_workspace()  # both are held by .grad: kept
    assert {b.data_ptr() for b in _pooled_gradients(layer)} == held
    layer.zero_grad()
    workspace.release_workspace()  # now free: dropped
    assert not _pooled_gradients(layer)


def test_gradient_buffers_go_with_their_weights():
    workspace.release_workspace()
    layer = _layer()
    layer(torch.randn(6, 8).double()).sum().backward()
    weights = [id(p) for p in layer.experts.parameters()]
    assert set(weights) <= set(workspace._GRADIENTS)
    del layer
    gc.collect()
    assert not set(weights) & set(workspace._GRADIENTS)


def test_a_cast_weight_drops_its_old_gradient_buffers_once_free():
    workspace.release_workspace()
    layer = _layer()
    x = torch.randn(6, 8).double()
    layer(x).sum().backward()
    layer.zero_grad()
    layer.float()  # the same Parameter objects, now float32
    layer(x.float()).sum().backward()
    kept = _pooled_gradients(layer)
    assert len(kept) == 2 and all(b.dtype == torch.float32 for b in kept)
