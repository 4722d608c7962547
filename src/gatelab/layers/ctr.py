"""Blocks of click-through-rate models on categorical fields: the field embedding, the MLP
stacks, and FinalMLP's feature gates and bilinear fusion (the models that use them,
FinalMLP, DualMLP and logistic regression, are in :mod:`gatelab.models.ctr`).

"FinalMLP: An Enhanced Two-Stream MLP Model for CTR Prediction" (Mao, Zhu, Wang, Dai, Dong,
Xiao, He; AAAI 2023, arXiv 2304.00902), following the reference code
``reczoo/FuxiCTR model_zoo/FinalMLP/src/FinalMLP.py`` (classes ``FinalMLP``,
``FeatureSelection``, ``InteractionAggregation``, and ``DualMLP``).

The models take x int64 [B, F] (one category id per field, field i's ids in
[0, field_dims[i])); :class:`FieldEmbedding` checks those ids.

Shared vocabulary: ``embed_dim`` (the paper's d), ``act``, ``dropout``; MLP widths are
``*_hidden_dims`` lists. FuxiCTR's batch-norm option is left out (its FinalMLP defaults
have it off).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..experts import activation
from ..legacy import moved

__all__ = [
    "FeatureSelection",
    "FieldEmbedding",
    "InteractionAggregation",
    "MLPStack",
    "mlp_parameter_count",
]

# The complete models moved to gatelab.models.ctr (issue 14); the old path warns.
__getattr__ = moved(
    __name__, dict.fromkeys(("DualMLP", "FinalMLP", "LogisticCTR"), "gatelab.models.ctr")
)


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_dims(name: str, dims: Sequence[int], allow_empty: bool = True) -> list[int]:
    dims = list(dims)
    if not dims and not allow_empty:
        raise ValueError(f"{name} must list at least one width, got {dims}")
    for i, d in enumerate(dims):
        _check_positive(f"{name}[{i}]", d)
    return dims


class FieldEmbedding(nn.Module):
    """One embedding table for all fields: x [B, F] int64 -> [B, F, embed_dim].

    Field i's ids are offset by sum(field_dims[:i]), so the table has sum(field_dims) rows.
    Ids are validated (per field, in range) outside ``torch.compile``.
    """

    def __init__(self, field_dims: Sequence[int], embed_dim: int):
        super().__init__()
        self.field_dims = _check_dims("field_dims", field_dims, allow_empty=False)
        _check_positive("embed_dim", embed_dim)
        self.embed_dim = embed_dim
        offsets = torch.tensor([0, *self.field_dims[:-1]]).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        self.register_buffer("sizes", torch.tensor(self.field_dims), persistent=False)
        self.weight = nn.Parameter(torch.empty(sum(self.field_dims), embed_dim))
        nn.init.normal_(self.weight, std=1e-2)  # FuxiCTR's default embedding init

    @property
    def num_fields(self) -> int:
        return len(self.field_dims)

    def check(self, x: Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.num_fields:
            raise ValueError(
                f"expected x of shape [batch, {self.num_fields}] (one id per field), "
                f"got {tuple(x.shape)}"
            )
        if x.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"x must hold integer category ids, got {x.dtype}")
        if torch.compiler.is_compiling() or not x.numel():
            return
        bad = (x < 0) | (x >= self.sizes)
        if bool(bad.any()):
            field = int(bad.any(dim=0).nonzero()[0])
            raise ValueError(
                f"field {field} has an id outside [0, field_dims[{field}]="
                f"{self.field_dims[field]}); map unseen values to an out-of-vocabulary id"
            )

    def forward(self, x: Tensor) -> Tensor:
        self.check(x)
        return F.embedding(x.long() + self.offsets, self.weight)


class MLPStack(nn.Sequential):
    """Linear -> act (-> dropout) per width in ``hidden_dims``; optional final Linear.

    FuxiCTR's ``MLP_Block`` without batch norm. ``output_dim=None`` leaves the last hidden
    layer as the output (FinalMLP's streams), an int adds a plain Linear (DualMLP).
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int],
        output_dim: int | None = None,
        act: str = "relu",
        dropout: float = 0.0,
        output_act: str | None = None,
    ):
        _check_positive("input_dim", input_dim)
        hidden_dims = _check_dims("hidden_dims", hidden_dims)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        fn = activation(act)
        layers: list[nn.Module] = []
        width = input_dim
        for h in hidden_dims:
            layers += [nn.Linear(width, h), _Act(fn)]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        if output_dim is not None:
            _check_positive("output_dim", output_dim)
            layers.append(nn.Linear(width, output_dim))
            width = output_dim
            if output_act is not None:
                layers.append(_Act(activation(output_act)))
        if not layers:
            raise ValueError("an MLPStack needs hidden_dims or an output_dim")
        super().__init__(*layers)
        self.output_dim = width


