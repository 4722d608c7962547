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
from gatelab.routing.routing import HOST_CHECK_SLOTS


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


# -- strict inputs (issue 15, items 5 and 6) -------------------------------------------------

SAFE_DISPATCHERS = ["loop", "grouped"]


@pytest.mark.parametrize("name", SAFE_DISPATCHERS)
@pytest.mark.parametrize("bad", [4, 7, -2, 1 << 40])
@pytest.mark.parametrize("tokens", [6, HOST_CHECK_SLOTS])  # ids read as a list; as a tensor
def test_out_of_range_expert_ids_raise(name, bad, tokens):
    x, experts, weights, bank = DispatchCase(tokens, 4, 8, 4, 2, seed=3).build(torch.float64)
    experts = experts.clone()
    experts[2, 1] = bad
    low, high = int(experts.min()), int(experts.max())
    message = rf"valid ids are 0\.\.3 and -1 for an empty slot; got ids from {low} to {high}"
    with pytest.raises(ValueError, match=message) as info:
        get_dispatcher(name)(x, experts, weights, bank)
    assert "\n" not in str(info.value)


def test_grouped_never_returns_rows_of_an_earlier_call():
    """The reused scratch rows of a large call must not come back in a later one: the later
    call with a bad id raises, and the same call made valid equals the loop oracle."""
    big = DispatchCase(40, 4, 8, 4, 2, seed=1).build(torch.float64)
    with torch.no_grad():
        grouped_dispatch(*big)  # fills the scratch buffers with 80 rows
        x, experts, weights, bank = DispatchCase(5, 4, 8, 4, 2, seed=2).build(torch.float64)
        bad = experts.clone()
        bad[0, 0] = 4  # one past the last expert
        with pytest.raises(ValueError):
            grouped_dispatch(x, bad, weights, bank)
        valid = bad.masked_fill(bad == 4, EMPTY)
        torch.testing.assert_close(
            grouped_dispatch(x, valid, weights, bank), loop_dispatch(x, valid, weights, bank)
        )


def test_sort_slots_drops_every_id_outside_the_bank():
    """Under torch.compile the id check is skipped: sort_slots routes only ids in 0..E-1
    (the rows before offsets[-1]); every other slot is a padding row whose output
    padded_targets sends to the dropped row, so no dispatcher reads a row it did not write."""
    from gatelab.dispatch.grouped import compact_slots, padded_targets, sort_slots

    experts = torch.tensor([[0, 5], [-1, 2], [9, -7]])
    routed = sort_slots(experts, 3)
    slots, tokens, ids, counts, offsets, valid = routed
    assert slots.numel() == 6 and sorted(slots.tolist()) == list(range(6))  # fixed size
    assert ids[:2].tolist() == [0, 2] and tokens[:2].tolist() == [0, 1]
    assert valid.tolist() == [True, True] + [False] * 4 and int(offsets[-1]) == 2
    assert int(ids.max()) <= 2  # padding rows name a real expert: bias gathers stay in range
    dest_slots, dest_tokens = padded_targets(routed, (3, 2))
    assert dest_slots[2:].tolist() == [6] * 4 and dest_tokens[2:].tolist() == [3] * 4
    slots, tokens, ids, counts, offsets = compact_slots(routed)
    assert int(counts.sum()) == slots.numel() == int(offsets[-1]) == 2


@pytest.mark.parametrize("top_k", [1, 3])
@pytest.mark.parametrize("empty_rate", [0.0, 0.3])
def test_cpu_combine_gives_the_combines_sums(top_k, empty_rate):
    """The CPU combine (routed rows only; at k = 1 with every token routed, a gather in
    token order) gives the device path's sums, as a [T, D] tensor that is no view (so
    autograd can add the router's gradient into it in place)."""
    from gatelab.dispatch.grouped import _combine_out, combine, padded_targets, sort_slots

    gen = torch.Generator().manual_seed(top_k)
    tokens, num_experts, shape = 37, 5, (37, top_k)
    experts = torch.argsort(torch.rand(tokens, num_experts, generator=gen), dim=1)[:, :top_k]
    experts = experts.masked_fill(torch.rand(shape, generator=gen) < empty_rate, EMPTY)
    routed = sort_slots(experts, num_experts)
    y = torch.randn(tokens * top_k, 6, generator=gen)
    want = combine(y, *padded_targets(routed, shape), shape, deterministic=True)
    got = _combine_out(y, routed, shape, deterministic=True)
    assert torch.equal(got, want) and got._base is None


