"""Union of Experts routers: every slice on, per-token top-k slices, patch-wise data selection.

"Union of Experts: Adapting Hierarchical Routing to Equivalently Decomposed Transformer"
(Yang et al., arXiv 2503.02495). UoE cuts one dense MLP into E experts by hidden units
(see :func:`gatelab.layers.uoe.decompose_mlp`): the *sum* of all experts is the MLP. The
routers here decide which slices of that union a token runs:

- :class:`AllExpertsRouter`: every expert, weight exactly 1: the union
  equals the dense MLP.
- :class:`UoERouter` ("uoe"): each token's top-k slices by softmax(W x), combined with
  forward weight exactly 1 (a straight-through score carries the router's gradient), so at
  k = E the layer is the dense MLP again.
- :class:`PatchSelectionRouter` ("uoe_patch"): the paper's patch-wise data selection, an
  expert-choice rule: each expert takes the tokens (patches) it scores highest.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .routers import ROUTERS, ExpertChoiceRouter, Router, _check_sizes, top_k
from .routing import EMPTY, Routing


def unit_weights(scores: Tensor) -> Tensor:
    """1 in the forward pass, d/d(scores) = 1 in the backward pass (straight-through).

    UoE's experts are slices of one MLP, so the union of the selected slices is the MLP
    with the other hidden units switched off; a weight of exactly 1 keeps that reading.
    The score term (zero in value) lets the router learn which slices to keep.
    """
    # (scores - scores.detach()) is exactly 0; (1 + s) - s would round away from 1.
    return 1.0 + (scores - scores.detach())


class AllExpertsRouter(Router):
    """Every token to every expert with weight 1: the exact union of a decomposed MLP.

    ``top_k`` must equal ``num_experts`` (None means so). No learned weight; ``logits``
    are zeros and ``scores`` uniform, so balance losses read a perfectly balanced layer.
    Not in ``ROUTERS``: it takes no free ``top_k``, which a registered router must;
    :func:`gatelab.layers.uoe.decompose_to_moe` passes an instance.
    """

    def __init__(
        self, dim: int, num_experts: int, top_k: int | None = None, nan_policy: str = "raise"
    ):
        top_k = num_experts if top_k is None else top_k
        _check_sizes(dim, num_experts, top_k)
        if top_k != num_experts:
            raise ValueError(
                f"AllExpertsRouter routes every token to all experts: top_k must equal "
                f"num_experts={num_experts} (or be None), got {top_k}"
            )
        super().__init__(dim, num_experts, top_k, nan_policy, learned=False)

    def forward(self, x: Tensor, token_ids=None, positions=None) -> Routing:
        return self.route(self.compute_logits(x), dtype=x.dtype)

    def compute_logits(self, x: Tensor) -> Tensor:
        """Zeros [T, E]: every expert is taken alike. The input is still checked for NaN/inf
        under nan_policy "raise", as every learned router checks its logits."""
        self._check_finite(x, "got a NaN or inf input")
        return torch.zeros(x.shape[0], self.num_experts, device=x.device)

    def route(self, logits: Tensor, dtype: torch.dtype | None = None) -> Routing:
        """Every expert, weight 1 in ``dtype`` (the input's; the logits' when not given)."""
        (t, e), device = logits.shape, logits.device
        experts = torch.arange(e, device=device).expand(t, e).contiguous()
        weights = torch.ones(t, e, device=device, dtype=logits.dtype if dtype is None else dtype)
        return Routing(logits, logits.softmax(-1), experts, weights)


@ROUTERS.register("uoe")
class UoERouter(Router):
    """Per-token top-k of the decomposed experts, each selected slice with weight 1.

    Scores are softmax(W x) over the E slices (the paper's SwitchGate); a token runs its
    k best slices. Departures from the paper, both unconfirmed in our notes: (1) the
    paper's *expert selection* chooses experts per sequence from the flattened sequence;
    here each token chooses, because gatelab's MoE routes tokens and a per-sequence rule
    over a flattened sequence fixes the sequence length. (2) The combine weight is exactly
    1 in value (:func:`unit_weights`) rather than the gate probability, so that at
    k = E the layer equals the dense MLP it was decomposed from.
    """

    def route(self, logits: Tensor) -> Routing:
        scores = logits.softmax(dim=-1)
        top, experts = top_k(scores, self.top_k)
        return Routing(logits, scores, experts, unit_weights(top))


@ROUTERS.register("uoe_patch")
class PatchSelectionRouter(ExpertChoiceRouter):
    """Patch-wise data selection: experts pick the tokens (patches) they score highest.

    Our reading of the reference ``SwitchGate`` / ``topk_indices`` ([notes], not run):

    1. s = softmax(W x) per token; keep each token's top-k scores, zero the rest (m).
    2. Normalise each expert's column over the tokens and scale by its capacity
       C = ceil(capacity_factor * T * k / E): w[t, e] = C * m[t, e] / sum_t m[t, e].
    3. Expert e takes the (at most C) tokens with the largest non-zero w[:, e].

    A token is thus taken by at most k experts, so the slots stay [T, k]; a slot an expert
    did not take is ``EMPTY``. The combine weight is w (mean about 1 over a full expert,
    the scale of the union's unit weights). Departure: the paper writes the capacity as
    capacity_factor * batch; we use gatelab's slot capacity so ``capacity_factor = 1``
    means as many slots as per-token top-k would fill. The choice spans all tokens of the
    call, so in a causal LM it reads future tokens of the batch (as expert choice does).
    Arguments and capacity are expert choice's (:class:`ExpertChoiceRouter`); only the
    selection differs.
    """

    def route(self, logits: Tensor) -> Routing:
        scores = logits.softmax(dim=-1)
        t, k = scores.shape[0], self.top_k
        top, idx = scores.topk(k, dim=-1)
        # A token with NaN logits (nan_policy="ignore") must not poison every column sum:
        # it scores 0 everywhere and no expert takes it.
        masked = torch.zeros_like(scores).scatter(1, idx, top).nan_to_num(0.0, 0.0, 0.0)
        cap = self.capacity(t)
        col = masked / masked.sum(0, keepdim=True).clamp_min(1e-20) * cap
        # Expert side: the cap best tokens of each column that have a non-zero score.
        taken = torch.zeros_like(scores, dtype=torch.bool)
        if cap > 0:
            best_val, best_tok = col.topk(cap, dim=0)
            taken.scatter_(0, best_tok, best_val > 0)
        # Token side: at most k taken experts per token, best score first.
        rank = torch.where(taken, masked, torch.full_like(masked, -1.0))
        order_val, experts = rank.topk(k, dim=-1)
        keep = order_val >= 0
        weights = torch.where(keep, col.gather(1, experts), torch.zeros_like(order_val))
        experts = torch.where(keep, experts, torch.full_like(experts, EMPTY))
        dropped = (~keep).sum()
        return Routing(logits, scores, experts, weights, {"dropped": dropped})


__all__ = ["AllExpertsRouter", "PatchSelectionRouter", "UoERouter", "unit_weights"]
