"""Shared fixtures, builders and hypothesis strategies for the gatelab tests."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import pytest
import torch
from hypothesis import strategies as st

from gatelab import ExpertBank, Routing
from gatelab.experts import ACTIVATION_NAMES
from gatelab.routing import EMPTY


def _triton_interprets_without_a_gpu() -> None:
    """Without a GPU, run triton kernels in its interpreter for the whole session, and import
    triton now in that mode: triton reads TRITON_INTERPRET when it is imported, and other
    tests (transformers, torch.compile) import it too; in compiled mode on a CPU-only machine
    test_triton_dispatch.py would have to skip."""
    if torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        return
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton  # noqa: F401


_triton_interprets_without_a_gpu()


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _idle_machine(monkeypatch):
    """The CPU strategy rule reads the machine's load (``cpu_threads.machine_busy``), and
    phase-wise and split can differ in the last bit (docs/benchmarks.md): a test that
    compares two runs of a model exactly would fail whenever another process (a build,
    a subprocess of an earlier test) flips the reading between them. Tests see an idle
    machine; test_cpu_strategies.py tests the reading and the busy choice explicitly."""
    from gatelab.dispatch import cpu_threads

    monkeypatch.setattr(cpu_threads, "machine_busy", lambda threads=None: False)


# -- Routing builders -------------------------------------------------------------------


def make_routing(
    experts,
    weights=None,
    logits=None,
    num_experts: int | None = None,
    scores=None,
    aux=None,
) -> Routing:
    """A Routing from plain lists: scores default to softmax(logits), logits to zeros."""
    experts = torch.as_tensor(experts, dtype=torch.int64)
    if experts.dim() == 1:
        experts = experts.reshape(-1, 1)
    if weights is None:
        weights = (experts != EMPTY).float()
    weights = torch.as_tensor(weights, dtype=torch.float32).reshape(experts.shape)
    if logits is None:
        if scores is not None:
            num_experts = torch.as_tensor(scores).shape[1]
        elif num_experts is None:
            num_experts = int(experts.max()) + 1 if experts.numel() else 1
        logits = torch.zeros(experts.shape[0], num_experts)
    logits = torch.as_tensor(logits, dtype=torch.float32)
    scores = logits.softmax(-1) if scores is None else torch.as_tensor(scores, dtype=torch.float32)
    return Routing(logits, scores, experts, weights, dict(aux or {}))


def identity_router(router: torch.nn.Module) -> torch.nn.Module:
    """Set a router's [E, D] weight (D = E) to the identity, so its logits equal its input."""
    with torch.no_grad():
        router.weight.copy_(torch.eye(router.num_experts, router.dim))
    return router


# -- Dispatch cases ---------------------------------------------------------------------

PATTERNS = ("random", "one_expert", "all_empty", "full")


