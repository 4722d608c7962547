"""The triton dispatcher against the loop oracle: forward, every gradient, both combines.

Without a GPU the kernels run in triton's interpreter on CPU tensors. Triton reads
TRITON_INTERPRET when it is imported (its own tl functions are jitted then), when a kernel
module is imported and when a kernel runs: this module imports triton with it set (and
skips if triton was already imported without it), and sets it again around each test.
Tiny shapes keep the interpreter within seconds. On a CUDA machine the same tests run the
compiled kernels (benchmarks/gpu_check.sh). Without triton the module is skipped.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
from conftest import EDGE_CASES, DispatchCase, bank_tensors

from gatelab.dispatch import auto_dispatch, get_dispatcher, grouped_dispatch, loop_dispatch
from gatelab.experts.bank import ExpertWeights

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install 'gatelab[gpu]')", allow_module_level=True)
if not ON_GPU:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip(
            "triton was imported without TRITON_INTERPRET=1 earlier in this process, so its "
            "kernels cannot run on CPU here; run this file alone",
            allow_module_level=True,
        )
    _before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    import triton  # noqa: F401  (imported in interpreter mode)

    if _before is None:  # leave the process environment as it was; the fixture sets it
        del os.environ["TRITON_INTERPRET"]

from gatelab.dispatch.triton import configs, triton_dispatch  # noqa: E402


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    """Run the kernels in the interpreter when there is no GPU; on a GPU, compile each
    kernel with its family's first config instead of autotuning every tiny test size."""
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    from gatelab.dispatch.triton import function

    monkeypatch.setattr(function, "AUTOTUNE", False)


@pytest.fixture(params=["decode", "blocks"])
def table(request, monkeypatch):
    """Both row-block tables: one block per expert (decode) and BLOCK_M-row blocks."""
    from gatelab.dispatch.triton import function

    monkeypatch.setattr(function, "DECODE_SLOTS", 10**9 if request.param == "decode" else -1)
    return request.param


def build(case: DispatchCase, dtype=torch.float32):
    """The case's inputs as fresh leaves on DEVICE."""
    x, experts, weights, bank = case.build(dtype)

    def leaf(t):
        return None if t is None else t.detach().to(DEVICE).requires_grad_()

    bank = ExpertWeights(*(leaf(t) for t in bank[:4]), bank.activate)
    return leaf(x), experts.to(DEVICE), leaf(weights), bank


def run(fn, case, inputs):
    x, experts, weights, bank = inputs
    out = fn(x, experts, weights, bank, case.deterministic)
    assert out.shape == x.shape and out.dtype == x.dtype
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    tensors = [x, weights, *bank_tensors(bank)]
    if out.requires_grad:
        found = torch.autograd.grad(out, tensors, g, allow_unused=True)
    else:
        found = [None] * len(tensors)
    grads = [torch.zeros_like(t) if d is None else d for t, d in zip(tensors, found, strict=True)]
    return out.detach(), grads


def assert_matches_loop(case: DispatchCase, atol=2e-5, rtol=2e-5):
    inputs = build(case)
    ref, ref_grads = run(loop_dispatch, case, inputs)
    out, out_grads = run(triton_dispatch, case, inputs)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol, msg=lambda m: f"{case}\n{m}")
    names = ["x", "weights", "w_in", "w_out", "b_in", "b_out"]
    for name, got, want in zip(names, out_grads, ref_grads, strict=False):
        torch.testing.assert_close(
            got, want, atol=atol, rtol=rtol, msg=lambda m, n=name: f"grad {n}: {case}\n{m}"
        )


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_edge_cases_match_loop(name, table):
    """Zero tokens, idle experts, k = E, one hot expert, EMPTY slots, both combines."""
    assert_matches_loop(EDGE_CASES[name])


def _random_cases(count: int, seed: int = 0) -> list[DispatchCase]:
    """Small random cases: every activation, GLU and plain, biases, EMPTY slots, both
    combines; widths that are not multiples of the 16-wide tiles (masks exercised)."""
    gen = torch.Generator().manual_seed(seed)
    acts = ["silu", "gelu", "gelu_tanh", "relu"]

    def pick(low, high):
        return int(torch.randint(low, high + 1, (1,), generator=gen))

    cases = []
    for i in range(count):
        num_experts = pick(1, 6)
        cases.append(
            DispatchCase(
                num_tokens=pick(1, 24),
                dim=pick(1, 20),
                hidden_dim=pick(1, 20),
                num_experts=num_experts,
                top_k=pick(1, num_experts),
                glu=i % 2 == 0,
                bias=i % 3 == 0,
                act=acts[i % len(acts)],
                empty_rate=[0.0, 0.3][i % 2],
                deterministic=i % 4 != 3,
                seed=i,
            )
        )
    return cases


@pytest.mark.parametrize("case", _random_cases(6), ids=lambda c: f"seed{c.seed}")
def test_random_shapes_match_loop(case, table):
    assert_matches_loop(case)


def test_deterministic_mode_is_bitwise_repeatable(table):
    case = DispatchCase(24, 12, 20, 4, 3, bias=True, empty_rate=0.2, deterministic=True)
    first, second = (run(triton_dispatch, case, build(case)) for _ in range(2))
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1], strict=True):
        assert torch.equal(a, b)


def test_more_rows_than_one_block():
    """An expert with several BLOCK_M blocks, and a decode block looping over its rows."""
    case = DispatchCase(40, 8, 8, 2, 1, pattern="one_expert")
    assert_matches_loop(case)


