"""The grouped dispatcher against the loop oracle: forward and every gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import EDGE_CASES, DispatchCase, bank_tensors, dispatch_cases, grads_of
from hypothesis import given, settings

from gatelab import ExpertBank
from gatelab.dispatch import (
    DISPATCHERS,
    auto_dispatch,
    get_dispatcher,
    grouped_dispatch,
    loop_dispatch,
)
from gatelab.dispatch.grouped import grouped_linear, grouped_weight_grad
from gatelab.routing import EMPTY


def run_both(case: DispatchCase, dtype):
    """Outputs and gradients (x, weights, bank tensors) of loop and grouped on one case."""
    x, experts, weights, bank = case.build(dtype)
    inputs = [x, weights, *bank_tensors(bank)]
    results = []
    for fn in (loop_dispatch, grouped_dispatch):
        out = fn(x, experts, weights, bank, case.deterministic)
        assert out.shape == x.shape and out.dtype == x.dtype
        results.append((out.detach(), grads_of(out, inputs)))
    return results


def assert_same(case: DispatchCase, dtype, atol, rtol):
    (ref, ref_grads), (out, out_grads) = run_both(case, dtype)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol, msg=lambda m: f"{case}\n{m}")
    names = ["x", "weights", "w_in", "w_out", "b_in", "b_out"]
    for name, got, want in zip(names, out_grads, ref_grads, strict=False):
        torch.testing.assert_close(
            got, want, atol=atol, rtol=rtol, msg=lambda m, n=name: f"grad {n}: {case}\n{m}"
        )


def reference(x, experts, weights, bank):
    """The definition, token by token and slot by slot (no dispatcher involved)."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for s in range(experts.shape[1]):
            e = int(experts[t, s])
            if e == EMPTY:
                continue
            h = F.linear(x[t], bank.w_in[e], None if bank.b_in is None else bank.b_in[e])
            y = F.linear(
                bank.activate(h.unsqueeze(0)).squeeze(0),
                bank.w_out[e],
                None if bank.b_out is None else bank.b_out[e],
            )
            out[t] += weights[t, s] * y
    return out


# -- float64: exact agreement up to summation order ---------------------------------------


