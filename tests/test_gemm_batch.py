"""MKL's batched GEMM (``dispatch/gemm_batch.py``) against a loop of ``torch.mm``.

In float32 the batched call must give the loop's bits (the grouped dispatcher's
strategies rely on it); in float64 MKL's batched kernels round differently, so there it
must be close. Each call must write exactly the rows and experts it says it writes, and
refuse (return False, writing nothing) what MKL cannot take.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gatelab.dispatch import gemm_batch

pytestmark = pytest.mark.skipif(
    not gemm_batch.available(torch.float32), reason="torch here has no MKL batched GEMM"
)


def random_counts(draw, num_experts: int) -> torch.Tensor:
    # Idle experts, one-row experts and a hot one are all likely.
    sizes = st.sampled_from([0, 0, 1, 3, 5, 7, 11, 12, 17, 40, 130])
    return torch.tensor(
        draw(st.lists(sizes, min_size=num_experts, max_size=num_experts)), dtype=torch.int64
    )


@st.composite
def problems(draw):
    num_experts = draw(st.integers(1, 9))
    counts = random_counts(draw, num_experts)
    widths = st.sampled_from([1, 2, 8, 16, 29, 33, 40])
    in_dim, out_dim = draw(widths), draw(widths)
    column_major = draw(st.booleans())
    return counts, in_dim, out_dim, column_major


def loop_linear(x, w, counts, out, min_rows):
    start = 0
    for e, count in enumerate(counts.tolist()):
        if count >= min_rows:
            torch.mm(x[start : start + count], w[e].t(), out=out[start : start + count])
        start += count
    return out


def loop_weight_grad(grad, inp, counts):
    # Into slices of one [E, out, in] tensor, as the dispatcher's loop writes them: MKL's
    # rounding can depend on the output's alignment.
    out, start = grad.new_zeros(len(counts), grad.shape[1], inp.shape[1]), 0
    for e, count in enumerate(counts.tolist()):
        torch.mm(grad[start : start + count].t(), inp[start : start + count], out=out[e])
        start += count
    return out


def assert_as_the_loop(got, want):
    """The loop's bits in float32; close in float64, where MKL's batched kernels round
    otherwise than its GEMM."""
    if got.dtype == torch.float32:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def weights(num_experts, out_dim, in_dim, column_major, dtype):
    if column_major:  # as the backward passes w_out.transpose(1, 2)
        return torch.randn(num_experts, in_dim, out_dim, dtype=dtype).transpose(1, 2)
    return torch.randn(num_experts, out_dim, in_dim, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@settings(max_examples=40, deadline=None)
@given(problem=problems())
def test_linear_equals_a_loop_of_mm(dtype, problem):
    counts, in_dim, out_dim, column_major = problem
    rows = int(counts.sum())
    x = torch.randn(rows, in_dim, dtype=dtype)
    w = weights(len(counts), out_dim, in_dim, column_major, dtype)
    got = torch.full((rows, out_dim), float("nan"), dtype=dtype)
    ran = gemm_batch.linear(x, w, counts, got)
    assert ran == (in_dim % gemm_batch.WIDTH_MULTIPLE == out_dim % gemm_batch.WIDTH_MULTIPLE == 0)
    if not ran:
        assert got.isnan().all()
        return
    want = loop_linear(x, w, counts, torch.full_like(got, float("nan")), gemm_batch.MIN_ROWS)
    # Rows of experts under MIN_ROWS stay unwritten (NaN in both).
    assert_as_the_loop(got.nan_to_num(7.0), want.nan_to_num(7.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@settings(max_examples=40, deadline=None)
@given(problem=problems())
def test_weight_grad_equals_a_loop_for_experts_of_min_rows(dtype, problem):
    counts, in_dim, out_dim, _ = problem
    rows = int(counts.sum())
    grad = torch.randn(rows, out_dim, dtype=dtype)
    inp = torch.randn(rows, in_dim, dtype=dtype)
    got = torch.full((len(counts), out_dim, in_dim), float("nan"), dtype=dtype)
    ran = gemm_batch.weight_grad(grad, inp, counts, got)
    aligned = in_dim % gemm_batch.WIDTH_MULTIPLE == out_dim % gemm_batch.WIDTH_MULTIPLE == 0
    assert ran == (aligned and out_dim >= gemm_batch.MIN_ROWS)
    if not ran:
        assert got.isnan().all()
        return
    chosen = counts >= gemm_batch.MIN_ROWS
    assert got[~chosen].isnan().all()  # left to the caller
    assert_as_the_loop(got[chosen], loop_weight_grad(grad, inp, counts)[chosen])


def test_rows_of_a_strided_buffer():
    """Inputs and outputs may be row slices of wider buffers (leading dimension > width)."""
    counts = torch.tensor([16, 0, 19])
    x = torch.randn(35, 24)[:, :16]
    w = torch.randn(3, 8, 16)
    out = torch.zeros(35, 24)[:, 3:11]
    assert gemm_batch.linear(x, w, counts, out)
    assert torch.equal(out, loop_linear(x, w, counts, torch.empty(35, 8), 1))


@pytest.mark.parametrize(
    "why",
    [
        "bfloat16",
        "x column-major",
        "w strided both ways",
        "dtypes differ",
        "odd width",
        "w requires grad",
        "disabled",
    ],
)
def test_refuses_what_it_cannot_take_and_writes_nothing(why):
    counts = torch.tensor([14, 16])
    x, w = torch.randn(30, 8), torch.randn(2, 16, 8)
    if why == "bfloat16":
        x, w = x.bfloat16(), w.bfloat16()
    elif why == "x column-major":
        x = torch.randn(8, 30).t()
    elif why == "w strided both ways":
        w = torch.randn(2, 32, 16)[:, ::2, ::2]
    elif why == "odd width":
        w = torch.randn(2, 15, 8)
    elif why == "w requires grad":  # autograd would not see the write
        w.requires_grad_()
    elif why == "dtypes differ":
        w = w.double()
    out = torch.full((30, w.shape[1]), float("nan"), dtype=x.dtype)
    if why == "disabled":
        with gemm_batch.disabled():
            assert not gemm_batch.available(torch.float32)
            assert not gemm_batch.linear(x, w, counts, out)
        assert gemm_batch.available(torch.float32)
    else:
        assert not gemm_batch.linear(x, w, counts, out)
    assert out.isnan().all()


def test_weight_grad_refuses_a_non_contiguous_output():
    counts = torch.tensor([3, 2])
    out = torch.full((2, 16, 12), float("nan")).transpose(1, 2)
    assert not gemm_batch.weight_grad(torch.randn(5, 12), torch.randn(5, 16), counts, out)
    assert out.isnan().all()


@pytest.mark.parametrize("glu", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_phases_runs_batched_calls_and_matches_the_loop_oracle(monkeypatch, glu, bias):
    """The grouped dispatcher's phase-wise path takes the batched calls for experts of
    MIN_ROWS rows or more (every forward and backward GEMM), and stays equal to the loop
    dispatcher in float64, outputs and all gradients."""
    from conftest import DispatchCase, bank_tensors, grads_of

    from gatelab.dispatch import grouped_dispatch, loop_dispatch
    from gatelab.dispatch.cpu_threads import forced_strategy

    assert gemm_batch.available(torch.float64)  # its first-use check runs before the spy
    calls, real_call = [], gemm_batch._call

    def spy(fn, groups):
        calls.append(groups.groups)
        real_call(fn, groups)

    monkeypatch.setattr(gemm_batch, "_call", spy)
    # 7 experts, about 57 rows each, one hot and some idle.
    case = DispatchCase(200, 16, 24, 9, 2, glu=glu, bias=bias, pattern="one_expert", seed=5)
    x, experts, weights, bank = case.build(torch.float64)
    inputs = [x, weights, *bank_tensors(bank)]
    want = loop_dispatch(x, experts, weights, bank)
    want_grads = grads_of(want, inputs)
    with forced_strategy("phases"):
        got = grouped_dispatch(x, experts, weights, bank)
        got_grads = grads_of(got, inputs)
    assert len(calls) == 6  # two forward GEMMs, two input gradients, two weight gradients
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
