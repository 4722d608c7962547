"""The grouped dispatch between router and combine is sync-free and has fixed shapes, and
the MoE layer, the LM and a transformers MoE model compile as one graph (issue 19).

Compiled tests use the ``aot_eager`` backend: it runs dynamo and AOT autograd (the fake-
tensor tracing of forward and backward, where a data-dependent shape or a host read would
show) without inductor's C++ code generation, which takes ~25 s per graph on a CPU runner.
``gatelab bench moe --compile`` exercises inductor.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DispatchCase
from torch._dynamo.backends.common import aot_autograd
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from gatelab import MoE
from gatelab.dispatch import grouped_dispatch

# Host reads that fullgraph would otherwise refuse (a graph break): with these on, dynamo
# traces .item()/int(t) and nonzero-like ops as unbacked symbols, which the check sees.
_CAPTURE = {"capture_scalar_outputs": True, "capture_dynamic_output_shape_ops": True}


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _recording_backend(graphs: list):
    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return aot_autograd(fw_compiler=record, bw_compiler=record)


def _data_dependent_nodes(gm) -> list[str]:
    """Nodes whose value depends on tensor data for its shape or is read on the host."""
    found = []
    for node in gm.graph.nodes:
        if free_unbacked_symbols(node.meta.get("val")):
            found.append(node.format_node())
        elif "_local_scalar_dense" in str(node.target) or "nonzero" in str(node.target):
            found.append(node.format_node())
    return found


def _grads(out: torch.Tensor, inputs) -> list[torch.Tensor]:
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    return list(torch.autograd.grad(out, inputs, grad))


@pytest.mark.parametrize("pattern", ["random", "all_empty"])
def test_grouped_dispatch_traces_with_no_data_dependent_shape(pattern, fresh_dynamo):
    """What this proves: forward and backward of the grouped dispatcher trace into graphs
    (fullgraph: no break) in which no tensor's shape depends on the data and nothing is read
    on the host (.item(), int(t), nonzero). Host reads are captured instead of breaking the
    graph, so a regression shows as a node with an unbacked symbol, named in the failure.
    Before issue 19, sort_slots' int(counts[E]) and bincount failed this test."""
    case = DispatchCase(10, 8, 12, 4, 2, pattern=pattern, empty_rate=0.3, bias=True)
    x, experts, weights, bank = case.build(torch.float32)
    inputs = [x, weights, bank.w_in, bank.w_out, bank.b_in, bank.b_out]
    want = grouped_dispatch(x, experts, weights, bank)
    want_grads = _grads(want, inputs)

    graphs: list = []
    compiled = torch.compile(grouped_dispatch, fullgraph=True, backend=_recording_backend(graphs))
    with torch._dynamo.config.patch(_CAPTURE):
        got = compiled(x, experts, weights, bank)
        got_grads = _grads(got, inputs)
    assert len(graphs) == 2  # one forward graph, one backward graph
    for gm in graphs:
        assert _data_dependent_nodes(gm) == []
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_dispatch_never_synchronises_on_cuda():
    """Forward and backward of the grouped dispatcher in bf16 with CUDA's sync debug mode
    set to raise on any host synchronisation."""
    case = DispatchCase(64, 64, 128, 8, 2, empty_rate=0.2)
    x, experts, weights, bank = case.build(torch.float32)
    bank = bank.to(device="cuda", dtype=torch.bfloat16)
    params = [p for p in bank.parameters()]
    x = x.detach().to("cuda", torch.bfloat16).requires_grad_()
    weights = weights.detach().to("cuda", torch.bfloat16).requires_grad_()
    experts = experts.cuda()
    grad = torch.randn(x.shape, device="cuda", dtype=x.dtype)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = grouped_dispatch(x, experts, weights, bank)
        torch.autograd.grad(out, [x, weights, *params], grad)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _check_fullgraph(module, run, inputs, tol: float | None = None) -> None:
    """run(module) -> a tensor; compiled with fullgraph=True it equals eager, and so do the
    gradients of ``inputs(module)`` (within ``tol`` when given, else float32's default)."""
    close = {} if tol is None else {"atol": tol, "rtol": tol}
    compiled = copy.deepcopy(module)
    want = run(module)
    want_grads = _grads(want, inputs(module))
    compiled.forward = torch.compile(compiled.forward, fullgraph=True, backend="aot_eager")
    got = run(compiled)
    got_grads = _grads(got, inputs(compiled))
    torch.testing.assert_close(got, want, **close)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, **close)


def test_moe_layer_compiles_fullgraph(fresh_dynamo):
    torch.manual_seed(0)
    moe = MoE(16, 24, 4, 2, dispatcher="grouped").train()
    x = torch.randn(2, 5, 16, requires_grad=True)
    _check_fullgraph(moe, lambda m: m(x), lambda m: [x, *m.parameters()])


def test_lm_compiles_fullgraph(fresh_dynamo):
    from lm_tiny import tiny_moe_lm

    lm = tiny_moe_lm(dispatcher="grouped").train()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    _check_fullgraph(lm, lambda m: m(ids).logits, lambda m: list(m.parameters()))


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_hf_moe_model_compiles_fullgraph(family, fresh_dynamo):
    """Mixtral: the named GLU activation; GPT-OSS: HF's own gate function (gatelab
    differentiates it with torch.func.vjp under compile) and expert biases."""
    pytest.importorskip("transformers")
    from hf_tiny import build
    from hf_tiny import ids as tiny_ids

    model = build(family, "gatelab").train()
    ids = tiny_ids()
    # AOT autograd decomposes HF's attention and norms into other float32 reductions: a
    # few gradient entries move by ~2e-5 of values ~3.
    run = lambda m: m(ids, use_cache=False).logits  # noqa: E731
    _check_fullgraph(model, run, lambda m: list(m.parameters()), tol=1e-4)


def _router_names() -> list:
    from gatelab.routing import ROUTERS

    # dense_to_sparse draws Gumbel noise from a torch.Generator seeded per forward (an
    # object dynamo cannot put in a graph): it compiles with graph breaks, not fullgraph.
    return [name for name in ROUTERS.names() if name != "dense_to_sparse"]


@pytest.mark.parametrize("router", _router_names())
def test_every_router_traces_without_graph_breaks_in_training(router, fresh_dynamo):
    """Forward of a training MoE layer per router with no graph break (dynamo's explain:
    fullgraph=True instead let dynamo specialise on the counter's value). Before issue 19
    the dynamic_k router read its batch count with int(tensor): a break, and a host sync
    on a GPU."""
    moe = MoE(16, 24, 4, 1 if router == "hash" else 2, router=router).train()
    x = torch.randn(2, 5, 16)
    kwargs = {"token_ids": torch.randint(0, 50, (2, 5))} if router == "hash" else {}
    for _ in range(2):  # a second step: the routers' counters moved
        assert torch._dynamo.explain(moe)(x, **kwargs).graph_break_count == 0