@pytest.mark.parametrize("name", SAFE_DISPATCHERS)
def test_dtype_mismatch_raises_naming_both(name):
    x, experts, weights, bank = DispatchCase(6, 4, 8, 4, 2).build(torch.float32)
    with pytest.raises(ValueError, match=r"torch\.float64.*torch\.float32.*\.to\(") as info:
        get_dispatcher(name)(x.double(), experts, weights, bank)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", SAFE_DISPATCHERS)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_autocast_mismatch_is_allowed(name, x_dtype):
    """Under autocast a bf16 activation meeting float32 experts is legitimate."""
    x, experts, weights, bank = DispatchCase(12, 8, 8, 4, 2, seed=5).build(torch.float32)
    ref = loop_dispatch(x, experts, weights, bank)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = get_dispatcher(name)(x.to(x_dtype), experts, weights, bank)
    assert out.dtype == x_dtype
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)
    out.float().sum().backward()
    assert bank.w_in.grad is not None


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda x, e, w: (x[:, :3], e, w), "dim 3"),
        (lambda x, e, w: (x[None], e, w), "2-D"),
        (lambda x, e, w: (x, e[:, :1], w), "same"),
        (lambda x, e, w: (x, e[:3], w[:3]), "tokens=6"),
        (lambda x, e, w: (x, e.double(), w), "integer"),
        (lambda x, e, w: (x, e, w.long()), "floating"),
    ],
)
@pytest.mark.parametrize("name", SAFE_DISPATCHERS)
def test_malformed_inputs_raise_one_line(name, change, match):
    x, experts, weights, bank = DispatchCase(6, 4, 8, 4, 2).build(torch.float64)
    with pytest.raises(ValueError, match=match) as info:
        get_dispatcher(name)(*change(x.detach(), experts, weights.detach()), bank)
    assert "\n" not in str(info.value)


# -- autograd beyond one backward (issue 15, items 10 and 12) --------------------------------


@pytest.mark.parametrize("name", SAFE_DISPATCHERS)
@pytest.mark.parametrize("case", ["some_slots_empty", "all_to_one_expert", "zero_tokens"])
def test_double_backward_matches_loop(name, case):
    """autograd.grad(create_graph=True) then backward through it (a gradient penalty)."""
    results = []
    for fn in (loop_dispatch, get_dispatcher(name)):
        x, experts, weights, bank = EDGE_CASES[case].build(torch.float64)
        leaves = [x, weights, *bank_tensors(bank)]
        out = fn(x, experts, weights, bank)
        (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        penalty = gx.square().sum()
        results.append(grads_of(penalty.reshape(1, 1), leaves))  # zeros if nothing routed
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_moe_layer(reentrant):
    from torch.utils.checkpoint import checkpoint

    from gatelab.layers import MoE

    torch.manual_seed(0)
    layer = MoE(8, 16, 4, top_k=2, dispatcher="grouped").double()
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    grads = []
    for wrap in (False, True):
        layer.zero_grad()
        x.grad = None
        out = checkpoint(layer, x, use_reentrant=reentrant) if wrap else layer(x)
        out.square().sum().backward()
        grads.append([x.grad.clone(), *(p.grad.clone() for p in layer.parameters())])
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_lm(reentrant):
    """gatelab's LM with every block checkpointed trains to the same gradients."""
    from lm_tiny import tiny_moe_lm
    from torch.utils.checkpoint import checkpoint

    model = tiny_moe_lm().train()
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(4))
    grads = []
    for wrap in (False, True):
        model.zero_grad()
        originals = [block.forward for block in model.blocks]
        if wrap:
            for block, forward in zip(model.blocks, originals, strict=True):
                block.forward = lambda *a, f=forward: checkpoint(f, *a, use_reentrant=reentrant)
        try:
            model(ids, targets=ids.roll(-1, 1)).loss.backward()
        finally:
            for block, forward in zip(model.blocks, originals, strict=True):
                block.forward = forward
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], atol=1e-5, rtol=1e-4, msg=key)
