"""N-Way Self-Evaluating Deliberation (NSED) over a pool of classifiers.

Paper: "Mixture-of-Models: Unifying Heterogeneous Agents via N-Way Self-Evaluating
Deliberation" (NSED, January 2026). LLM agents propose answers, review each other's
answers (trustless N-to-N peer review), aggregate by a Quadratic Voting "activation", and
the consensus loops back through a "semantic forget gate" for a few rounds: a macro-scale
RNN whose state is the consensus. The abstract gives no equations; this module is
gatelab's small-scale analogue for members that output class distributions, with every
reading stated (M members, N queries, C classes; p_i is member i's own distribution,
q_i its proposal, s the consensus state):

1. **Propose** (:func:`propose`). Round 1: q_i = p_i. Later rounds, the consensus is a
   prior mixed into the member's own likelihood, log-linearly (a tempered Bayes update):
   q_i ∝ p_i^(1-β) · s^β, ``prior_weight`` β (default 0.5). A classifier cannot read a
   transcript, so the consensus reaches it here instead of through its input; its forward
   pass runs once per query and every round reuses it (the paper's "iterative refinement
   without proportional VRAM scaling", in the extreme).
2. **Peer review** (:func:`peer_review`). Reviewer j scores proposal i by its own expected
   log-likelihood of it, score[j, i] = Σ_c q_i(c) log p_j(c) = -H(q_i, p_j) (a cross
   entropy; the likelihood stands in for a textual critique). The reviewer judges with its
   *own* distribution p_j, not its consensus-mixed proposal, so the consensus cannot bias
   the review; no member reviews itself (score -inf on the diagonal: no vote).
3. **Quadratic voting** (:func:`quadratic_votes`, :func:`aggregate`). Each reviewer holds
   ``credits`` B; v votes cost v² credits. A reviewer with utility u_i > 0 for proposal i
   that maximises Σ_i u_i v_i under Σ_i v_i² ≤ B votes v_i = √B · u_i / ‖u‖₂ (Lagrange;
   the budget binds), i.e. it spends credits c_i = B u_i² / ‖u‖² and casts √c_i votes. The
   utility is u_i = exp(score[j, i] / τ) (``temperature`` τ, default 1: the geometric-mean
   likelihood of the proposal under the reviewer). A proposal's weight is the votes it
   received; the aggregate is the weight-averaged proposal (a linear opinion pool).
   If nobody voted for anything (all utilities 0), the plain mean of the proposals.
4. **Recurrent consensus** (:func:`deliberate`). s¹ = a¹; s^r = f·s^(r-1) + (1-f)·a^r for
   r = 2..R, ``forget`` f ∈ [0, 1] (f = 1 keeps round 1's answer; f = 0 forgets the old
   state). :meth:`NSED.fit` learns (f, β) on validation data by a grid search on the
   negative log-likelihood of the final consensus: a scalar gate, not the paper's
   (unstated) "semantic" gate, which in an LLM would read the texts.

Degenerate cases (proved in the docstrings of the tests and checked there): with one-hot
members and proposals, QV's answer is the plurality of the members' answers whenever the
largest class holds at least two members; with equal utilities every proposal gets the same
weight and the aggregate is the mean proposal, whose argmax on one-hot proposals is
plurality.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

# Consensus probabilities are clamped to this before their log enters a proposal, so a
# class the consensus ruled out stays recoverable by a confident member.
MIN_PROB = 1e-12


def _check_log_probs(log_probs: Tensor, name: str = "log_probs") -> None:
    if log_probs.dim() != 3:
        raise ValueError(
            f"{name} must be [members, queries, classes], got {tuple(log_probs.shape)}"
        )
    if log_probs.shape[0] < 2:
        raise ValueError(
            f"{name} needs at least 2 members to review each other, got {log_probs.shape[0]}"
        )


def propose(log_probs: Tensor, consensus: Tensor | None, prior_weight: float) -> Tensor:
    """Proposals log q [M, N, C]: the members' log p [M, N, C] alone (``consensus`` None),
    or log-linearly mixed with the consensus [N, C]: q ∝ p^(1-β) s^β, β = ``prior_weight``."""
    if not 0.0 <= prior_weight <= 1.0:
        raise ValueError(f"prior_weight must be in [0, 1], got {prior_weight}")
    if consensus is None or prior_weight == 0.0:
        return log_probs
    log_s = consensus.clamp_min(MIN_PROB).log()  # [N, C]
    return torch.log_softmax((1.0 - prior_weight) * log_probs + prior_weight * log_s, dim=-1)


def peer_review(proposals: Tensor, reviewers: Tensor) -> Tensor:
    """Scores [M (reviewer j), M (proposal i), N]: Σ_c q_i(c) log p_j(c), from log q
    ``proposals`` [M, N, C] and the reviewers' own log p ``reviewers`` [M, N, C]; the
    diagonal (self-review) is -inf. Terms with q_i(c) = 0 count 0 even where log p_j = -inf."""
    q = proposals.exp()  # [M, N, C]
    # [j, i, n, c]: q_i(c) * log p_j(c), 0 where q_i(c) = 0 (0 * -inf is taken as 0)
    terms = q.unsqueeze(0) * reviewers.unsqueeze(1)
    terms = torch.where(q.unsqueeze(0) > 0, terms, torch.zeros((), dtype=terms.dtype))
    scores = terms.sum(-1)  # [M, M, N]
    eye = torch.eye(scores.shape[0], dtype=torch.bool).unsqueeze(-1)
    return scores.masked_fill(eye, -math.inf)


def quadratic_votes(scores: Tensor, credits: float = 1.0, temperature: float = 1.0) -> Tensor:
    """Votes [M (reviewer), M (proposal), N] from review ``scores`` (same shape): each
    reviewer's utilities u = exp(score / τ) give votes √B u / ‖u‖₂, so its credits Σ v²
    are exactly B = ``credits`` (0 when every utility is 0: the reviewer abstains)."""
    if not (math.isfinite(credits) and credits >= 0):
        raise ValueError(f"credits must be a finite number >= 0, got {credits}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    scaled = scores / temperature
    # Subtract each reviewer's best score (u is scale-free) so exp does not underflow; a
    # reviewer with no finite score keeps all-zero utilities.
    top = scaled.amax(dim=1, keepdim=True)  # [M, 1, N]
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    utility = (scaled - top).exp()  # [M, M, N], in [0, 1]
    norm = utility.norm(dim=1, keepdim=True)  # [M, 1, N]
    return math.sqrt(credits) * utility / norm.clamp_min(torch.finfo(utility.dtype).tiny)


def aggregate(proposals: Tensor, votes: Tensor) -> tuple[Tensor, Tensor]:
    """Consensus [N, C] and weights [M, N] from log q ``proposals`` [M, N, C] and ``votes``
    [M, M, N]: weight_i = the votes proposal i received; the consensus is the
    weight-averaged proposal (the plain mean where no votes were cast)."""
    weights = votes.sum(dim=0)  # [M, N]: column i sums over reviewers j
    total = weights.sum(dim=0, keepdim=True)  # [1, N]
    none = total == 0
    weights_used = torch.where(none, torch.ones_like(weights), weights)
    norm = weights_used / weights_used.sum(dim=0, keepdim=True)  # [M, N]
    consensus = (norm.unsqueeze(-1) * proposals.exp()).sum(dim=0)  # [N, C]
    return consensus, weights


@dataclass(frozen=True)
class NSEDConfig:
    """The protocol's settings (see the module docstring for each)."""

    rounds: int = 3
    forget: float = 0.5
    prior_weight: float = 0.5
    credits: float = 1.0
    temperature: float = 1.0

    def __post_init__(self):
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if not 0.0 <= self.forget <= 1.0:
            raise ValueError(f"forget must be in [0, 1], got {self.forget}")
        if not 0.0 <= self.prior_weight <= 1.0:
            raise ValueError(f"prior_weight must be in [0, 1], got {self.prior_weight}")


