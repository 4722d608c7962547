"""kNN-LM and MLP Memory: a parametric memory that imitates a kNN-LM's next-token distribution.

"MLP Memory: A Retriever-Pretrained Memory for Large Language Models" (Wei et al., arXiv
2508.01832, ICLR 2026). A frozen LM's hidden states over a corpus, paired with the next
token, form a datastore; the kNN-LM ("Generalization through Memorization", Khandelwal et
al., arXiv 1911.00172) answers a query state by a softmax over the negative distances of
its k nearest keys, aggregated per token, and mixes that with the LM. MLP Memory replaces
the search by an all-MLP network trained on the datastore to output the kNN distribution:

    L = alpha * KL(p_kNN || p_MLP) + (1 - alpha) * CE(p_MLP, next token)
    log p = logaddexp(log(1 - lambda) + log p_LM, log(lambda) + log p_MLP)

Departures from the paper, at this library's scale:

- Exact kNN by a matrix product in torch (squared L2 via |q|^2 - 2 q.k + |k|^2, chunked
  over queries), not FAISS's approximate search; datastores are tens of thousands of keys.
- The memory reads the same hidden state as the kNN keys (the LM's final normed hidden
  state, what the head reads), not the input of the MLP at ~70% depth that the paper's
  ablation favours: one hook point keeps the kNN and the memory comparable, and our LMs
  have 2-4 layers.
- The kNN targets are dense [N, vocab] (byte vocabulary, 256), not a sparse cache.
- alpha defaults to 0.4 (the paper's ablation per third-party notes, unconfirmed; the
  sister Memory Decoder code uses 0.5); lambda defaults to 0.25 (the code's default).
  Both are arguments.
- Training positions retrieve their neighbours with themselves excluded (step 2 of the
  paper's target construction), so the memory does not learn "copy my own next token".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..experts import ACTIVATION_NAMES, activation


def _check_unit(name: str, value: float) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return float(value)


# -- kNN-LM ---------------------------------------------------------------------------------


class KNNDatastore:
    """Keys [N, dim] (hidden states) and values [N] (next tokens) with exact kNN search.

    ``search(queries, k)`` returns squared L2 distances and indices [Q, k], nearest first;
    ``distribution(queries, k, temperature)`` the kNN-LM's next-token distribution [Q, V]:
    softmax(-d / temperature) over the k neighbours, summed per neighbour token (Khandelwal
    et al., arXiv 1911.00172). ``exclude`` [Q] gives, per query, a datastore index to skip
    (the query's own entry when it comes from the datastore), or -1 for none.
    """

    def __init__(self, keys: Tensor, values: Tensor, vocab_size: int, chunk: int = 1024):
        if keys.dim() != 2 or values.dim() != 1 or keys.shape[0] != values.shape[0]:
            raise ValueError(
                f"keys must be [N, dim] and values [N], got {tuple(keys.shape)} and "
                f"{tuple(values.shape)}"
            )
        if keys.shape[0] == 0:
            raise ValueError("the datastore is empty: give at least one (key, value) pair")
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= vocab_size):
            raise ValueError(f"values must lie in [0, vocab_size={vocab_size})")
        self.keys = keys.float().contiguous()
        self.values = values.long()
        self.vocab_size = vocab_size
        self.chunk = chunk
        self._key_sq = self.keys.pow(2).sum(-1)

    def __len__(self) -> int:
        return self.keys.shape[0]

    def _check_k(self, k: int, exclude: Tensor | None) -> None:
        room = len(self) - (1 if exclude is not None else 0)
        if not 1 <= k <= room:
            raise ValueError(
                f"k must lie in [1, {room}] (the datastore holds {len(self)} entries"
                f"{', one excluded per query' if exclude is not None else ''}), got {k}"
            )

    @torch.no_grad()
    def search(self, queries: Tensor, k: int, exclude: Tensor | None = None):
        """(distances, indices), each [Q, k], nearest first (squared L2)."""
        self._check_k(k, exclude)
        if queries.dim() != 2 or queries.shape[1] != self.keys.shape[1]:
            raise ValueError(
                f"queries must be [Q, {self.keys.shape[1]}], got {tuple(queries.shape)}"
            )
        dists, idx = [], []
        for start in range(0, queries.shape[0], self.chunk):
            q = queries[start : start + self.chunk].float()
            d = q.pow(2).sum(-1, keepdim=True) - 2 * q @ self.keys.T + self._key_sq
            d = d.clamp_min(0)
            if exclude is not None:
                ex = exclude[start : start + self.chunk].long()
                rows = torch.nonzero(ex >= 0).squeeze(-1)
                d[rows, ex[rows]] = math.inf
            top = d.topk(k, dim=-1, largest=False)
            dists.append(top.values)
            idx.append(top.indices)
        if not dists:
            empty = queries.new_zeros(0, k)
            return empty, empty.long()
        return torch.cat(dists), torch.cat(idx)

    @torch.no_grad()
    def distribution(
        self, queries: Tensor, k: int, temperature: float = 1.0, exclude: Tensor | None = None
    ) -> Tensor:
        """p_kNN [Q, vocab_size]: softmax(-distance / temperature), aggregated per token."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        dists, idx = self.search(queries, k, exclude)
        weights = torch.softmax(-dists / temperature, dim=-1)
        probs = torch.zeros(dists.shape[0], self.vocab_size)
        return probs.scatter_add_(1, self.values[idx], weights)


def interpolate(log_p_lm: Tensor, p_other: Tensor, lam: float, *, log: bool = False) -> Tensor:
    """log p = logaddexp(log(1 - lam) + log p_LM, log(lam) + log p_other).

    ``log_p_lm``: the LM's log-probabilities; ``p_other``: the kNN or memory distribution
    (probabilities, or log-probabilities with ``log=True``). lam = 0 gives the LM, 1 the
    other distribution.
    """
    lam = _check_unit("lam", lam)
    if log_p_lm.shape != p_other.shape:
        raise ValueError(
            f"the distributions must have one shape, got {tuple(log_p_lm.shape)} and "
            f"{tuple(p_other.shape)}"
        )
    log_other = p_other if log else p_other.clamp_min(0).log()
    if lam == 0.0:
        return log_p_lm
    if lam == 1.0:
        return log_other
    return torch.logaddexp(math.log1p(-lam) + log_p_lm, math.log(lam) + log_other)


# -- MLP Memory -----------------------------------------------------------------------------


class MLPMemory(nn.Module):
    """All-MLP memory of MLP Memory (Wei et al., arXiv 2508.01832): hidden state -> logits.

    ``num_layers`` pre-norm residual FFN blocks of width ``dim`` -> ``hidden_dim`` -> ``dim``
    (no token mixing: each position alone), a final RMSNorm and a linear vocabulary head.
    The paper's memory is ~8 such layers at backbone width; here ``num_layers`` is small.
    """

    def __init__(
        self,
        dim: int,
        vocab_size: int,
        hidden_dim: int | None = None,
        num_layers: int = 4,
        act: str = "gelu",
        dropout: float = 0.0,
    ):
        super().__init__()
        hidden_dim = 4 * dim if hidden_dim is None else hidden_dim
        for name, value in (("dim", dim), ("vocab_size", vocab_size), ("hidden_dim", hidden_dim)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}")
        if act not in ACTIVATION_NAMES:
            raise ValueError(f"act must be one of {', '.join(ACTIVATION_NAMES)}, got {act!r}")
        self.dim, self.vocab_size = dim, vocab_size
        self.norms = nn.ModuleList(nn.RMSNorm(dim) for _ in range(num_layers))
        self.ups = nn.ModuleList(nn.Linear(dim, hidden_dim) for _ in range(num_layers))
        self.downs = nn.ModuleList(nn.Linear(hidden_dim, dim) for _ in range(num_layers))
        self.act = activation(act)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, h: Tensor) -> Tensor:
        """h [..., dim] -> logits [..., vocab_size]."""
        if h.shape[-1] != self.dim:
            raise ValueError(f"MLPMemory expects [..., {self.dim}], got {tuple(h.shape)}")
        for norm, up, down in zip(self.norms, self.ups, self.downs, strict=True):
            h = h + self.drop(down(self.act(up(norm(h)))))
        return self.head(self.norm(h))


