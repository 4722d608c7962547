"""The CPU buffer reuse of the grouped dispatcher must never hand out memory still in use."""

import torch

from gatelab import MoE
from gatelab.dispatch import workspace


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
