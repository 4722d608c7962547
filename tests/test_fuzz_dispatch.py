"""Property-based fuzzing of the dispatchers against the loop oracle (issue 15).

Random sizes (0 tokens, k = E, idle experts, one hot expert), expert ids that include
EMPTY slots and ids outside the bank, and float32/float64 inputs and experts in every
combination. Every case must end in one of two ways: the grouped dispatcher equals the
loop oracle (outputs and gradients; float64 to 1e-10), or both raise a one-line
ValueError. ``CASES`` counts the outcomes; run with ``-s`` to see the counts.
"""

from __future__ import annotations

import collections

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gatelab import ExpertBank
from gatelab.dispatch import grouped_dispatch, loop_dispatch
from gatelab.experts import ACTIVATION_NAMES
from gatelab.routing import EMPTY

CASES: collections.Counter = collections.Counter()
DTYPES = (torch.float32, torch.float64)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    print(f"\nfuzz_dispatch cases: {dict(CASES)} total={sum(CASES.values())}")


@st.composite
def fuzz_cases(draw):
    num_experts = draw(st.integers(1, 8))
    top_k = draw(st.integers(1, num_experts))
    num_tokens = draw(st.sampled_from([0, 1, 2, 33]) | st.integers(0, 24))
    pattern = draw(st.sampled_from(["random", "idle", "one_hot", "full", "empty"]))
    bad_ids = [num_experts, num_experts + 7, -2, -(2**40)]
    bad_id = draw(st.sampled_from([None] * 9 + bad_ids))  # mostly valid ids
    bank_dtype = draw(st.sampled_from(DTYPES))
    mismatch = draw(st.sampled_from([False, False, False, True]))
    return dict(
        num_tokens=num_tokens,
        dim=draw(st.integers(1, 10)),
        hidden_dim=draw(st.integers(1, 10)),
        num_experts=num_experts,
        top_k=num_experts if pattern == "full" else top_k,
        pattern=pattern,
        bad_id=bad_id,
        x_dtype=DTYPES[DTYPES.index(bank_dtype) - 1] if mismatch else bank_dtype,
        bank_dtype=bank_dtype,
        glu=draw(st.booleans()),
        bias=draw(st.booleans()),
        act=draw(st.sampled_from(ACTIVATION_NAMES)),
        seed=draw(st.integers(0, 2**16)),
    )


def _experts(case, gen) -> torch.Tensor:
    t, e, k = case["num_tokens"], case["num_experts"], case["top_k"]
    experts = torch.argsort(torch.rand(t, e, generator=gen), dim=1)[:, :k]
    if case["pattern"] == "idle":  # only the first half of the experts get tokens
        experts = torch.randint(0, max(1, e // 2), (t, k), generator=gen)
    elif case["pattern"] == "one_hot":
        experts[:, 0] = e - 1
    elif case["pattern"] == "empty":
        experts = experts.masked_fill(torch.rand(t, k, generator=gen) < 0.5, EMPTY)
    if case["bad_id"] is not None and experts.numel():
        flat = experts.reshape(-1).clone()
        flat[int(torch.randint(flat.numel(), (1,), generator=gen))] = case["bad_id"]
        experts = flat.view(experts.shape)
    return experts


def _build(case):
    gen = torch.Generator().manual_seed(case["seed"])
    experts = _experts(case, gen)
    weights = torch.rand(experts.shape, generator=gen, dtype=torch.float64)
    bank = ExpertBank(
        case["num_experts"],
        case["dim"],
        case["hidden_dim"],
        act=case["act"],
        glu=case["glu"],
        bias=case["bias"],
    ).to(case["bank_dtype"])
    with torch.no_grad():
        for p in bank.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    x = torch.randn(case["num_tokens"], case["dim"], generator=gen, dtype=torch.float64)
    x = x.to(case["x_dtype"]).requires_grad_()
    return x, experts, weights.requires_grad_(), bank


def _expected_error(case) -> bool:
    routed_bad = case["bad_id"] is not None and case["num_tokens"] > 0
    return routed_bad or case["x_dtype"] != case["bank_dtype"]


def _outcome(fn, x, experts, weights, bank):
    try:
        out = fn(x, experts, weights, bank.weights())
    except ValueError as exc:
        return exc
    leaves = [x, weights, *bank.parameters()]
    g = torch.autograd.grad(out.square().sum(), leaves, allow_unused=True)
    return out.detach(), [
        torch.zeros_like(t) if d is None else d for t, d in zip(leaves, g, strict=True)
    ]


@settings(max_examples=200, deadline=None, derandomize=True)
@given(fuzz_cases())
def test_grouped_equals_loop_or_both_raise_one_line(case):
    x, experts, weights, bank = _build(case)
    ref = _outcome(loop_dispatch, x, experts, weights, bank)
    got = _outcome(grouped_dispatch, x, experts, weights, bank)
    if _expected_error(case):
        for result in (ref, got):
            assert isinstance(result, ValueError), f"no error for {case}"
            assert "\n" not in str(result) and str(result).startswith("dispatch ")
        CASES["raised"] += 1
        return
    assert not isinstance(got, ValueError), f"{case}: {got}"
    tight = case["bank_dtype"] == torch.float64  # routing weights are float64 in every case
    for a, b in zip([got[0], *got[1]], [ref[0], *ref[1]], strict=True):
        # float32 sums of up to k terms in another order: an absolute error relative to the
        # tensor's scale, since one element may be a cancellation far below it.
        scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
        tol = dict(atol=1e-10 * scale, rtol=1e-8) if tight else dict(atol=1e-5 * scale, rtol=1e-4)
        torch.testing.assert_close(a, b, **tol)
    CASES["equal_to_oracle"] += 1
