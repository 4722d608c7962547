"""Weighted directed graphs with exact algorithmic ground truth, for neural algorithmic reasoning.

Each graph is dense: ``adj [N, N]`` bool with ``adj[u, v]`` the directed edge ``u -> v`` (no
self-loops), ``weight [N, N]`` float, positive on edges and 0 elsewhere (the length for
shortest paths, the capacity for max-flow), a ``source`` and a ``sink`` node.

Generators (seeded with a ``numpy.random.Generator``):

- :func:`er_graph`: directed Erdős–Rényi with edge probability ``degree / (N - 1)`` (so the
  expected out-degree stays ``degree`` as ``N`` grows: larger test graphs are longer, not
  denser), plus a random simple path ``source -> ... -> sink`` through ``path_len`` nodes,
  (``n // 8`` by default), so the sink is always reachable and the max-flow is positive;
- :func:`grid_graph`: a ``rows x cols`` 4-neighbour lattice, each direction of each lattice
  edge kept with probability ``keep`` (so some nodes are unreachable), source at a corner and
  sink at the opposite one, plus a guaranteed monotone corner-to-corner path.

Exact algorithms (numpy, written here; the tests check them against Floyd–Warshall, a
plain BFS-free closure, and cut enumeration):

- :func:`bellman_ford`: single-source distances (``inf`` where unreachable) and the
  predecessor on a shortest path (``source`` for the source, ``-1`` where unreachable);
- :func:`bfs_reach`: reachability from the source;
- :func:`edmonds_karp`: the max-flow value, an optimal flow and the min-cut assignment
  (1 for the source side: the nodes reachable from the source in the final residual graph).

:func:`algorithm_batch` stacks ``B`` graphs of one size into the dense per-node / per-edge
targets a model trains on.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

FAMILIES = ("er", "grid")


@dataclass(frozen=True)
class AlgoGraph:
    """One directed graph: adj [N, N] bool, weight [N, N] float (0 off edges), source, sink."""

    adj: np.ndarray
    weight: np.ndarray
    source: int
    sink: int

    @property
    def num_nodes(self) -> int:
        return self.adj.shape[0]


def _weights(adj: np.ndarray, rng: np.random.Generator, low: float, high: float) -> np.ndarray:
    if not 0 < low <= high:
        raise ValueError(f"need 0 < low <= high for positive edge weights, got {low}, {high}")
    return np.where(adj, rng.uniform(low, high, adj.shape), 0.0)


def er_graph(
    n: int,
    rng: np.random.Generator,
    degree: float = 1.2,
    path_len: int | None = None,
    low: float = 0.1,
    high: float = 1.0,
) -> AlgoGraph:
    """Directed Erdős–Rényi graph with a guaranteed source -> sink path (module docstring)."""
    if n < 2:
        raise ValueError(f"n must be >= 2 (a source and a sink), got {n}")
    if degree < 0:
        raise ValueError(f"degree must be >= 0, got {degree}")
    adj = rng.random((n, n)) < min(1.0, degree / (n - 1))
    order = rng.permutation(n)
    source, sink = int(order[0]), int(order[1])
    k = max(0, min(n - 2, path_len if path_len is not None else n // 8))
    path = [source, *order[2 : 2 + k].tolist(), sink]
    for u, v in zip(path[:-1], path[1:], strict=True):
        adj[u, v] = True
    np.fill_diagonal(adj, False)
    return AlgoGraph(adj, _weights(adj, rng, low, high), source, sink)


def grid_graph(
    rows: int,
    cols: int,
    rng: np.random.Generator,
    keep: float = 0.5,
    low: float = 0.1,
    high: float = 1.0,
) -> AlgoGraph:
    """Directed lattice, each direction kept with probability ``keep``, corner to corner."""
    if rows < 1 or cols < 1 or rows * cols < 2:
        raise ValueError(f"need rows, cols >= 1 and rows * cols >= 2, got {rows}, {cols}")
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must be a probability in [0, 1], got {keep}")
    n = rows * cols
    adj = np.zeros((n, n), dtype=bool)
    idx = np.arange(n).reshape(rows, cols)
    pairs = [(idx[:, :-1], idx[:, 1:]), (idx[:-1, :], idx[1:, :])]
    for a, b in pairs:
        a, b = a.ravel(), b.ravel()
        adj[a, b] = rng.random(len(a)) < keep
        adj[b, a] = rng.random(len(a)) < keep
    # a monotone staircase from (0, 0) to (rows-1, cols-1): a random order of down/right moves
    moves = rng.permutation([0] * (rows - 1) + [1] * (cols - 1))
    r = c = 0
    for m in moves:
        r2, c2 = (r + 1, c) if m == 0 else (r, c + 1)
        adj[idx[r, c], idx[r2, c2]] = True
        r, c = r2, c2
    return AlgoGraph(adj, _weights(adj, rng, low, high), 0, n - 1)


def bellman_ford(adj: np.ndarray, weight: np.ndarray, source: int) -> tuple[np.ndarray, np.ndarray]:
    """Distances [N] (inf where unreachable) and predecessors [N] (-1 where unreachable).

    N - 1 synchronous relaxations ``d_v <- min(d_v, min_u d_u + w_uv)`` (weights must be
    non-negative here, so no negative cycles); the predecessor is the argmin ``u`` of the
    last improving relaxation, the source's is itself.
    """
    n = adj.shape[0]
    if np.any(weight[adj] < 0):
        raise ValueError("weight must be non-negative on edges (no negative cycles)")
    w = np.where(adj, weight, np.inf)
    dist = np.full(n, np.inf)
    dist[source] = 0.0
    pred = np.full(n, -1)
    pred[source] = source
    for _ in range(n - 1):
        cand = dist[:, None] + w  # [u, v]: d_u + w_uv
        best = cand.min(0)
        better = best < dist
        if not better.any():
            break
        pred[better] = cand.argmin(0)[better]
        dist = np.minimum(dist, best)
    return dist, pred


def bfs_reach(adj: np.ndarray, source: int) -> np.ndarray:
    """[N] bool: nodes reachable from ``source`` along directed edges (itself included)."""
    seen = np.zeros(adj.shape[0], dtype=bool)
    seen[source] = True
    queue = deque([source])
    while queue:
        u = queue.popleft()
        for v in np.flatnonzero(adj[u] & ~seen):
            seen[v] = True
            queue.append(v)
    return seen


def _augmenting_path(residual: np.ndarray, s: int, t: int) -> list[int] | None:
    """Shortest s -> t path in the residual graph (BFS), as a node list, or None."""
    parent = np.full(residual.shape[0], -1)
    parent[s] = s
    queue = deque([s])
    while queue:
        u = queue.popleft()
        for v in np.flatnonzero((residual[u] > 1e-12) & (parent < 0)):
            parent[v] = u
            if v == t:
                path = [t]
                while path[-1] != s:
                    path.append(int(parent[path[-1]]))
                return path[::-1]
            queue.append(v)
    return None


def edmonds_karp(
    adj: np.ndarray, capacity: np.ndarray, source: int, sink: int
) -> tuple[float, np.ndarray, np.ndarray]:
    """Max-flow value, the flow [N, N] (on edges, 0 <= f <= c) and the min-cut side [N] bool.

    Ford–Fulkerson with BFS augmenting paths (Edmonds–Karp, O(V E^2)). The cut is the set of
    nodes reachable from the source in the final residual graph: by max-flow/min-cut its
    out-going capacity equals the flow value.
    """
    if source == sink:
        raise ValueError("source and sink must differ")
    cap = np.where(adj, capacity, 0.0)
    residual = cap.copy()
    while (path := _augmenting_path(residual, source, sink)) is not None:
        u, v = np.array(path[:-1]), np.array(path[1:])
        push = residual[u, v].min()
        residual[u, v] -= push
        residual[v, u] += push
    flow = np.clip(cap - residual, 0.0, None)  # net flow on the original edges
    cut = bfs_reach(residual > 1e-12, source)
    value = float(cap[cut][:, ~cut].sum())
    return value, flow, cut


def make_graph(family: str, n: int, rng: np.random.Generator) -> AlgoGraph:
    """An ``er`` graph of ``n`` nodes, or a ``grid`` of about ``n`` nodes (a near-square)."""
    if family == "er":
        return er_graph(n, rng)
    if family == "grid":
        rows = max(1, int(round(n**0.5)))
        return grid_graph(rows, max(1, n // rows), rng)
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def algorithm_batch(graphs: list[AlgoGraph], flow: bool = False) -> dict[str, Tensor]:
    """Stack graphs of one size into dense tensors (B graphs, N nodes).

    adj [B,N,N] bool, weight [B,N,N], source/sink [B] long, dist [B,N] (0 where unreachable),
    reach [B,N] float, pred [B,N] long; with ``flow``: flow_value [B], cut [B,N] float.
    """
    if not graphs or len({g.num_nodes for g in graphs}) != 1:
        raise ValueError("graphs must be a non-empty list of graphs with one node count")
    out: dict[str, list] = {k: [] for k in ("adj", "weight", "source", "sink", "dist", "reach")}
    out.update(pred=[], flow_value=[], cut=[])
    for g in graphs:
        dist, pred = bellman_ford(g.adj, g.weight, g.source)
        reach = np.isfinite(dist)
        for key, val in (("adj", g.adj), ("weight", g.weight), ("source", g.source)):
            out[key].append(val)
        out["sink"].append(g.sink)
        out["dist"].append(np.where(reach, dist, 0.0))
        out["reach"].append(reach)
        out["pred"].append(pred)
        if flow:
            value, _, cut = edmonds_karp(g.adj, g.weight, g.source, g.sink)
            out["flow_value"].append(value)
            out["cut"].append(cut)
    batch = {k: torch.as_tensor(np.stack(v)) for k, v in out.items() if v}
    for k in ("weight", "dist", "reach", "flow_value", "cut"):
        if k in batch:
            batch[k] = batch[k].float()
    return batch


def random_batch(
    family: str, n: int, batch_size: int, rng: np.random.Generator, flow: bool = False
) -> dict[str, Tensor]:
    """``batch_size`` fresh graphs of one family and size, with their targets."""
    return algorithm_batch([make_graph(family, n, rng) for _ in range(batch_size)], flow=flow)
