"""Triton kernels of the triton dispatcher (ScatterMoE-style: gather in place, no copies).

Rows live in *sorted order*: the routed slots sorted by expert (``sort_slots``), so each
expert owns one contiguous range of rows. A row-block table (``block_expert``,
``block_start``, ``block_rows``) tells each program which expert and which rows it works
on; a program loops over its rows in steps of BLOCK_M (once for training-size tables,
where each block has at most BLOCK_M rows; a few times in the decode table, where each
block is a whole expert).

- ``up_proj_kernel``: hidden = x[tokens] @ W_in[e].T (+ b_in), the token rows gathered
  from x as they are loaded, and the activation in the epilogue: act(gate) * up * weight
  (GLU) or act(h) * weight, written in sorted order. The pre-activation is written too
  when backward needs it.
- ``gather_gemm_kernel``: out = A[rows] @ B[e] (+ weight * bias), A's rows optionally
  gathered through an index, the result stored in sorted order, scattered to slot order
  (deterministic combine: no two programs write one row) or atomically added into its
  token's row (fast combine).
- ``wgrad_kernel``: dW[e] = G[rows of e].T @ A[rows of e], both operands optionally
  gathered, one program per (expert, output tile), reducing over the expert's rows.
- ``act_backward_kernel``: d pre-activation and d routing weight from d activation,
  one program per row block (the d weight row sums stay inside one program: no atomics).

The three GEMM kernels are longer than gatelab's ~60-line rule for functions: most of each
is its signature (every pointer, stride and tile size is a kernel argument), and splitting
the tile loop across ``@triton.jit`` helpers would hide the one loop a reader must check.

Importing this module imports triton; set TRITON_INTERPRET=1 before that to run the
kernels on CPU tensors (how the tests run them).
"""

from __future__ import annotations

import triton
import triton.language as tl

# Activation codes (constexpr ACT) are gatelab.dispatch.triton._ACT_CODES:
# 0 silu, 1 gelu (erf), 2 gelu_tanh, 3 relu.

_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327
_TANH_C = 0.7978845608028654  # sqrt(2 / pi)


@triton.jit
def _tanh(u):
    return 2.0 * tl.sigmoid(2.0 * u) - 1.0


@triton.jit
def _act(x, ACT: tl.constexpr):
    """The activation of fp32 ``x``, the same formulas as torch's."""
    if ACT == 0:
        y = x * tl.sigmoid(x)
    elif ACT == 1:
        y = 0.5 * x * (1.0 + tl.math.erf(x * _SQRT_HALF))
    elif ACT == 2:
        y = 0.5 * x * (1.0 + _tanh(_TANH_C * (x + 0.044715 * x * x * x)))
    else:
        y = tl.maximum(x, 0.0)
    return y


@triton.jit
def _act_grad(x, ACT: tl.constexpr):
    """d act / d x at fp32 ``x`` (relu: 0 at 0, as torch's threshold_backward)."""
    if ACT == 0:
        s = tl.sigmoid(x)
        d = s * (1.0 + x * (1.0 - s))
    elif ACT == 1:
        d = 0.5 * (1.0 + tl.math.erf(x * _SQRT_HALF)) + x * _INV_SQRT_2PI * tl.exp(-0.5 * x * x)
    elif ACT == 2:
        t = _tanh(_TANH_C * (x + 0.044715 * x * x * x))
        d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _TANH_C * (1.0 + 3 * 0.044715 * x * x)
    else:
        d = tl.where(x > 0, 1.0, 0.0)
    return d


