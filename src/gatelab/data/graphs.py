"""Node-classification graphs: a stochastic block model with node features, and Zachary's
karate club (networkx ships it).

A :class:`GraphData` holds a dense symmetric 0/1 adjacency without self-loops (the graphs
are small: a few thousand nodes at most), node features, labels and a class-stratified
train / validation / test split of the nodes (transductive: every node's features and edges
are seen, only the train nodes' labels are).

**Stochastic block model** (:func:`sbm_graph`). Node ``i`` belongs to block ``y_i`` (blocks of
equal size, up to one node); each unordered pair ``(i, j)`` is an edge independently with
probability ``p_in`` when ``y_i == y_j`` and ``p_out`` otherwise. Features: each class ``c``
has a mean ``mu_c ~ N(0, I_dim)`` scaled to norm ``signal``; node ``i`` gets
``x_i = mu_{y_i} + noise * eps_i`` with ``eps_i ~ N(0, I_dim)``. ``signal / noise`` sets how
well an MLP can read the label from the features alone; ``p_in / p_out`` how much the graph
adds (averaging a node's neighbours shrinks the noise when most of them share its class).

**Karate club** (:func:`karate_club`): 34 members, 78 friendships, two labels (the club each
member joined after the split, networkx's ``"club"`` attribute). Features are one-hot node
ids (the usual choice for this graph: it has no other attributes), so an MLP trained on the
few labelled nodes alone cannot generalise, and everything else comes from the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class GraphData:
    """x [N, F] float, y [N] long, adj [N, N] float (symmetric 0/1, zero diagonal), and the
    train / val / test node indices (disjoint)."""

    name: str
    x: Tensor
    y: Tensor
    adj: Tensor
    train_idx: Tensor
    val_idx: Tensor
    test_idx: Tensor

    @property
    def num_nodes(self) -> int:
        return self.x.shape[0]

    @property
    def num_classes(self) -> int:
        return int(self.y.max()) + 1

    @property
    def num_edges(self) -> int:
        """Undirected edges (each pair once)."""
        return int(self.adj.triu(1).sum())


def split_nodes(
    y: Tensor, train_per_class: int, val_per_class: int, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Class-stratified split: ``train_per_class`` and ``val_per_class`` nodes of each class,
    the rest is test (the Planetoid-style split the FF-G2M paper's citation graphs use)."""
    if train_per_class < 1 or val_per_class < 0:
        raise ValueError(
            f"train_per_class must be >= 1 and val_per_class >= 0, got {train_per_class}, "
            f"{val_per_class}"
        )
    gen = torch.Generator().manual_seed(seed)
    train, val, test = [], [], []
    for c in range(int(y.max()) + 1):
        nodes = (y == c).nonzero().flatten()
        if len(nodes) <= train_per_class + val_per_class:
            raise ValueError(
                f"class {c} has {len(nodes)} nodes, too few for train_per_class="
                f"{train_per_class} + val_per_class={val_per_class} and a test node; lower them"
            )
        nodes = nodes[torch.randperm(len(nodes), generator=gen)]
        train.append(nodes[:train_per_class])
        val.append(nodes[train_per_class : train_per_class + val_per_class])
        test.append(nodes[train_per_class + val_per_class :])
    return torch.cat(train).sort()[0], torch.cat(val).sort()[0], torch.cat(test).sort()[0]


def sbm_adjacency(y: Tensor, p_in: float, p_out: float, gen: torch.Generator) -> Tensor:
    """Dense 0/1 SBM adjacency for block labels ``y``: symmetric, zero diagonal."""
    n = len(y)
    same = y[:, None] == y[None, :]
    prob = torch.where(same, torch.tensor(p_in), torch.tensor(p_out))
    upper = (torch.rand(n, n, generator=gen) < prob).triu(1)
    return (upper | upper.T).float()


def sbm_graph(
    num_nodes: int = 600,
    num_classes: int = 4,
    p_in: float = 0.05,
    p_out: float = 0.005,
    dim: int = 32,
    signal: float = 1.0,
    noise: float = 1.0,
    train_per_class: int = 20,
    val_per_class: int = 30,
    seed: int = 0,
) -> GraphData:
    """A stochastic block model graph with class-dependent Gaussian node features (see the
    module docstring). Blocks are the classes; sizes differ by at most one node."""
    if num_classes < 2 or num_nodes < 2 * num_classes:
        raise ValueError(
            f"need num_classes >= 2 and num_nodes >= 2 * num_classes, got num_nodes={num_nodes}, "
            f"num_classes={num_classes}"
        )
    for name, p in (("p_in", p_in), ("p_out", p_out)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
    if dim < 1 or signal < 0 or noise < 0:
        raise ValueError(f"need dim >= 1, signal >= 0, noise >= 0; got {dim}, {signal}, {noise}")
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(num_nodes) % num_classes
    y = y[torch.randperm(num_nodes, generator=gen)]
    adj = sbm_adjacency(y, p_in, p_out, gen)
    means = torch.randn(num_classes, dim, generator=gen)
    means = signal * means / means.norm(dim=1, keepdim=True)
    x = means[y] + noise * torch.randn(num_nodes, dim, generator=gen)
    train, val, test = split_nodes(y, train_per_class, val_per_class, seed)
    return GraphData("sbm", x, y, adj, train, val, test)


def block_densities(adj: Tensor, y: Tensor) -> tuple[float, float]:
    """Realised (within-block, between-block) edge densities: edges over possible pairs."""
    same = y[:, None] == y[None, :]
    off_diag = ~torch.eye(len(y), dtype=torch.bool)
    within = same & off_diag
    between = ~same
    return float(adj[within].mean()), float(adj[between].mean())


def karate_club(train_per_class: int = 2, val_per_class: int = 2, seed: int = 0) -> GraphData:
    """Zachary's karate club from networkx: one-hot features, the post-split club as label."""
    import networkx as nx

    graph = nx.karate_club_graph()
    nodes = sorted(graph.nodes)
    clubs = sorted({graph.nodes[v]["club"] for v in nodes})
    y = torch.tensor([clubs.index(graph.nodes[v]["club"]) for v in nodes])
    adj = torch.zeros(len(nodes), len(nodes))
    for u, v in graph.edges:
        if u != v:
            adj[u, v] = adj[v, u] = 1.0
    x = torch.eye(len(nodes))
    train, val, test = split_nodes(y, train_per_class, val_per_class, seed)
    return GraphData("karate", x, y, adj, train, val, test)


__all__ = [
    "GraphData",
    "block_densities",
    "karate_club",
    "sbm_adjacency",
    "sbm_graph",
    "split_nodes",
]