@settings(max_examples=40, deadline=None)
@given(case=dispatch_cases())
def test_grouped_matches_loop_float64(case):
    assert_same(case, torch.float64, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("name", sorted(EDGE_CASES))
def test_edge_cases_float64(name):
    assert_same(EDGE_CASES[name], torch.float64, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("name", sorted(EDGE_CASES))
def test_loop_matches_definition(name):
    case = EDGE_CASES[name]
    x, experts, weights, bank = case.build(torch.float64)
    with torch.no_grad():
        want = reference(x, experts, weights, bank)
        got = loop_dispatch(x, experts, weights, bank, case.deterministic)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("fn", [loop_dispatch, grouped_dispatch], ids=["loop", "grouped"])
def test_gradcheck(fn):
    case = DispatchCase(5, 3, 4, 3, 2, bias=True, empty_rate=0.3, seed=3)
    x, experts, weights, bank = case.build(torch.float64)

    def f(x, weights, w_in, w_out, b_in, b_out):
        return fn(
            x, experts, weights, bank._replace(w_in=w_in, w_out=w_out, b_in=b_in, b_out=b_out)
        )

    assert torch.autograd.gradcheck(f, (x, weights, *bank_tensors(bank)))


# -- float32: torch's grouped_mm kernel path ---------------------------------------------


@settings(max_examples=30, deadline=None)
@given(case=dispatch_cases())
def test_grouped_matches_loop_float32(case):
    assert_same(case, torch.float32, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(EDGE_CASES))
def test_edge_cases_float32(name):
    assert_same(EDGE_CASES[name], torch.float32, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dim,hidden_dim", [(3, 8), (8, 6), (5, 5), (1, 4), (4, 1), (1, 1)])
def test_grouped_float32_any_width(dim, hidden_dim):
    """Widths that are not a multiple of 16 bytes are ordinary model sizes too."""
    case = DispatchCase(10, dim, hidden_dim, 4, 2, bias=True, empty_rate=0.2, seed=5)
    assert_same(case, torch.float32, atol=2e-5, rtol=1e-4)


# -- behaviour beyond the values ------------------------------------------------------------


@pytest.mark.parametrize("name", ["loop", "grouped"])
@pytest.mark.parametrize("case", ["zero_tokens", "all_slots_empty"])
def test_output_keeps_graph_when_nothing_is_routed(name, case):
    """An MoE step on an empty batch must still backpropagate (to zero gradients)."""
    x, experts, weights, bank = EDGE_CASES[case].build(torch.float64)
    out = get_dispatcher(name)(x, experts, weights, bank)
    assert torch.count_nonzero(out) == 0
    assert out.requires_grad, "a training step on this batch could not call backward()"
    out.sum().backward()
    assert x.grad is None or torch.count_nonzero(x.grad) == 0


def test_deterministic_flag_gives_equal_results():
    case = DispatchCase(30, 8, 8, 5, 3, empty_rate=0.2, seed=9)
    x, experts, weights, bank = case.build(torch.float32)
    with torch.no_grad():
        a = grouped_dispatch(x, experts, weights, bank, True)
        b = grouped_dispatch(x, experts, weights, bank, True)
        c = grouped_dispatch(x, experts, weights, bank, False)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c)


def test_registered_dispatchers():
    assert DISPATCHERS.names() == ["grouped", "loop", "triton"]
    assert get_dispatcher("auto") is auto_dispatch  # grouped off CUDA: test_triton_dispatch
    assert get_dispatcher("loop") is loop_dispatch


def test_dispatch_does_not_touch_unused_experts():
    """Experts that receive no token get exactly zero gradient."""
    bank = ExpertBank(4, 4, 8, bias=True).double()
    w = bank.weights()
    x = torch.randn(6, 4, dtype=torch.float64)
    experts = torch.tensor([[0, 2]] * 6)
    weights = torch.rand(6, 2, dtype=torch.float64)
    for fn in (loop_dispatch, grouped_dispatch):
        bank.zero_grad()
        fn(x, experts, weights, w).square().sum().backward()
        for p in bank.parameters():
            assert torch.count_nonzero(p.grad[[1, 3]]) == 0
            assert torch.count_nonzero(p.grad[[0, 2]]) > 0


@pytest.mark.parametrize("num_experts", [1, 3, 8])
@pytest.mark.parametrize("rows_per_expert", [0, 1, 5, 40])
def test_grouped_kernel_matches_loop(num_experts, rows_per_expert):
    """torch's grouped GEMM kernel (CUDA's path, and CPU's under torch.compile) and the
    loop of GEMMs (CPU's eager path, few-rows layout included) agree, empty experts too."""
    torch.manual_seed(rows_per_expert * 10 + num_experts)
    counts = torch.randint(0, rows_per_expert + 1, (num_experts,))
    counts[0] = 0  # always one idle expert
    offsets = counts.cumsum(0).to(torch.int32)
    rows = int(counts.sum())
    x, w, grad = torch.randn(rows, 16), torch.randn(num_experts, 24, 16), torch.randn(rows, 24)
    for weight in (w, w.transpose(1, 2).contiguous().transpose(1, 2)):  # row-major and transposed
        kernel = grouped_linear(x, weight, counts, offsets, kernel=True)
        loop = grouped_linear(x, weight, counts, offsets, kernel=False)
        torch.testing.assert_close(kernel, loop, atol=1e-5, rtol=1e-5)
    kernel = grouped_weight_grad(grad, x, counts, offsets, kernel=True)
    loop = grouped_weight_grad(grad, x, counts, offsets, kernel=False)
    torch.testing.assert_close(kernel, loop, atol=1e-5, rtol=1e-5)
    assert torch.all(loop[0] == 0)