@dataclasses.dataclass(frozen=True)
class DispatchCase:
    """One dispatcher input: sizes, expert kind, slot pattern and the seed of the values."""

    num_tokens: int
    dim: int
    hidden_dim: int
    num_experts: int
    top_k: int
    glu: bool = True
    bias: bool = False
    act: str = "silu"
    pattern: str = "random"
    empty_rate: float = 0.0
    deterministic: bool = True
    seed: int = 0

    def build(self, dtype=torch.float64):
        """(x, experts, weights, bank): x, weights and every bank tensor are leaves with grad."""
        gen = torch.Generator().manual_seed(self.seed)
        t, e, k = self.num_tokens, self.num_experts, self.top_k
        x = torch.randn(t, self.dim, generator=gen, dtype=torch.float64)
        # Distinct experts per token: the first k of a random permutation.
        experts = torch.argsort(torch.rand(t, e, generator=gen), dim=1)[:, :k]
        if self.pattern == "one_expert" and t:
            # Every token's first slot goes to one expert; the other slots avoid it.
            target = int(torch.randint(e, (1,), generator=gen))
            others = torch.tensor([i for i in range(e) if i != target], dtype=torch.int64)
            perm = torch.argsort(torch.rand(t, e - 1, generator=gen), dim=1)
            experts = torch.cat([torch.full((t, 1), target), others[perm][:, : k - 1]], dim=1)
        elif self.pattern == "full":
            experts = torch.argsort(torch.rand(t, e, generator=gen), dim=1)
        if self.pattern == "all_empty":
            experts = torch.full_like(experts, EMPTY)
        elif self.empty_rate:
            empty = torch.rand(experts.shape, generator=gen) < self.empty_rate
            experts = experts.masked_fill(empty, EMPTY)
        weights = torch.rand(experts.shape, generator=gen, dtype=torch.float64) + 0.1
        weights = weights.masked_fill(experts == EMPTY, 0.0)

        bank = ExpertBank(
            e, self.dim, self.hidden_dim, act=self.act, glu=self.glu, bias=self.bias
        ).to(dtype)
        with torch.no_grad():
            for p in bank.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
        x = x.to(dtype).requires_grad_()
        weights = weights.to(dtype).requires_grad_()
        return x, experts, weights, bank.weights()


@st.composite
def dispatch_cases(draw, max_tokens: int = 40) -> DispatchCase:
    """Random dispatcher inputs, edge cases included (0 tokens, E = 1, k = E, ...)."""
    num_experts = draw(st.integers(1, 10))
    pattern = draw(st.sampled_from(PATTERNS))
    top_k = num_experts if pattern == "full" else draw(st.integers(1, num_experts))
    width = st.integers(1, 12)
    return DispatchCase(
        num_tokens=draw(st.sampled_from([0, 1, 2, 40]) | st.integers(0, max_tokens)),
        dim=draw(width),
        hidden_dim=draw(width),
        num_experts=num_experts,
        top_k=top_k,
        glu=draw(st.booleans()),
        bias=draw(st.booleans()),
        act=draw(st.sampled_from(ACTIVATION_NAMES)),
        pattern=pattern,
        empty_rate=draw(st.sampled_from([0.0, 0.0, 0.3, 0.7])),
        deterministic=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


EDGE_CASES = {
    "zero_tokens": DispatchCase(0, 4, 8, 3, 2),
    "one_token": DispatchCase(1, 4, 8, 3, 2),
    "experts_without_tokens": DispatchCase(2, 4, 8, 8, 1),
    "k_equals_e": DispatchCase(9, 4, 8, 4, 4, pattern="full"),
    "single_expert": DispatchCase(7, 4, 8, 1, 1),
    "all_to_one_expert": DispatchCase(12, 4, 8, 5, 1, pattern="one_expert", bias=True),
    "all_to_one_expert_k2": DispatchCase(12, 4, 8, 5, 2, pattern="one_expert", glu=False),
    "all_slots_empty": DispatchCase(6, 4, 8, 3, 2, pattern="all_empty", bias=True),
    "some_slots_empty": DispatchCase(20, 4, 8, 6, 3, empty_rate=0.5, bias=True),
    "nondeterministic": DispatchCase(20, 4, 8, 6, 3, empty_rate=0.3, deterministic=False),
}


# -- Gradients --------------------------------------------------------------------------


def grads_of(out: torch.Tensor, inputs, seed: int = 1) -> list[torch.Tensor]:
    """d(sum(out * g))/d(inputs) for a fixed random g; zeros where an input is unused."""
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    if out.requires_grad:
        found = torch.autograd.grad(out, inputs, g, allow_unused=True)
    else:
        found = [None] * len(inputs)
    return [torch.zeros_like(i) if d is None else d for i, d in zip(inputs, found, strict=True)]


def bank_tensors(bank) -> list[torch.Tensor]:
    """The tensors of an ExpertWeights that carry gradients (w_in, w_out, biases)."""
    return [t for t in (bank.w_in, bank.w_out, bank.b_in, bank.b_out) if t is not None]
