"""FF-G2M: distil a graph neural network into an MLP with low- and high-frequency knowledge.

"Extracting Low-/High-Frequency Knowledge from Graph Neural Networks and Injecting it into
MLPs: An Effective GNN-to-MLP Distillation Framework" (Wu, Lin, Huang, Fan, Li; AAAI,
arXiv 2305.10758), code ``LirongWu/FF-G2M``: "FF-G2M", full-frequency GNN-to-MLP. A GCN
teacher is trained on the labelled nodes; its logits ``t`` on every node are then fixed, and an
MLP student (node features only, no edges at inference) is trained with

    L = lam * NLL(s[train], y[train]) + (1 - lam) * (L_LFD + L_HFD)

where ``s = log_softmax(z)``, ``z`` the student's logits, and with ``KL`` PyTorch's
``kl_div(input, target, reduction="batchmean", log_target=True)`` (= KL(target || input),
averaged over rows):

- **low-frequency distillation** (LFD), over the edges with self-loops ``E_loop``: each student
  node matches its teacher neighbours' (and its own) predictions, the neighbourhood-smoothed
  knowledge a GCN's low-pass filter carries::

      L_LFD = KL( s[src], log_softmax(t)[dst] )     (src, dst) in E_loop

- **high-frequency distillation** (HFD), over the edges without self-loops ``E``: the student's
  neighbour *differences* match the teacher's, the knowledge low-pass smoothing loses::

      L_HFD = KL( log_softmax(|z_src - z_dst| / tau), log_softmax(|t_src - t_dst| / tau) )

Both formulas are the reference code's (``Model.edge_distribution_low`` /
``edge_distribution_high``). Choices the notes leave open, made here:

- The teacher is a plain GCN (Kipf & Welling): ``D^-1/2 (A + I) D^-1/2`` as a dense matrix
  (:func:`normalized_adjacency`), ReLU and dropout between layers. The paper also uses SAGE
  and GAT teachers; only GCN is built.
- Differences in HFD are taken on the *logits* (``z``, ``t``), as the notes write them, not on
  hidden features; ``|.|`` is elementwise, and the softmax runs over the class dimension.
- Both directions of every undirected edge are in ``E`` and ``E_loop`` (the adjacency is
  symmetric), so each pair counts twice in both terms; LFD on self-loops only is GLNN's
  per-node KD (``KL(s_i, log_softmax(t_i))``), available as ``low="node"``.
- Full-batch training (the graphs here are small); the paper's ``train_mini_batch`` samples
  node batches. Model selection, as the paper's, by validation accuracy: the reported test
  accuracy is the one at the best-validation epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..legacy import rename_on_load

LOW_MODES = ("edges", "node", "none")


def _check_adjacency(adj: Tensor) -> None:
    if adj.dim() != 2 or adj.shape[0] != adj.shape[1]:
        raise ValueError(f"adj must be a square [N, N] matrix, got shape {tuple(adj.shape)}")
    if bool((adj < 0).any()):
        raise ValueError("adj must be non-negative (edge weights); got negative entries")
    if not torch.allclose(adj, adj.T):
        raise ValueError("adj must be symmetric (an undirected graph); pass adj + adj.T")


def normalized_adjacency(adj: Tensor, self_loops: bool = True) -> Tensor:
    """GCN propagation matrix ``D^-1/2 (A + I) D^-1/2`` (``A`` alone without self-loops);
    isolated nodes (degree 0, only possible without self-loops) get a zero row."""
    _check_adjacency(adj)
    a = adj + torch.eye(len(adj), dtype=adj.dtype) if self_loops else adj
    deg = a.sum(1)
    inv_sqrt = torch.where(deg > 0, deg.clamp_min(1e-12).rsqrt(), torch.zeros_like(deg))
    return inv_sqrt[:, None] * a * inv_sqrt[None, :]


def edge_index(adj: Tensor, self_loops: bool = False) -> Tensor:
    """[2, E] (src, dst) of the nonzero entries of ``adj`` (both directions of each edge),
    plus every ``(i, i)`` when ``self_loops``; existing diagonal entries are dropped first."""
    _check_adjacency(adj)
    a = adj.clone()
    a.fill_diagonal_(0)
    if self_loops:
        a = a + torch.eye(len(a), dtype=a.dtype)
    return a.nonzero().T.contiguous()


def _layer_dims(dim: int, hidden_dim: int, num_classes: int, num_layers: int) -> list[int]:
    if min(dim, hidden_dim, num_classes, num_layers) < 1:
        raise ValueError(
            f"dim, hidden_dim, num_classes and num_layers must be >= 1, got {dim}, "
            f"{hidden_dim}, {num_classes}, {num_layers}"
        )
    return [dim] + [hidden_dim] * (num_layers - 1) + [num_classes]


class GCN(nn.Module):
    """Graph convolutional network (Kipf & Welling, arXiv 1609.02907): each layer is
    ``adj_norm @ (h W)``; ReLU and dropout between layers; the last layer gives logits."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_classes: int,
        num_layers: int = 2,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        dims = _layer_dims(dim, hidden_dim, num_classes, num_layers)
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)
        )
        self.dropout = dropout

    def forward(self, x: Tensor, adj_norm: Tensor) -> Tensor:
        if adj_norm.shape != (x.shape[0], x.shape[0]):
            raise ValueError(
                f"adj_norm must be [N, N] for x with N={x.shape[0]} nodes, got "
                f"{tuple(adj_norm.shape)}"
            )
        h = x
        for i, layer in enumerate(self.layers):
            h = F.dropout(h, self.dropout, self.training)
            h = adj_norm @ layer(h)
            if i < len(self.layers) - 1:
                h = F.relu(h)
        return h


