"""The C++ few-row kernel (``dispatch/few_rows.cpp``) behind decode-sized experts.

Checked against a float64 matmul on random shapes (widths off the vector length, idle
and listed experts, up to ``native.ROWS_MAX`` rows and past it), for any thread count
(each output is one thread's dot product, so the bits must not change), and as the
grouped dispatcher uses it: one call per projection for all few-row experts. Skipped
where the extension cannot be built (no compiler); the dispatcher's fallback is covered
by the ``-mkl`` strategies of ``test_cpu_strategies.py``.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import DispatchCase
from hypothesis import given, settings
from hypothesis import strategies as st

from gatelab.dispatch import grouped_dispatch, loop_dispatch, native
from gatelab.dispatch.cpu_threads import forced_strategy
from gatelab.dispatch.grouped import few_row_experts, grouped_linear


def _builds() -> bool:
    probe = torch.zeros(1, 1)
    return shutil.which("c++") is not None and native.rows_fit(probe, probe[None], probe)


pytestmark = pytest.mark.skipif(not _builds(), reason="the C++ few-row kernel does not build here")


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(0, 9), min_size=1, max_size=6),
    out_dim=st.integers(1, 40),
    in_dim=st.integers(1, 70),
    workers=st.integers(1, 3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_rows_linear_matches_a_float64_matmul(counts, out_dim, in_dim, workers, dtype, seed):
    """Listed experts' rows get x @ w[e].T; every other row of out is left as it was."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), in_dim, generator=gen, dtype=dtype)
    w = torch.randn(len(counts), out_dim, in_dim, generator=gen, dtype=dtype)
    out = torch.full((x.shape[0], out_dim), float("nan"), dtype=dtype)
    experts, starts, sizes = few_row_experts(counts, few=6)
    native.rows_linear(x, w, experts, starts, sizes, out, workers)
    want = out.clone().double()
    for e, start, size in zip(experts, starts, sizes, strict=True):
        rows = slice(start, start + size)
        want[rows] = x[rows].double() @ w[e].double().T
    tol = 1e-12 if dtype == torch.float64 else 2e-5 * max(1.0, in_dim**0.5)
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol, equal_nan=True)


def test_rows_linear_bits_do_not_depend_on_the_thread_count():
    """Phase-wise runs the kernel on every thread, split on one worker: same bits."""
    x, w = torch.randn(12, 77), torch.randn(3, 130, 77)
    outputs = []
    for workers in (1, 2, 3):
        out = torch.empty(12, 130)
        native.rows_linear(x, w, [2, 0, 1], [0, 5, 6], [5, 1, 6], out, workers)
        outputs.append(out)
    assert all(torch.equal(outputs[0], other) for other in outputs[1:])


def test_rows_linear_takes_strided_rows():
    """Rows of x and out may sit in wider buffers (unit stride within a row)."""
    x_wide, out_wide = (
        torch.randn(4, 50, dtype=torch.float64),
        torch.zeros(4, 60, dtype=torch.float64),
    )
    w = torch.randn(2, 30, 20, dtype=torch.float64)
    x, out = x_wide[:, :20], out_wide[:, 10:40]
    native.rows_linear(x, w, [1], [0], [4], out, 2)
    torch.testing.assert_close(out, x @ w[1].T)
    assert out_wide[:, :10].abs().sum() == 0 and out_wide[:, 40:].abs().sum() == 0


def test_rows_linear_refuses_what_it_cannot_read():
    x, w, out = torch.randn(4, 8), torch.randn(2, 6, 8), torch.empty(4, 6)
    with pytest.raises(RuntimeError, match="out of range"):
        native.rows_linear(x, w, [2], [0], [1], out, 1)  # no expert 2
    with pytest.raises(RuntimeError, match="out of range"):
        native.rows_linear(x, w, [0], [3], [2], out, 1)  # rows 3..4 of 4
    with pytest.raises(RuntimeError, match="differ in length"):
        native.rows_linear(x, w, [0, 1], [0], [1], out, 1)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        native.rows_linear(x.half(), w.half(), [0], [0], [1], out.half(), 1)