class _Act(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


def mlp_parameter_count(input_dim: int, hidden_dims: Sequence[int], output_dim=None) -> int:
    """Weights and biases of an MLPStack: sum over layers of (in + 1) * out."""
    widths = [input_dim, *hidden_dims, *([output_dim] if output_dim else [])]
    return sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:], strict=True))


class FeatureSelection(nn.Module):
    """FinalMLP's feature gates: h_k = e * 2 sigmoid(MLP_k(ctx_k)), one gate per stream.

    ``context`` lists, per stream, the field indices whose embeddings are the gate's context
    (the paper gates items by user fields and vice versa); ``None`` uses a learned bias
    vector of width ``embed_dim`` instead, which gives input-independent, global gates
    (FuxiCTR's default). The gate MLP has ReLU hidden layers ``hidden_dims`` and F * d
    outputs. The bias vector starts at zeros, as in FuxiCTR, so until it moves the first
    gate layer receives no gradient.

    Returns the two gated copies of e [B, F * d] and, in ``last_gates``, the gates ([1, F * d]
    for a global gate, [B, F * d] for a context-dependent one).
    """

    def __init__(
        self,
        num_fields: int,
        embed_dim: int,
        hidden_dims: Sequence[int] = (64,),
        context: Sequence[Sequence[int] | None] = (None, None),
    ):
        super().__init__()
        if len(context) != 2:
            raise ValueError(f"context must give one entry per stream (2), got {len(context)}")
        self.num_fields, self.embed_dim = num_fields, embed_dim
        self.context = [None if c is None else self._check_context(c) for c in context]
        self.ctx_bias = nn.ParameterList(
            [nn.Parameter(torch.zeros(1, embed_dim)) for c in self.context if c is None]
        )
        self.gates = nn.ModuleList(
            MLPStack(embed_dim * (len(c) if c else 1), hidden_dims, num_fields * embed_dim)
            for c in self.context
        )
        self.last_gates: list[Tensor] = []

    def _check_context(self, fields: Sequence[int]) -> list[int]:
        fields = list(fields)
        if not fields or any(not 0 <= f < self.num_fields for f in fields):
            raise ValueError(
                f"context fields must be a non-empty list of field indices in "
                f"[0, {self.num_fields}), got {fields}; use None for a global gate"
            )
        return fields

    def forward(self, emb: Tensor) -> tuple[Tensor, Tensor]:
        """emb [B, F, d] -> (h1, h2), each [B, F * d]."""
        flat = emb.flatten(1)
        out, biases = [], iter(self.ctx_bias)
        self.last_gates = []
        for fields, gate_mlp in zip(self.context, self.gates, strict=True):
            # A global context is one row for the whole batch (FuxiCTR repeats it B times;
            # the gate is the same, computed once and broadcast).
            ctx = next(biases) if fields is None else emb[:, fields].flatten(1)
            gate = 2.0 * torch.sigmoid(gate_mlp(ctx))
            self.last_gates.append(gate.detach())
            out.append(flat * gate)
        return out[0], out[1]


class InteractionAggregation(nn.Module):
    """Multi-head bilinear fusion of two stream outputs into one logit.

    y = w1^T o1 + w2^T o2 + b + sum_j o1_j^T W3_j o2_j, the heads j splitting o1 and o2 into
    ``num_heads`` equal chunks. As FuxiCTR, w1 and w2 are ``nn.Linear`` layers, each with
    its bias (so b is their sum), and W3 [H * d1h * d2h, 1] is Xavier-normal.
    Parameters: (d1 + 1) + (d2 + 1) + H * (d1 / H) * (d2 / H).
    """

    def __init__(self, x_dim: int, y_dim: int, num_heads: int = 1):
        super().__init__()
        _check_positive("num_heads", num_heads)
        for name, dim in (
            ("x_dim (mlp1's last width)", x_dim),
            ("y_dim (mlp2's last width)", y_dim),
        ):
            if dim % num_heads:
                raise ValueError(
                    f"{name}={dim} is not divisible by num_heads={num_heads}; pick a "
                    "num_heads that divides both stream widths"
                )
        self.num_heads = num_heads
        self.head_x, self.head_y = x_dim // num_heads, y_dim // num_heads
        self.w_x = nn.Linear(x_dim, 1)
        self.w_y = nn.Linear(y_dim, 1)
        self.w_xy = nn.Parameter(torch.empty(num_heads * self.head_x * self.head_y, 1))
        nn.init.xavier_normal_(self.w_xy)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """x [B, d1], y [B, d2] -> [B]."""
        hx = x.view(-1, self.num_heads, self.head_x)
        hy = y.view(-1, self.num_heads, self.head_y)
        w = self.w_xy.view(self.num_heads, self.head_x, self.head_y)
        bilinear = torch.einsum("bhi,hij,bhj->b", hx, w, hy)
        return (self.w_x(x) + self.w_y(y)).squeeze(-1) + bilinear
