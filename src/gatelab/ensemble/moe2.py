"""MoE²'s gate over whole models and the subset problem under energy and latency budgets.

"MoE²: Optimizing Collaborative Inference for Edge Large Language Models" (Jin et al.,
arXiv 2501.09410). The experts are whole models (here the members of a
:class:`~gatelab.ensemble.MemberPool`). Two levels:

- fine: a gating network g_θ(x) gives each query a weight per member; within the chosen
  subset S the top-k members by gate logit are mixed, p(y|x) = Σ_{i ∈ topk_S(x)} w_i p_i(y|x)
  with w the softmax of the top-k logits (:class:`SubsetGate`);
- coarse: S minimises the loss L(S) (the mixture's cross-entropy on validation queries)
  under an energy budget and per-category latency budgets (:func:`moe2_problem`, solved by
  :func:`~gatelab.ensemble.subsets.monotone_search`).

Optimality preservation (the paper's theorem): a gate trained once on the full set stays
optimal on any subset, so the gate is trained once (:func:`train_gate` with the full mask)
and restricted to S by masking its logits; :func:`train_gate` with a subset mask retrains
on S alone for the empirical check.

Choices where the paper (an LLM system on edge servers) leaves ours open:

- The gate reads the query itself (8x8 digits, flattened), not the members' outputs, so a
  query runs only its top-k members. Gate: Linear-GELU-Linear to M logits.
- Energy is approximated by multiply-adds (FLOPs counted from the architecture): they are
  deterministic, while CPU time on this shared machine is noisy. Latency is the measured
  CPU time. S's energy is the sum over its members (each member of S is deployed and, in
  the worst case over the routing, run), latency per category is the sum too: the members
  run one after another on this one CPU, where they were measured (``aggregate="max"``
  models one server per member, as the paper's parallel edge servers).
- Query categories: single queries (batch-1 latency of each member) and batched queries
  (per-query latency in batches of 32); members scale differently with the batch size
  (LeNet-5's convolutions vs the MLPs), as the paper's categories differ in prompt length.
- L(∅) = log C (a uniform prediction), so the empty set is comparable and L stays monotone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..train.loop import train_loop
from .pool import MemberPool
from .subsets import Subset, SubsetProblem

__all__ = [
    "MixtureLoss",
    "SubsetGate",
    "moe2_problem",
    "subset_mask",
    "train_gate",
]


def subset_mask(subset: Subset | Sequence[int], size: int) -> Tensor:
    """[M] bool, True for the members of ``subset``."""
    mask = torch.zeros(size, dtype=torch.bool)
    if len(subset):
        index = torch.tensor(sorted(subset))
        if index.min() < 0 or index.max() >= size:
            raise ValueError(f"subset {sorted(subset)}: members are 0..{size - 1}")
        mask[index] = True
    return mask


class SubsetGate(nn.Module):
    """g_θ: x [N, ...] -> member logits [N, M]; top-k mixture within a subset.

    ``in_dim`` features per query (flattened), ``num_members`` M, ``top_k`` k (at most |S|
    are used for a smaller S), ``hidden`` the gate's width.
    """

    def __init__(self, in_dim: int, num_members: int, top_k: int = 2, hidden: int = 64):
        super().__init__()
        if top_k < 1 or num_members < 1:
            raise ValueError(f"need top_k >= 1 and num_members >= 1, got {top_k}, {num_members}")
        self.top_k, self.num_members = top_k, num_members
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, num_members)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def weights(self, logits: Tensor, mask: Tensor) -> Tensor:
        """logits [N, M], mask [M] or [N, M] bool -> weights [N, M]: softmax over the top-k
        logits within the mask (fewer where the mask holds fewer), 0 elsewhere; all 0 in a
        row whose mask is empty."""
        if mask.shape[-1] != self.num_members or mask.dim() not in (1, 2):
            raise ValueError(
                f"mask must be [M] or [N, M] bool with M = {self.num_members}, got {tuple(mask.shape)}"
            )
        mask = mask.expand_as(logits)
        masked = logits.masked_fill(~mask, float("-inf"))
        top, index = masked.topk(min(self.top_k, self.num_members), dim=-1)
        # A row with no member: -inf everywhere; its weights are 0, not NaN.
        top = top.masked_fill(~mask.any(-1, keepdim=True), 0.0)
        w = torch.softmax(top, dim=-1) * mask.any(-1, keepdim=True)
        return torch.zeros_like(logits).scatter(-1, index, w)

    def mixture_log_probs(self, logits: Tensor, member_log_probs: Tensor, mask: Tensor) -> Tensor:
        """[N, M] gate logits, [M, N, C] members' log-probs, mask [M] or [N, M] -> [N, C]
        log of the mixture (uniform in a row whose mask is empty)."""
        w = self.weights(logits, mask)  # [N, M]
        log_w = torch.log(w.clamp_min(1e-30)).masked_fill(w == 0, float("-inf"))
        mixed = torch.logsumexp(log_w.T[:, :, None] + member_log_probs, dim=0)  # [N, C]
        empty = ~mask.expand_as(logits).any(-1, keepdim=True)
        return mixed.masked_fill(empty, -math.log(member_log_probs.shape[-1]))


def train_gate(
    gate: SubsetGate,
    x: Tensor,
    member_log_probs: Tensor,
    y: Tensor,
    mask: Tensor | None = None,
    *,
    steps: int = 300,
    lr: float = 1e-2,
    weight_decay: float = 1e-3,
    subset_dropout: float = 0.0,
    seed: int = 0,
) -> list[float]:
    """Fit θ to the cross-entropy of the top-k mixture within ``mask`` (None: the full set),
    full batch, AdamW with a cosine decay; returns the loss per step. The gate is left in
    eval mode. ``member_log_probs`` [M, N, C] are the members' (fixed) outputs on ``x``.

    ``subset_dropout`` (ours, not the paper's; 0 by default): the fraction of the rows that
    each step sees a random subset of ``mask`` instead (each member kept with probability
    1/2, at least one; drawn from ``seed``), so that the gate also learns how to rank the
    members it would not pick from the full set. Still one gate, trained once."""
    if not 0.0 <= subset_dropout <= 1.0:
        raise ValueError(f"subset_dropout must lie in [0, 1], got {subset_dropout}")
    if member_log_probs.shape[:2] != (gate.num_members, len(y)) or len(x) != len(y):
        raise ValueError(
            f"member_log_probs must be [M={gate.num_members}, N={len(y)}, C] for x, y of N rows; "
            f"got {tuple(member_log_probs.shape)}, x {len(x)}, y {len(y)}"
        )
    mask = torch.ones(gate.num_members, dtype=torch.bool) if mask is None else mask
    if not mask.any():
        raise ValueError("mask selects no member: a gate over the empty set has nothing to learn")
    opt = torch.optim.AdamW(gate.parameters(), lr=lr, weight_decay=weight_decay)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    masks = (_dropped_masks(mask, len(y), subset_dropout, gen) for _ in range(steps))  # [N, M]

    def loss_fn(gate: SubsetGate, rows: Tensor) -> Tensor:
        return F.nll_loss(gate.mixture_log_probs(gate(x), member_log_probs, rows), y)

    history = train_loop(gate, loss_fn, masks, opt, steps=steps, schedule=decay)
    gate.eval()
    return history


def _dropped_masks(mask: Tensor, rows: int, fraction: float, gen: torch.Generator) -> Tensor:
    """[rows, M]: ``mask`` in every row, but a random non-empty half of it (each member
    kept with probability 1/2) in about ``fraction`` of the rows."""
    full = mask.expand(rows, -1)
    if fraction == 0.0:
        return full
    keep = (torch.rand(rows, mask.shape[0], generator=gen) < 0.5) & full
    empty = ~keep.any(-1)  # redraw as one random member of the mask
    choice = torch.multinomial(mask.float().expand(rows, -1), 1, generator=gen)
    keep[empty] = F.one_hot(choice[empty, 0], mask.shape[0]).bool()
    dropped = torch.rand(rows, generator=gen) < fraction
    return torch.where(dropped[:, None], keep, full)


class MixtureLoss:
    """L(S): the cross-entropy (and accuracy) of a gate's top-k mixture within S on fixed
    queries; the gate's logits and the members' log-probs are computed once."""

    def __init__(self, gate: SubsetGate, x: Tensor, member_log_probs: Tensor, y: Tensor):
        with torch.no_grad():
            self.logits = gate(x)
        self.gate, self.member_log_probs, self.y = gate, member_log_probs, y

    @torch.no_grad()
    def log_probs(self, subset: Subset) -> Tensor:
        mask = subset_mask(subset, self.gate.num_members)
        return self.gate.mixture_log_probs(self.logits, self.member_log_probs, mask)

    def __call__(self, subset: Subset) -> float:
        return float(F.nll_loss(self.log_probs(subset), self.y))

    def accuracy(self, subset: Subset) -> float:
        return float((self.log_probs(subset).argmax(-1) == self.y).float().mean())


RESOURCES = ("energy_flops", "latency_single_s", "latency_batched_s")


def moe2_problem(
    pool: MemberPool,
    loss: MixtureLoss,
    energy: float,
    latency_single: float,
    latency_batched: float,
    aggregate: str = "sum",
) -> SubsetProblem:
    """The coarse problem: min L(S) with Σ FLOPs <= ``energy`` and, per query category,
    latency (``aggregate`` "sum" or "max" of the members') <= its budget in seconds."""
    costs = pool.costs()
    rows = torch.stack([costs["flops"], costs["latency_s"], costs["batch_latency_s"]])
    budgets = torch.tensor([energy, latency_single, latency_batched], dtype=torch.float64)
    return SubsetProblem(
        loss, rows, budgets, aggregate=["sum", aggregate, aggregate], resources=RESOURCES
    )