def test_rows_fit_names_what_the_kernel_takes():
    x, w, out = torch.randn(4, 8), torch.randn(2, 6, 8), torch.empty(4, 6)
    assert native.rows_fit(x, w, out)
    assert not native.rows_fit(x.bfloat16(), w.bfloat16(), out.bfloat16())
    assert not native.rows_fit(x.double(), w, out)  # mixed dtypes
    assert not native.rows_fit(x, w.transpose(1, 2).contiguous().transpose(1, 2), out)
    assert not native.rows_fit(x.t().contiguous().t(), w, out)  # column-major x
    assert not native.rows_fit(x, w.requires_grad_(), out)  # autograd would record it
    with torch.no_grad():
        assert native.rows_fit(x, w, out)
    with native.disabled("rows"):
        assert not native.rows_fit(x, w.detach(), out)


@pytest.mark.parametrize("strategy", ["phases", "split"])
def test_decode_runs_one_kernel_call_per_projection(monkeypatch, strategy):
    """A decode step (experts of 0-3 rows) through the Python passes runs each projection
    as one kernel call over all experts (phase-wise), or one per expert on split's
    workers, and equals the loop dispatcher. (The C++ passes call the kernel inside:
    their bits are compared with these in test_cpu_strategies and below.)"""
    calls = []
    real = native.rows_linear
    monkeypatch.setattr(native, "rows_linear", lambda *a: (calls.append(len(a[2])), real(*a))[1])
    x, experts, weights, bank = DispatchCase(4, 32, 24, 6, 2, seed=0).build(torch.float32)
    active = int(experts.unique().numel())
    with torch.no_grad(), forced_strategy(strategy), native.disabled("small", "split"):
        got = grouped_dispatch(x, experts, weights, bank)
        want = loop_dispatch(x, experts, weights, bank)
    if strategy == "phases":
        assert calls == [active, active]  # both projections, every active expert in each
    else:
        assert calls == [1] * (2 * active)  # each expert's two projections on its worker
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("glu, act", [(True, "silu"), (False, "gelu"), (True, "relu")])
@pytest.mark.parametrize(
    "shape", [(1, 32, 24, 8, 2), (5, 20, 13, 6, 3), (40, 16, 12, 4, 2), (3, 8, 8, 4, 4)]
)
def test_small_forward_gives_the_python_paths_bits(monkeypatch, shape, glu, act, bias):
    """A small inference call runs in one C++ call (native.small_forward) with the
    Python phase-wise path's ops and bits, also with experts past ROWS_MAX rows (a GEMM
    each), empty slots (padding rows) and k = E."""
    calls = []
    real = native.small_forward
    monkeypatch.setattr(native, "small_forward", lambda *a: (calls.append(1), real(*a))[1])
    case = DispatchCase(*shape, glu=glu, act=act, bias=bias, empty_rate=0.2, seed=sum(shape))
    x, experts, weights, bank = case.build(torch.float32)
    with torch.no_grad(), forced_strategy("phases"):
        got = grouped_dispatch(x, experts, weights, bank)
        assert calls == [1]
        with native.disabled("small"):
            want = grouped_dispatch(x, experts, weights, bank)
    assert calls == [1]
    assert torch.equal(got, want)


def test_grouped_linear_leaves_larger_experts_to_mkl():
    """Experts past ROWS_MAX rows stay on the GEMM path; the result is the same product."""
    counts = torch.tensor([native.ROWS_MAX + 1, 2, 0, 1])
    x = torch.randn(int(counts.sum()), 16, dtype=torch.float64)
    w = torch.randn(4, 12, 16, dtype=torch.float64)
    got = grouped_linear(x, w, counts, counts.cumsum(0).to(torch.int32), kernel=False)
    want = torch.cat([x[s] @ w[e].T for e, s in enumerate(_slices(counts.tolist()))])
    torch.testing.assert_close(got, want)


def _slices(counts: list[int]) -> list[slice]:
    out, start = [], 0
    for count in counts:
        out.append(slice(start, start + count))
        start += count
    return out