def test_autograd_activation_and_float64_fall_back_to_grouped():
    """An arbitrary callable activation (no kernel formula) and float64 run grouped."""
    case = DispatchCase(6, 4, 8, 3, 2)
    x, experts, weights, bank = build(case, torch.float64)
    assert torch.equal(
        triton_dispatch(x, experts, weights, bank), grouped_dispatch(x, experts, weights, bank)
    )
    x, experts, weights, bank = build(case)
    gate_up = bank.activate  # GLU("silu"): the same math, but as an opaque callable
    custom = bank._replace(activate=lambda h: gate_up(h))
    assert torch.equal(
        triton_dispatch(x, experts, weights, custom),
        grouped_dispatch(x, experts, weights, custom),
    )


@pytest.mark.skipif(ON_GPU, reason="checks the CPU choice")
def test_auto_is_grouped_on_cpu():
    case = DispatchCase(10, 4, 8, 3, 2)
    x, experts, weights, bank = build(case)
    assert get_dispatcher("auto") is auto_dispatch
    assert torch.equal(
        auto_dispatch(x, experts, weights, bank), grouped_dispatch(x, experts, weights, bank)
    )


def test_row_block_table_covers_each_row_once():
    from gatelab.dispatch.triton.function import RowBlocks

    counts = torch.tensor([0, 5, 16, 17, 0, 33])
    for decode in (False, True):
        blocks = RowBlocks(counts, int(counts.sum()), 16, decode)
        seen = torch.zeros(int(counts.sum()), dtype=torch.int64)
        ends = counts.cumsum(0)
        for e, start, rows in zip(*(t.tolist() for t in blocks.args()), strict=True):
            assert rows == 0 or (ends[e] - counts[e] <= start and start + rows <= ends[e])
            assert decode or rows <= 16
            seen[start : start + rows] += 1
        assert torch.equal(seen, torch.ones_like(seen))


def test_autotune_table_names_every_family():
    for kind, table in configs.AUTOTUNE.items():
        assert set(table) == set(configs.FAMILIES), kind
        for entries in table.values():
            assert entries and all(
                e["BLOCK_N"] >= 16 and e.get("BLOCK_K", 16) >= 16 for e in entries
            )
    assert configs.family(torch.device("cpu")) == "default"


def test_inference_forward_matches_training_forward():
    """Under no_grad the up projection keeps no pre-activation; the output is the same."""
    case = DispatchCase(12, 8, 10, 4, 2, bias=True)
    x, experts, weights, bank = build(case)
    with torch.no_grad():
        inference = triton_dispatch(x, experts, weights, bank)
    assert torch.equal(inference, triton_dispatch(x, experts, weights, bank).detach())


@pytest.mark.parametrize("family", configs.FAMILIES)
def test_autotuners_build_from_the_table(family):
    """Each kernel wraps in triton.autotune with its family's configs plus the default."""
    from gatelab.dispatch.triton import function

    kinds = {
        "up_proj_kernel": "up",
        "gather_gemm_kernel": "gemm",
        "wgrad_kernel": "wgrad",
        "act_backward_kernel": "act",
    }
    for name, kind in kinds.items():
        tuner = function._tuned(name, kind, family, True)
        expected = len(configs.AUTOTUNE[kind][family]) + len(configs.AUTOTUNE[kind]["default"])
        assert len(tuner.configs) == expected
        assert len(function._tuned(name, kind, family, False).configs) == 1


@pytest.mark.skipif(ON_GPU, reason="the GPU runs this path in every other test")
@pytest.mark.parametrize("deterministic", [True, False])
def test_gpu_launch_path_in_the_interpreter(monkeypatch, deterministic, table):
    """The launch code a GPU takes (triton.autotune wrappers, config-driven grids, the
    family's BLOCK_M and the default tiles), run through the interpreter."""
    from gatelab.dispatch.triton import function, kernel_activation

    monkeypatch.setattr(function, "INTERPRET", False)
    case = DispatchCase(20, 12, 10, 4, 2, bias=True, deterministic=deterministic)
    inputs = build(case)
    ref, ref_grads = run(loop_dispatch, case, inputs)

    def fused(x, experts, weights, bank, deterministic):
        act = kernel_activation(bank.activate)
        return function.run(x, experts, weights, bank, *act, deterministic)

    out, out_grads = run(fused, case, inputs)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    for got, want in zip(out_grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_triton_entry_checks_ids_and_double_backward():
    """The triton entry refuses ids outside the bank like every dispatcher, and double
    backward differentiates the composite path (issue 15, items 5 and 12)."""
    from gatelab.dispatch import loop_dispatch

    case = EDGE_CASES["some_slots_empty"]
    x, experts, weights, bank = build(case)
    with pytest.raises(ValueError, match="valid ids are"):
        triton_dispatch(x, experts.masked_fill(experts == 0, 99), weights, bank)
    penalties = []
    for fn in (loop_dispatch, triton_dispatch):
        x, experts, weights, bank = build(case)
        (gx,) = torch.autograd.grad(
            fn(x, experts, weights, bank).square().sum(), x, create_graph=True
        )
        (g_w,) = torch.autograd.grad(gx.square().sum(), bank.w_in)
        penalties.append(g_w)
    torch.testing.assert_close(penalties[1], penalties[0], atol=1e-4, rtol=1e-3)