@dataclass
class Deliberation:
    """The trace of one deliberation: ``states`` [R, N, C] (the consensus after each round),
    ``aggregates`` [R, N, C] (each round's QV output before the forget gate) and
    ``weights`` [R, M, N] (the votes each proposal received)."""

    states: Tensor
    aggregates: Tensor
    weights: Tensor

    @property
    def final(self) -> Tensor:
        return self.states[-1]


def deliberate(log_probs: Tensor, config: NSEDConfig = NSEDConfig()) -> Deliberation:
    """Run R rounds of propose -> review -> vote -> forget-gated update on the members'
    log-probabilities ``log_probs`` [M, N, C] (the council's, computed once)."""
    _check_log_probs(log_probs)
    states, aggregates, weights = [], [], []
    state = None
    for _ in range(config.rounds):
        proposals = propose(log_probs, state, config.prior_weight)
        scores = peer_review(proposals, log_probs)
        votes = quadratic_votes(scores, config.credits, config.temperature)
        agg, w = aggregate(proposals, votes)
        state = agg if state is None else config.forget * state + (1.0 - config.forget) * agg
        states.append(state)
        aggregates.append(agg)
        weights.append(w)
    return Deliberation(torch.stack(states), torch.stack(aggregates), torch.stack(weights))


def plurality(log_probs: Tensor) -> Tensor:
    """Majority (plurality) vote [N] of the members' argmaxes [M, N]; ties go to the
    smallest class index."""
    _check_log_probs(log_probs)
    answers = log_probs.argmax(-1)  # [M, N]
    counts = torch.nn.functional.one_hot(answers, log_probs.shape[-1]).sum(0)  # [N, C]
    return counts.argmax(-1)


