"""A message-passing processor on dense graphs, with sum / mean / max / (soft-)min-plus
aggregation: the block neural algorithmic reasoners iterate.

One step of :class:`MessagePassing` on node states ``h [B, N, D]``, edge features
``e [B, N, N, F]`` and a directed mask ``adj [B, N, N]`` (``adj[b, u, v]``: edge ``u -> v``):

    m_uv  = MLP([h_u, h_v, e_uv])                       (message from u to v)   [B, N, N, D]
    a_v   = AGG_{u : adj[u, v]} m_uv                                              [B, N, D]
    h'_v  = ReLU(W [h_v, a_v] + b)                                                [B, N, D]

with self-loops added to the mask (``self_loops=True``: every node keeps its own state in the
aggregation, as Bellman–Ford keeps ``d_v`` in ``min(d_v, min_u d_u + w_uv)``). Aggregations:

- ``"sum"``, ``"mean"``: the usual GNN sums (mean over the in-neighbours);
- ``"max"``: the element-wise max over messages. This is a **hard gate**: per channel exactly
  one message (the argmax) passes and receives gradient, the others are gated to zero;
- ``"minplus"``: the tropical (min-plus) product ``a_v = min_u (m_uv + c(e_uv))``: semiring
  "addition" is ``min``, "multiplication" is ``+``, with ``c`` a learned linear map of the edge
  features added to the message (the ``w_uv`` of a relaxation). This is the aggregation of
  dynamic programming (Dudzik & Veličković, "Graph neural networks are dynamic programmers",
  arXiv 2203.15544; the NAR thesis's tropical alignment): hand-set weights make one step a
  Bellman–Ford relaxation exactly (see the tests);
- ``"softminplus"``: the smooth variant, ``a_v = -tau * logsumexp_u(-(m_uv + c(e_uv)) / tau)``,
  which tends to ``"minplus"`` as ``tau -> 0`` and passes gradient to every message.

Masking is exact: non-edges never enter an aggregation and never receive gradient; a node
with no in-neighbour (possible only with ``self_loops=False``) aggregates to 0 and its
gradient stays finite (the masked entries are replaced by ``torch.where`` before any ``inf``
could meet an arithmetic op).

Departures: the thesis's processors (PGN / MPNN from the CLRS benchmark, Veličković et al.,
arXiv 2205.15608) use gated updates and layer norm; this update is one ReLU layer, so that
the hand-set Bellman–Ford step is exact and the aggregation is the only difference between
the arms of the experiment.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

AGGREGATIONS = ("sum", "mean", "max", "minplus", "softminplus")


def _check_inputs(h: Tensor, e: Tensor, adj: Tensor) -> None:
    b, n, _ = h.shape
    if adj.shape != (b, n, n):
        raise ValueError(f"adj must be [B, N, N] = {(b, n, n)} to match h, got {tuple(adj.shape)}")
    if e.shape[:3] != (b, n, n):
        raise ValueError(f"e must be [B, N, N, F] with B, N = {b}, {n}, got {tuple(e.shape)}")


def aggregate(messages: Tensor, mask: Tensor, how: str, temperature: float = 1.0) -> Tensor:
    """Aggregate messages [B, N(src), N(dst), D] over sources where ``mask [B, N, N]``.

    Returns [B, N(dst), D]; destinations with no source aggregate to 0.
    """
    if how not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {how!r}")
    mask = mask.bool()
    has = mask.any(1)  # [B, N(dst)]
    m4 = mask.unsqueeze(-1)  # [B, N, N, 1]
    if how in ("sum", "mean"):
        total = torch.where(m4, messages, torch.zeros_like(messages)).sum(1)
        if how == "sum":
            return total
        return total / mask.sum(1).clamp(min=1).unsqueeze(-1).to(messages.dtype)
    # for max/min, rows without sources look at every entry (finite, discarded below) so that
    # no reduction ever returns +-inf
    pick = m4 | ~has[:, None, :, None]
    if how == "max":
        out = torch.where(pick, messages, messages.new_tensor(-torch.inf)).amax(1)
    elif how == "minplus":
        out = torch.where(pick, messages, messages.new_tensor(torch.inf)).amin(1)
    else:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for softminplus, got {temperature}")
        scaled = torch.where(pick, -messages / temperature, messages.new_tensor(-torch.inf))
        out = -temperature * torch.logsumexp(scaled, dim=1)
    return torch.where(has.unsqueeze(-1), out, torch.zeros_like(out))


class MessagePassing(nn.Module):
    """One message-passing step with a chosen aggregation (module docstring).

    ``dim``: node state width D; ``edge_dim``: edge feature width F; ``aggregation`` one of
    :data:`AGGREGATIONS`; ``temperature`` for ``"softminplus"``; ``self_loops`` adds ``v -> v``
    to the mask (its edge features are whatever ``e[:, v, v]`` holds: zeros by convention).
    """

    def __init__(
        self,
        dim: int,
        edge_dim: int,
        aggregation: str = "max",
        temperature: float = 0.1,
        self_loops: bool = True,
    ) -> None:
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if dim < 1 or edge_dim < 1:
            raise ValueError(f"dim and edge_dim must be >= 1, got {dim}, {edge_dim}")
        self.aggregation = aggregation
        self.temperature = temperature
        self.self_loops = self_loops
        # the message MLP's first layer on [h_u, h_v, e_uv], split by input so that the node
        # parts are computed per node [B, N, D] and only broadcast-added per edge
        self.msg_src = nn.Linear(dim, dim)
        self.msg_dst = nn.Linear(dim, dim, bias=False)
        self.msg_edge = nn.Linear(edge_dim, dim, bias=False)
        self.msg_out = nn.Linear(dim, dim)
        tropical = aggregation in ("minplus", "softminplus")
        # the tropical "multiplication" by the edge weight: m_uv + c(e_uv)
        self.edge_term = nn.Linear(edge_dim, dim, bias=False) if tropical else None
        self.update = nn.Linear(2 * dim, dim)

    def forward(self, h: Tensor, e: Tensor, adj: Tensor) -> Tensor:
        """h [B, N, D], e [B, N, N, F], adj [B, N, N] (bool or 0/1) -> h' [B, N, D]."""
        _check_inputs(h, e, adj)
        n = h.shape[1]
        mask = adj.bool()
        if self.self_loops:
            mask = mask | torch.eye(n, dtype=torch.bool, device=h.device)
        # [B, u, v, D]: W_s h_u + W_d h_v + W_e e_uv, then the MLP's second layer
        hidden = self.msg_src(h).unsqueeze(2) + self.msg_dst(h).unsqueeze(1) + self.msg_edge(e)
        m = self.msg_out(torch.relu(hidden))
        if self.edge_term is not None:
            m = m + self.edge_term(e)
        agg = aggregate(m, mask, self.aggregation, self.temperature)
        return torch.relu(self.update(torch.cat([h, agg], dim=-1)))