@triton.jit
def up_proj_kernel(
    x_ptr,
    tokens_ptr,
    w_ptr,
    b_ptr,
    scale_ptr,
    hidden_ptr,
    act_ptr,
    block_expert_ptr,
    block_start_ptr,
    block_rows_ptr,
    D,
    F,
    stride_xt,
    stride_xd,
    stride_we,
    stride_wh,
    stride_wd,
    stride_be,
    stride_hn,
    stride_an,
    GLU: tl.constexpr,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SAVE_HIDDEN: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """act_out[r, n] = weight[r] * act(x[tokens[r]] @ W_in[e, n].T (+ b)) (* up), n < F."""
    block, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(block_expert_ptr + block).to(tl.int64)
    start = tl.load(block_start_ptr + block)
    rows = tl.load(block_rows_ptr + block)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < F
    w_gate = w_ptr + e * stride_we + offs_n[None, :] * stride_wh
    w_up = w_gate + F * stride_wh  # GLU: up rows follow the F gate rows
    for m0 in range(0, rows, BLOCK_M):
        local = m0 + tl.arange(0, BLOCK_M)
        m_mask = local < rows
        offs_m = (start + local).to(tl.int64)
        # The gather: each row's token index, read once per row block, addresses x directly.
        tok = tl.load(tokens_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < D
            a = tl.load(
                x_ptr + tok[:, None] * stride_xt + offs_k[None, :] * stride_xd,
                mask=m_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            w_mask = k_mask[:, None] & n_mask[None, :]
            wg = tl.load(w_gate + offs_k[:, None] * stride_wd, mask=w_mask, other=0.0)
            acc_gate = tl.dot(a, wg, acc_gate, input_precision=PRECISION)
            if GLU:
                wu = tl.load(w_up + offs_k[:, None] * stride_wd, mask=w_mask, other=0.0)
                acc_up = tl.dot(a, wu, acc_up, input_precision=PRECISION)
        if HAS_BIAS:
            bias = b_ptr + e * stride_be + offs_n
            acc_gate += tl.load(bias, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            if GLU:
                acc_up += tl.load(bias + F, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out_mask = m_mask[:, None] & n_mask[None, :]
        hidden_rows = hidden_ptr + offs_m[:, None] * stride_hn + offs_n[None, :]
        if SAVE_HIDDEN:
            tl.store(hidden_rows, acc_gate.to(hidden_ptr.dtype.element_ty), mask=out_mask)
            if GLU:
                tl.store(hidden_rows + F, acc_up.to(hidden_ptr.dtype.element_ty), mask=out_mask)
        # The epilogue: activation, GLU product and routing weight, in registers.
        y = _act(acc_gate, ACT)
        if GLU:
            y = y * acc_up
        scale = tl.load(scale_ptr + offs_m, mask=m_mask, other=0.0).to(tl.float32)
        y = y * scale[:, None]
        act_rows = act_ptr + offs_m[:, None] * stride_an + offs_n[None, :]
        tl.store(act_rows, y.to(act_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def gather_gemm_kernel(
    a_ptr,
    a_idx_ptr,
    b_ptr,
    bias_ptr,
    scale_ptr,
    out_ptr,
    out_idx_ptr,
    block_expert_ptr,
    block_start_ptr,
    block_rows_ptr,
    K,
    N,
    stride_am,
    stride_ak,
    stride_be,
    stride_bk,
    stride_bn,
    stride_bias_e,
    stride_om,
    stride_on,
    GATHER_A: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    OUT_MODE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y[r] = A[a_idx[r] or r] @ B[e] (+ weight[r] * bias[e]) for the rows r of a block.

    B[e][k, n] is at b_ptr + e*stride_be + k*stride_bk + n*stride_bn, so one kernel serves
    W_out (forward), W_out transposed (d act) and W_in transposed (dX). OUT_MODE 0 stores
    y in sorted order (row r), 1 stores it at row out_idx[r] (the slot: a permutation, so
    the combine stays deterministic), 2 atomically adds it into fp32 row out_idx[r] (the
    token: fast, order of the adds not fixed).
    """
    block, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(block_expert_ptr + block).to(tl.int64)
    start = tl.load(block_start_ptr + block)
    rows = tl.load(block_rows_ptr + block)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    b_cols = b_ptr + e * stride_be + offs_n[None, :] * stride_bn
    for m0 in range(0, rows, BLOCK_M):
        local = m0 + tl.arange(0, BLOCK_M)
        m_mask = local < rows
        offs_m = (start + local).to(tl.int64)
        if GATHER_A:
            a_rows = tl.load(a_idx_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
        else:
            a_rows = offs_m
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            a = tl.load(
                a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak,
                mask=m_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            b = tl.load(
                b_cols + offs_k[:, None] * stride_bk,
                mask=k_mask[:, None] & n_mask[None, :],
                other=0.0,
            )
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if HAS_BIAS:
            scale = tl.load(scale_ptr + offs_m, mask=m_mask, other=0.0).to(tl.float32)
            bias = tl.load(bias_ptr + e * stride_bias_e + offs_n, mask=n_mask, other=0.0)
            acc += scale[:, None] * bias.to(tl.float32)[None, :]
        if OUT_MODE == 0:
            out_rows = offs_m
        else:
            out_rows = tl.load(out_idx_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
        out = out_ptr + out_rows[:, None] * stride_om + offs_n[None, :] * stride_on
        out_mask = m_mask[:, None] & n_mask[None, :]
        if OUT_MODE == 2:
            tl.atomic_add(out, acc, mask=out_mask)
        else:
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def wgrad_kernel(
    g_ptr,
    g_idx_ptr,
    a_ptr,
    a_idx_ptr,
    out_ptr,
    starts_ptr,
    counts_ptr,
    M,
    N,
    stride_gr,
    stride_gm,
    stride_ar,
    stride_an,
    stride_oe,
    stride_om,
    stride_on,
    GATHER_G: tl.constexpr,
    GATHER_A: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[e] = G[rows of e].T @ A[rows of e] -> [M, N]; rows optionally gathered.

    One program per (expert, M tile, N tile) reduces over that expert's rows in steps of
    BLOCK_K; an expert without rows writes zeros (its gradient is exactly zero).
    """
    e = tl.program_id(0)
    pid_m, pid_n = tl.program_id(1), tl.program_id(2)
    start = tl.load(starts_ptr + e)
    count = tl.load(counts_ptr + e)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, count, BLOCK_K):
        local = k0 + tl.arange(0, BLOCK_K)
        k_mask = local < count
        rows = (start + local).to(tl.int64)
        g_rows = rows
        a_rows = rows
        if GATHER_G:
            g_rows = tl.load(g_idx_ptr + rows, mask=k_mask, other=0).to(tl.int64)
        if GATHER_A:
            a_rows = tl.load(a_idx_ptr + rows, mask=k_mask, other=0).to(tl.int64)
        g = tl.load(
            g_ptr + g_rows[None, :] * stride_gr + offs_m[:, None] * stride_gm,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        a = tl.load(
            a_ptr + a_rows[:, None] * stride_ar + offs_n[None, :] * stride_an,
            mask=k_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(g, a, acc, input_precision=PRECISION)
    out = out_ptr + e.to(tl.int64) * stride_oe
    out += offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def act_backward_kernel(
    hidden_ptr,
    g_act_ptr,
    scale_ptr,
    g_hidden_ptr,
    g_scale_ptr,
    rows,
    F,
    stride_hn,
    stride_gn,
    stride_ghn,
    GLU: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """From d loss / d (weight * act(gate) * up): d gate, d up and d weight.

    Recomputes act(gate) from the saved pre-activation (no forward buffer for it); the
    d weight row sum runs over the row's F columns inside this one program.
    """
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_mask = offs_m < rows
    scale = tl.load(scale_ptr + offs_m, mask=m_mask, other=0.0).to(tl.float32)
    g_scale = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, F, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = m_mask[:, None] & (offs_n < F)[None, :]
        h = hidden_ptr + offs_m[:, None] * stride_hn + offs_n[None, :]
        gate = tl.load(h, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_act_ptr + offs_m[:, None] * stride_gn + offs_n[None, :], mask=mask, other=0.0)
        g = g.to(tl.float32)
        a = _act(gate, ACT)
        da = _act_grad(gate, ACT)
        gh = g_hidden_ptr + offs_m[:, None] * stride_ghn + offs_n[None, :]
        if GLU:
            up = tl.load(h + F, mask=mask, other=0.0).to(tl.float32)
            g_scale += tl.sum(g * a * up, axis=1)
            tl.store(
                gh, (g * scale[:, None] * up * da).to(g_hidden_ptr.dtype.element_ty), mask=mask
            )
            tl.store(gh + F, (g * scale[:, None] * a).to(g_hidden_ptr.dtype.element_ty), mask=mask)
        else:
            g_scale += tl.sum(g * a, axis=1)
            tl.store(gh, (g * scale[:, None] * da).to(g_hidden_ptr.dtype.element_ty), mask=mask)
    tl.store(g_scale_ptr + offs_m, g_scale, mask=m_mask)