class MLP(nn.Module):
    """The student (and the plain baseline): Linear layers, ReLU and dropout between them;
    reads node features only.

    A stack rather than :class:`gatelab.layers.Mlp`: GLNN / FF-G2M students drop out the
    input features too (dropout before every layer, not only after the activation) and
    vary in depth (``num_layers`` >= 1). It uses the dense-FFN family's spelling:
    ``up_proj`` (dim -> hidden_dim), ``hidden_projs`` (hidden_dim -> hidden_dim, num_layers
    - 2 of them), ``down_proj`` (-> num_classes; with one layer it reads dim directly and
    there is no ``up_proj``). State dicts of the former ``layers.{i}`` spelling still load.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_classes: int,
        num_layers: int = 2,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        dims = _layer_dims(dim, hidden_dim, num_classes, num_layers)
        linears = [nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)]
        self.up_proj = linears[0] if num_layers > 1 else None
        self.hidden_projs = nn.ModuleList(linears[1:-1])
        self.down_proj = linears[-1]
        self.dropout = dropout
        rename_on_load(self, _mlp_keys(num_layers))

    def projections(self) -> list[nn.Linear]:
        """The Linear layers in order (``up_proj``, ``hidden_projs``, ``down_proj``)."""
        first = [] if self.up_proj is None else [self.up_proj]
        return [*first, *self.hidden_projs, self.down_proj]

    def forward(self, x: Tensor) -> Tensor:
        h = x
        layers = self.projections()
        for i, layer in enumerate(layers):
            h = layer(F.dropout(h, self.dropout, self.training))
            if i < len(layers) - 1:
                h = F.relu(h)
        return h


def _mlp_keys(num_layers: int) -> dict[str, str]:
    """The former ``layers.{i}`` keys of :class:`MLP` -> the family's names."""
    names = ["up_proj", *(f"hidden_projs.{i}" for i in range(num_layers - 2)), "down_proj"]
    names = names[-num_layers:]  # one layer: down_proj only
    return {
        f"layers.{i}.{kind}": f"{name}.{kind}"
        for i, name in enumerate(names)
        for kind in ("weight", "bias")
    }


def _kl(log_input: Tensor, log_target: Tensor) -> Tensor:
    return F.kl_div(log_input, log_target, reduction="batchmean", log_target=True)


def low_frequency_loss(student_logits: Tensor, teacher_logits: Tensor, edges: Tensor) -> Tensor:
    """L_LFD: KL between the student at ``src`` and the teacher at ``dst`` over ``edges``
    ([2, E], pass the edges *with* self-loops for the paper's term); zero when E is 0."""
    if edges.shape[1] == 0:
        return student_logits.sum() * 0.0
    src, dst = edges
    s = F.log_softmax(student_logits, -1)
    return _kl(s[src], F.log_softmax(teacher_logits, -1)[dst])


def high_frequency_loss(
    student_logits: Tensor, teacher_logits: Tensor, edges: Tensor, tau: float = 1.5
) -> Tensor:
    """L_HFD: KL between the softmaxed absolute neighbour differences of student and teacher
    logits, at temperature ``tau``, over ``edges`` ([2, E] without self-loops, whose
    differences are zero); zero when E is 0 (a graph without edges)."""
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if edges.shape[1] == 0:
        return student_logits.sum() * 0.0
    src, dst = edges
    zs = F.log_softmax((student_logits[src] - student_logits[dst]).abs() / tau, -1)
    zt = F.log_softmax((teacher_logits[src] - teacher_logits[dst]).abs() / tau, -1)
    return _kl(zs, zt)


