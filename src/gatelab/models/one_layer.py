"""The one-layer transformer of "Filtering with Self-Attention and Storing with MLP".

"Filtering with Self-Attention and Storing with MLP: One-Layer Transformers Can Provably
Acquire and Extract Knowledge" (2025; listed in the project's paper abstracts, no arXiv
id or code at hand). The paper's point: a one-layer attention-only model trained by
next-token prediction may fail to acquire or extract facts, while one self-attention
layer followed by an MLP can; attention *filters* (picks the subject and relation
tokens) and the MLP *stores* (maps them to the answer).

Our model, as we read that framework (the paper's exact parametrisation was not
available to us, so these are our choices)::

    x = E[ids] + P[positions]                          # token and learned position embeddings
    h = x + Attn(x)                                    # one causal multi-head attention layer
    h = h + MLP(h)          (if mlp=True)              # Linear -> act -> Linear
    logits = h @ W_U                                   # untied output projection

No normalisation layers (the theory analyses none) and no biases in attention. With
``mlp=False`` the model is the attention-only baseline the paper contrasts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["OneLayerTransformer"]


class OneLayerTransformer(nn.Module):
    """One attention layer (+ an optional MLP) over token and position embeddings.

    ids [B, S] int64 -> logits [B, S, vocab_size]. ``hidden_dim`` is the MLP width
    (default 4 * dim), ``act`` its activation ("relu" or "gelu").
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int = 64,
        num_heads: int = 1,
        hidden_dim: int | None = None,
        max_seq_len: int = 8,
        mlp: bool = True,
        act: str = "relu",
    ):
        super().__init__()
        for name, value in (
            ("vocab_size", vocab_size),
            ("dim", dim),
            ("num_heads", num_heads),
            ("max_seq_len", max_seq_len),
            ("hidden_dim", hidden_dim or 1),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"OneLayerTransformer: {name} must be a positive int, got {value!r}"
                )
        if dim % num_heads:
            raise ValueError(f"OneLayerTransformer: dim={dim} must divide by num_heads={num_heads}")
        if act not in ("relu", "gelu"):
            raise ValueError(f"OneLayerTransformer: act must be 'relu' or 'gelu', got {act!r}")
        self.vocab_size, self.dim, self.num_heads, self.max_seq_len = (
            vocab_size,
            dim,
            num_heads,
            max_seq_len,
        )
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(max_seq_len, dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.mlp = (
            nn.Sequential(
                nn.Linear(dim, hidden_dim or 4 * dim),
                nn.ReLU() if act == "relu" else nn.GELU(),
                nn.Linear(hidden_dim or 4 * dim, dim),
            )
            if mlp
            else None
        )
        self.unembed = nn.Linear(dim, vocab_size, bias=False)
        for emb in (self.embed, self.pos):
            nn.init.normal_(emb.weight, 0.0, 1 / math.sqrt(dim))  # unit-norm rows on average

    def forward(self, ids: Tensor) -> Tensor:
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype != torch.int64:
            raise ValueError(f"OneLayerTransformer expects int64 ids [batch, seq], got {ids!r:.80}")
        b, s = ids.shape
        if s > self.max_seq_len:
            raise ValueError(f"sequence length {s} exceeds max_seq_len={self.max_seq_len}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, vocab_size={self.vocab_size})")
        x = self.embed(ids) + self.pos.weight[:s]
        q, k, v = self.qkv(x).view(b, s, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = x + self.proj(att.transpose(1, 2).reshape(b, s, self.dim))
        if self.mlp is not None:
            h = h + self.mlp(h)
        return self.unembed(h)