def memory_loss(logits: Tensor, knn_probs: Tensor, targets: Tensor, alpha: float = 0.4) -> Tensor:
    """alpha * KL(p_kNN || p_MLP) + (1 - alpha) * CE(p_MLP, targets), means over positions.

    KL uses 0 * log 0 = 0, so tokens the kNN gives no mass cost nothing in that term.
    """
    alpha = _check_unit("alpha", alpha)
    log_p = F.log_softmax(logits.float(), dim=-1)
    kl = (torch.xlogy(knn_probs, knn_probs) - knn_probs * log_p).sum(-1).mean()
    ce = F.nll_loss(log_p, targets)
    return alpha * kl + (1 - alpha) * ce


def train_memory(
    memory: MLPMemory,
    hidden: Tensor,
    knn_probs: Tensor,
    targets: Tensor,
    *,
    steps: int,
    batch_size: int = 256,
    lr: float = 1e-3,
    alpha: float = 0.4,
    seed: int = 0,
) -> list[float]:
    """Fit ``memory`` on (hidden [N, dim], p_kNN [N, V], next token [N]); returns losses."""
    n = hidden.shape[0]
    if not (knn_probs.shape[0] == targets.shape[0] == n):
        raise ValueError("hidden, knn_probs and targets must have one length")
    if n == 0 or steps < 0 or batch_size < 1:
        raise ValueError(f"need data, steps >= 0 and batch_size >= 1 (got {n}, {steps})")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(memory.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(steps, 1)))
    )
    memory.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        loss = memory_loss(memory(hidden[idx]), knn_probs[idx], targets[idx], alpha)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    memory.eval()
    return losses


@torch.no_grad()
def final_hidden(model: nn.Module, ids: Tensor) -> tuple[Tensor, Tensor]:
    """(hidden [B, S, dim], log-probs [B, S, V]) of a gatelab ``LM``: the final normed
    hidden state (the head's input), caught by a hook on ``model.norm``."""
    caught: list[Tensor] = []
    handle = model.norm.register_forward_hook(lambda _m, _i, out: caught.append(out))
    try:
        logits = model(ids).logits
    finally:
        handle.remove()
    return caught[0], F.log_softmax(logits.float(), dim=-1)


__all__ = [
    "KNNDatastore",
    "MLPMemory",
    "final_hidden",
    "interpolate",
    "memory_loss",
    "train_memory",
]