@dataclass
class NSED:
    """The deliberating ensemble: a council of a member pool and the protocol's settings.

    ``pool``: anything with ``log_probs(x) -> [M, N, C]`` (gatelab's ``MemberPool``);
    ``council``: the member indices taking part (the broker's ``Roles.council``).
    """

    pool: object
    council: Sequence[int]
    config: NSEDConfig = field(default_factory=NSEDConfig)

    def __post_init__(self):
        if len(self.council) < 2:
            raise ValueError(
                f"council needs at least 2 members to deliberate, got {list(self.council)}; "
                "raise the broker's budget"
            )

    def member_log_probs(self, x: Tensor) -> Tensor:
        """The council's log p [M_council, N, C] on ``x``."""
        return self.pool.log_probs(x)[list(self.council)]

    def __call__(self, x: Tensor) -> Deliberation:
        return deliberate(self.member_log_probs(x), self.config)

    def fit(
        self,
        x_val: Tensor,
        y_val: Tensor,
        forgets: Sequence[float] = tuple(i / 10 for i in range(11)),
        prior_weights: Sequence[float] = (0.0, 0.25, 0.5, 0.75),
    ) -> dict[str, float]:
        """Learn the forget gate f and the prior weight β on validation data: the pair of
        the grids with the lowest NLL of the final consensus; sets ``config`` and returns
        the choice with its validation NLL."""
        log_probs = self.member_log_probs(x_val)
        best = None
        for f in forgets:
            for beta in prior_weights:
                config = NSEDConfig(
                    self.config.rounds, f, beta, self.config.credits, self.config.temperature
                )
                nll = consensus_nll(deliberate(log_probs, config).final, y_val)
                if best is None or nll < best[0]:
                    best = (nll, config)
        self.config = best[1]
        return {"forget": best[1].forget, "prior_weight": best[1].prior_weight, "val_nll": best[0]}


def consensus_nll(consensus: Tensor, targets: Tensor) -> float:
    """Mean negative log-likelihood of ``targets`` [N] under ``consensus`` [N, C]."""
    picked = consensus.gather(1, targets.unsqueeze(1)).squeeze(1)
    return float(-picked.clamp_min(MIN_PROB).log().mean())