@dataclass(frozen=True)
class G2MConfig:
    """Training settings for teacher, baseline and student (defaults: the paper's, except
    ``epochs``). ``low``: ``"edges"`` (LFD over E_loop, the paper), ``"node"`` (per-node KD,
    GLNN) or ``"none"``; ``high``: add HFD. ``low="none", high=False`` is the plain MLP."""

    hidden_dim: int = 256
    num_layers: int = 2
    dropout: float = 0.5
    lr: float = 0.01
    weight_decay: float = 5e-4
    epochs: int = 300
    lam: float = 0.1
    tau: float = 1.5
    low: Literal["edges", "node", "none"] = "edges"
    high: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(
                f"lam weighs the label loss against distillation: in [0, 1], got {self.lam}"
            )
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.low not in LOW_MODES:
            raise ValueError(f"low must be one of {LOW_MODES}, got {self.low!r}")
        if self.epochs < 1 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(
                f"need epochs >= 1, lr > 0, weight_decay >= 0; got {self.epochs}, {self.lr}, "
                f"{self.weight_decay}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def distills(self) -> bool:
        return self.low != "none" or self.high


@dataclass(frozen=True)
class FitResult:
    """Accuracies at the best-validation epoch and the logits of every node there."""

    val_acc: float
    test_acc: float
    train_acc: float
    logits: Tensor
    epoch: int


def _acc(logits: Tensor, y: Tensor, idx: Tensor) -> float:
    return float((logits[idx].argmax(-1) == y[idx]).float().mean())


def _fit(model: nn.Module, forward, loss_fn, graph, cfg: G2MConfig) -> FitResult:
    """Full-batch Adam; keep the logits of the best-validation epoch (ties: the earliest)."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best = None
    for epoch in range(cfg.epochs):
        model.train()
        loss = loss_fn(forward())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            logits = forward()
        val = _acc(logits, graph.y, graph.val_idx)
        if best is None or val > best.val_acc:
            best = FitResult(
                val,
                _acc(logits, graph.y, graph.test_idx),
                _acc(logits, graph.y, graph.train_idx),
                logits,
                epoch,
            )
    return best


def train_teacher(graph, cfg: G2MConfig = G2MConfig(), seed: int = 0) -> FitResult:
    """Train a GCN on ``graph``'s labelled nodes (:class:`gatelab.data.graphs.GraphData`)."""
    torch.manual_seed(seed)
    model = GCN(graph.x.shape[1], cfg.hidden_dim, graph.num_classes, cfg.num_layers, cfg.dropout)
    adj_norm = normalized_adjacency(graph.adj)
    tr, y = graph.train_idx, graph.y
    return _fit(
        model, lambda: model(graph.x, adj_norm), lambda z: F.cross_entropy(z[tr], y[tr]), graph, cfg
    )


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    graph,
    cfg: G2MConfig,
    edges_loop: Tensor,
    edges: Tensor,
) -> Tensor:
    """The FF-G2M objective (module docstring) for ``cfg.low`` / ``cfg.high``; the plain
    label loss when ``cfg`` distils nothing."""
    tr = graph.train_idx
    nll = F.cross_entropy(student_logits[tr], graph.y[tr])
    if not cfg.distills:
        return nll
    kd = student_logits.sum() * 0.0
    if cfg.low == "edges":
        kd = kd + low_frequency_loss(student_logits, teacher_logits, edges_loop)
    elif cfg.low == "node":
        kd = kd + _kl(F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1))
    if cfg.high:
        kd = kd + high_frequency_loss(student_logits, teacher_logits, edges, cfg.tau)
    return cfg.lam * nll + (1 - cfg.lam) * kd


def train_student(
    graph, teacher_logits: Tensor | None, cfg: G2MConfig = G2MConfig(), seed: int = 0
) -> FitResult:
    """Train the MLP student with :func:`distillation_loss`; ``teacher_logits`` [N, C] are
    fixed (detached). With a config that distils nothing this is the plain MLP baseline and
    ``teacher_logits`` may be None."""
    if cfg.distills:
        if teacher_logits is None:
            raise ValueError("teacher_logits are needed to distil; pass train_teacher(...).logits")
        if teacher_logits.shape != (graph.num_nodes, graph.num_classes):
            raise ValueError(
                f"teacher_logits must be [N, C] = {(graph.num_nodes, graph.num_classes)}, got "
                f"{tuple(teacher_logits.shape)}"
            )
        teacher_logits = teacher_logits.detach()
    torch.manual_seed(seed)
    model = MLP(graph.x.shape[1], cfg.hidden_dim, graph.num_classes, cfg.num_layers, cfg.dropout)
    edges_loop, edges = edge_index(graph.adj, True), edge_index(graph.adj, False)
    return _fit(
        model,
        lambda: model(graph.x),
        lambda z: distillation_loss(z, teacher_logits, graph, cfg, edges_loop, edges),
        graph,
        cfg,
    )


__all__ = [
    "GCN",
    "LOW_MODES",
    "MLP",
    "FitResult",
    "G2MConfig",
    "distillation_loss",
    "edge_index",
    "high_frequency_loss",
    "low_frequency_loss",
    "normalized_adjacency",
    "train_student",
    "train_teacher",
]
