"""Encode-process-decode neural algorithmic reasoner on dense graphs.

The model of Veličković et al., "Neural execution of graph algorithms" (arXiv 1910.10593) and
the CLRS benchmark (arXiv 2205.15608), with the dual heads of Numeroso, Bacciu & Veličković,
"Dual algorithmic reasoning" (ICLR 2023, arXiv 2302.04496; the NAR thesis's max-flow /
min-cut chapter):

- **encode**: node inputs ``[is_source, is_sink]`` -> ``z [B, N, D]`` by a linear map; edge
  features are ``[w_uv, 1]`` on edges and 0 elsewhere, fed to the processor as they are;
- **process**: one :class:`~gatelab.layers.graph.MessagePassing` block, weights shared over
  ``T = ceil(step_ratio * N)`` steps (steps proportional to N: Bellman–Ford needs N - 1),
  ``h <- P(h + z, e, adj)`` from ``h = 0`` (the inputs re-enter every step, as in CLRS);
- **decode**, per task in ``tasks``:
  ``"dist"``: shortest-path distance per node (linear read-out);
  ``"reach"``: reachability logit per node;
  ``"cut"``: min-cut side logit per node (1 = source side);
  ``"flow"``: the max-flow value as the source's out-flow, ``sum_v adj_sv * c_sv *
  sigmoid(g([h_s, h_v, e_sv]))``: each edge's flow is bounded by its capacity, so the value
  head is aligned with the quantity it predicts.

Training ``("flow", "cut")`` together shares the encoder and processor: the duality the
thesis argues helps (max-flow value = min-cut capacity).

Departures: no hints (only the final outputs are supervised; CLRS and DAR also supervise the
algorithm's intermediate states), the flow head predicts the value, not the per-edge flow of
one particular optimal flow (optimal flows are not unique), and DAR's processor is a PGN with
gating and layer norm (here :class:`MessagePassing`, see its departures).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.graph import AGGREGATIONS, MessagePassing

TASKS = ("dist", "reach", "flow", "cut")


@dataclass(frozen=True)
class NARConfig:
    hidden: int = 32
    aggregation: str = "max"
    tasks: tuple[str, ...] = ("dist",)
    step_ratio: float = 1.0
    temperature: float = 0.1

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        bad = [t for t in self.tasks if t not in TASKS]
        if not self.tasks or bad:
            raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {self.tasks}")
        if self.step_ratio <= 0 or self.hidden < 1:
            raise ValueError(
                f"need step_ratio > 0 and hidden >= 1, got {self.step_ratio}, {self.hidden}"
            )


def graph_inputs(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Node inputs x [B, N, 2], edge features e [B, N, N, 2], adj [B, N, N] bool."""
    adj = batch["adj"].bool()
    n = adj.shape[1]
    x = torch.stack(
        [F.one_hot(batch["source"], n).float(), F.one_hot(batch["sink"], n).float()], dim=-1
    )
    e = torch.stack([batch["weight"] * adj, adj.float()], dim=-1)
    return x, e, adj


class NARModel(nn.Module):
    """Encode-process-decode reasoner (module docstring); forward returns a dict per task."""

    def __init__(self, config: NARConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden
        self.encode = nn.Linear(2, d)
        self.processor = MessagePassing(d, 2, config.aggregation, config.temperature)
        self.heads = nn.ModuleDict(
            {t: nn.Linear(d, 1) for t in config.tasks if t in ("dist", "reach", "cut")}
        )
        if "flow" in config.tasks:
            self.flow_edge = nn.Sequential(nn.Linear(2 * d + 2, d), nn.ReLU(), nn.Linear(d, 1))

    def num_steps(self, n: int) -> int:
        return max(1, math.ceil(self.config.step_ratio * n))

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        x, e, adj = graph_inputs(batch)
        z = self.encode(x)  # [B, N, D]
        h = torch.zeros_like(z)
        for _ in range(self.num_steps(adj.shape[1])):
            h = self.processor(h + z, e, adj)
        out = {t: head(h).squeeze(-1) for t, head in self.heads.items()}  # [B, N] each
        if "flow" in self.config.tasks:
            out["flow"] = self._flow_value(h, e, adj, batch["source"])
        return out

    def _flow_value(self, h: Tensor, e: Tensor, adj: Tensor, source: Tensor) -> Tensor:
        """[B]: sum over the source's out-edges of capacity * sigmoid(edge score)."""
        b, n, d = h.shape
        rows = torch.arange(b, device=h.device)
        hs = h[rows, source].unsqueeze(1).expand(b, n, d)  # [B, N, D]
        es = e[rows, source]  # [B, N, 2]: features of the edges s -> v
        frac = torch.sigmoid(self.flow_edge(torch.cat([hs, h, es], dim=-1))).squeeze(-1)
        return (frac * es[..., 0] * adj[rows, source]).sum(-1)


def nar_loss(out: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
    """Sum over the predicted tasks: MSE of distances on reachable nodes, BCE of reachability
    and cut sides per node, MSE of the flow value per graph."""
    loss = out[next(iter(out))].new_zeros(())
    if "dist" in out:
        reach = batch["reach"]
        err = (out["dist"] - batch["dist"]) ** 2 * reach
        loss = loss + err.sum() / reach.sum().clamp(min=1)
    for t, key in (("reach", "reach"), ("cut", "cut")):
        if t in out:
            loss = loss + F.binary_cross_entropy_with_logits(out[t], batch[key])
    if "flow" in out:
        loss = loss + F.mse_loss(out["flow"], batch["flow_value"])
    return loss


def cut_capacity(side: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """[B]: capacity of the edges from ``side`` (bool [B, N], source side) to its complement,
    with the source forced in and the sink forced out (so it is a valid s-t cut)."""
    b = side.shape[0]
    rows = torch.arange(b, device=side.device)
    side = side.clone()
    side[rows, batch["source"]] = True
    side[rows, batch["sink"]] = False
    cap = batch["weight"] * batch["adj"]
    crossing = side.unsqueeze(2) & ~side.unsqueeze(1)  # [B, u, v]: u in S, v not
    return (cap * crossing).sum((1, 2))


def nar_metrics(out: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, float]:
    """dist: MAE on reachable nodes / their mean distance; reach, cut: node accuracy; flow:
    mean |error| / mean value; cut_ratio: predicted cut's capacity / max-flow (>= 1, 1 best)."""
    m: dict[str, float] = {}
    out = {k: v.detach() for k, v in out.items()}
    if "dist" in out:
        r = batch["reach"].bool()
        mae = (out["dist"] - batch["dist"]).abs()[r].mean()
        m["dist_rel_mae"] = float(mae / batch["dist"][r].mean())
    if "reach" in out:
        m["reach_acc"] = float(((out["reach"] > 0).float() == batch["reach"]).float().mean())
    if "cut" in out:
        m["cut_acc"] = float(((out["cut"] > 0).float() == batch["cut"]).float().mean())
        ratio = cut_capacity(out["cut"] > 0, batch) / batch["flow_value"]
        m["cut_ratio"] = float(ratio.mean())
    if "flow" in out:
        fv = batch["flow_value"]
        m["flow_rel_err"] = float((out["flow"] - fv).abs().mean() / fv.mean())
    return m
