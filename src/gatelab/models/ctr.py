"""Click-through-rate models on categorical fields: FinalMLP, DualMLP and logistic regression.

"FinalMLP: An Enhanced Two-Stream MLP Model for CTR Prediction" (Mao, Zhu, Wang, Dai, Dong,
Xiao, He; AAAI 2023, arXiv 2304.00902), following the reference code
``reczoo/FuxiCTR model_zoo/FinalMLP/src/FinalMLP.py`` (classes ``FinalMLP``,
``FeatureSelection``, ``InteractionAggregation``, and ``DualMLP``). The blocks (field
embedding, MLP stacks, feature gates, bilinear fusion) are in :mod:`gatelab.layers.ctr`.

Every model takes x int64 [B, F] (one category id per field, field i's ids in
[0, field_dims[i])) and returns click **logits** [B] float32; ``torch.sigmoid`` gives the
probability and ``F.binary_cross_entropy_with_logits`` the paper's BCE loss.
**Departure:** FuxiCTR's models end in a sigmoid; returning logits keeps the loss
numerically stable and changes nothing else.

Shared vocabulary: ``embed_dim`` (the paper's d), ``act``, ``dropout``; MLP widths are
``*_hidden_dims`` lists. FuxiCTR's batch-norm option is left out (its FinalMLP defaults
have it off).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..layers.ctr import (
    FeatureSelection,
    FieldEmbedding,
    InteractionAggregation,
    MLPStack,
    _check_dims,
)

__all__ = ["DualMLP", "FinalMLP", "LogisticCTR"]


class FinalMLP(nn.Module):
    """FinalMLP: field embeddings -> feature gates -> two MLP streams -> bilinear fusion.

    "FinalMLP: An Enhanced Two-Stream MLP Model for CTR Prediction" (AAAI 2023, arXiv
    2304.00902); see the module docstring for the logits departure.

    Args:
        field_dims: categories per field.
        embed_dim: d, the width of each field embedding.
        mlp1_hidden_dims, mlp2_hidden_dims: the two streams (ReLU MLPs, no output layer);
            their last widths must be divisible by ``num_heads``.
        fs_hidden_dims: hidden widths of each feature-selection gate MLP.
        num_heads: heads of the bilinear aggregation.
        fs_context: per stream, field indices whose embeddings feed that stream's gate, or
            None for a learned global context (FuxiCTR's default).
        feature_selection: False skips the gates (both streams see e; an ablation).
        act, dropout: of the two streams.

    Defaults are small (FuxiCTR's class defaults are [64, 64, 64] streams and one head; the
    paper's tuned template uses d = 16, [1024, 512] and [1024, 512, 256], 2 heads).
    """

    def __init__(
        self,
        field_dims: Sequence[int],
        embed_dim: int = 16,
        mlp1_hidden_dims: Sequence[int] = (64, 64),
        mlp2_hidden_dims: Sequence[int] = (64, 64),
        fs_hidden_dims: Sequence[int] = (64,),
        num_heads: int = 2,
        fs_context: Sequence[Sequence[int] | None] = (None, None),
        feature_selection: bool = True,
        act: str = "relu",
        dropout: float = 0.0,
    ):
        super().__init__()
        self.embedding = FieldEmbedding(field_dims, embed_dim)
        width = self.embedding.num_fields * embed_dim
        _check_dims("mlp1_hidden_dims", mlp1_hidden_dims, allow_empty=False)
        _check_dims("mlp2_hidden_dims", mlp2_hidden_dims, allow_empty=False)
        self.feature_selection = (
            FeatureSelection(self.embedding.num_fields, embed_dim, fs_hidden_dims, fs_context)
            if feature_selection
            else None
        )
        self.mlp1 = MLPStack(width, mlp1_hidden_dims, act=act, dropout=dropout)
        self.mlp2 = MLPStack(width, mlp2_hidden_dims, act=act, dropout=dropout)
        self.aggregation = InteractionAggregation(
            self.mlp1.output_dim, self.mlp2.output_dim, num_heads
        )

    def forward(self, x: Tensor) -> Tensor:
        emb = self.embedding(x)
        if self.feature_selection is None:
            h1 = h2 = emb.flatten(1)
        else:
            h1, h2 = self.feature_selection(emb)
        return self.aggregation(self.mlp1(h1), self.mlp2(h2))


class DualMLP(nn.Module):
    """Two MLPs on the same embeddings, their logits summed: the paper's simple baseline.

    FinalMLP (arXiv 2304.00902), section "DualMLP"; FuxiCTR ``DualMLP``: y = MLP1(e) +
    MLP2(e), each MLP with a Linear output of width 1.
    """

    def __init__(
        self,
        field_dims: Sequence[int],
        embed_dim: int = 16,
        mlp1_hidden_dims: Sequence[int] = (64, 64),
        mlp2_hidden_dims: Sequence[int] = (64, 64),
        act: str = "relu",
        dropout: float = 0.0,
    ):
        super().__init__()
        self.embedding = FieldEmbedding(field_dims, embed_dim)
        width = self.embedding.num_fields * embed_dim
        self.mlp1 = MLPStack(width, mlp1_hidden_dims, 1, act=act, dropout=dropout)
        self.mlp2 = MLPStack(width, mlp2_hidden_dims, 1, act=act, dropout=dropout)

    def forward(self, x: Tensor) -> Tensor:
        flat = self.embedding(x).flatten(1)
        return (self.mlp1(flat) + self.mlp2(flat)).squeeze(-1)


class LogisticCTR(nn.Module):
    """Logistic regression on one-hot fields: bias + sum_i w[field i, x_i] (the LR baseline)."""

    def __init__(self, field_dims: Sequence[int]):
        super().__init__()
        self.embedding = FieldEmbedding(field_dims, 1)
        nn.init.zeros_(self.embedding.weight)
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        return self.embedding(x).sum(dim=(1, 2)) + self.bias
