"""MoHETS: a patch Transformer encoder whose FFN is a mixture of heterogeneous experts.

"MoHETS: Long-term Time Series Forecasting with Mixture-of-Heterogeneous-Experts"
(Ortigossa, Lutsker, Segal; arXiv 2601.21866). Also the DLinear-style baseline it is
compared against here ("Are Transformers Effective for Time Series Forecasting?", Zeng et
al., arXiv 2205.13504).

The routed layer is our own small module (``MoHELayer``) rather than
``gatelab.layers.MoE``: that layer's expert banks are stacked GLU/MLP weights applied to
tokens one by one, while MoHETS mixes a shared expert that convolves *along the patch
sequence* with routed Fourier (FAN) experts of a different form. The router is a gatelab
router (``gatelab.routing.ROUTERS``) and the layer consumes its ``Routing``; the balance loss
is gatelab's ``switch_balance_loss``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.mlp import Mlp
from ..legacy import rename_on_load
from ..routing import ROUTERS, Routing
from ..routing.losses import switch_balance_loss
from .config import Config, ConfigError

EXPERT_KINDS = ("fan", "mlp")
SHARED_KINDS = ("dwconv", "mlp")


class FANLayer(nn.Module):
    """Fourier Analysis Network layer: [cos(W_p x), sin(W_p x), GELU(W_g x + b_g)].

    "FAN: Fourier Analysis Networks" (Dong et al., arXiv 2410.02675). ``hidden_dim`` is the
    output width; a quarter of it (at least 1) goes to each of cos and sin, as in the FAN
    paper's default d_p = d_out / 4, and the rest to the GELU branch.
    """

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        if hidden_dim < 3:
            raise ValueError(
                f"hidden_dim must be >= 3 for a FANLayer (cos, sin, gelu parts), got {hidden_dim}"
            )
        periodic = max(1, hidden_dim // 4)
        self.periodic = nn.Linear(dim, periodic, bias=False)
        self.gated = nn.Linear(dim, hidden_dim - 2 * periodic)

    def forward(self, x: Tensor) -> Tensor:
        p = self.periodic(x)
        return torch.cat([torch.cos(p), torch.sin(p), F.gelu(self.gated(x))], dim=-1)


class FANExpert(nn.Module):
    """A FAN feed-forward expert: FANLayer(dim -> hidden_dim), then Linear(hidden_dim -> dim)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fan = FANLayer(dim, hidden_dim)
        self.out = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.fan(x))


# MLPExpert's keys before issue 14 -> the family's.
_MLP_EXPERT_KEYS = {
    f"{old}.{kind}": f"{old}_proj.{kind}" for old in ("up", "down") for kind in ("weight", "bias")
}


class MLPExpert(Mlp):
    """Linear(dim -> hidden_dim), GELU, Linear(hidden_dim -> dim): the homogeneous expert,
    the family's :class:`~gatelab.layers.Mlp` (``up_proj``, ``down_proj``; state dicts
    with the former ``up``/``down`` still load)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__(dim, hidden_dim, act="gelu", bias=True)
        rename_on_load(self, _MLP_EXPERT_KEYS)


class DwConvExpert(nn.Module):
    """The shared expert: depthwise conv1d (k = 3) over the patch sequence, then pointwise
    up (dim -> hidden_dim), GELU, pointwise down (hidden_dim -> dim). Takes [B, N, dim].

    The paper's optional GLU variant is left out (not needed for the comparison).
    """

    def __init__(self, dim: int, hidden_dim: int, kernel_size: int = 3):
        super().__init__()
        self.depthwise = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.ffn = MLPExpert(dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn(self.depthwise(x.transpose(1, 2)).transpose(1, 2))


class MLPShared(MLPExpert):
    """A shared MLP expert on [B, N, dim] (the homogeneous model's shared expert)."""


def _expert(kind: str, dim: int, hidden_dim: int) -> nn.Module:
    if kind not in EXPERT_KINDS:
        raise ValueError(f"expert kind must be one of {EXPERT_KINDS}, got {kind!r}")
    return FANExpert(dim, hidden_dim) if kind == "fan" else MLPExpert(dim, hidden_dim)


class MoHELayer(nn.Module):
    """Mixture of heterogeneous experts on patch tokens [B, N, dim] (MoHETS, arXiv 2601.21866).

    out = shared(x) + sum over the top-k routed experts e of g_e(x) FAN_e(x). The shared
    expert sees the whole patch sequence (depthwise conv along it); the router and the
    routed experts see one patch token at a time. Routed tokens are dispatched by sorting
    the routing's slots by expert (``Routing.flat``) and running each expert once on its
    rows; ``dense_reference`` runs every expert on every token for the tests.

    The paper does not state the number of experts, k or the auxiliary loss; we default to
    4 experts, k = 2, the "topk" router with normalised weights, and gatelab's Switch
    balance loss (``aux_loss``, weighted by the model).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int = 4,
        top_k: int = 2,
        expert_kind: str = "fan",
        shared_kind: str = "dwconv",
        router: str = "topk",
    ):
        super().__init__()
        if shared_kind not in SHARED_KINDS:
            raise ValueError(f"shared_kind must be one of {SHARED_KINDS}, got {shared_kind!r}")
        kwargs = {"normalize": True} if router == "topk" else {}
        self.router = ROUTERS.get(router)(dim, num_experts, top_k, **kwargs)
        self.experts = nn.ModuleList(
            _expert(expert_kind, dim, hidden_dim) for _ in range(num_experts)
        )
        self.shared = (
            DwConvExpert(dim, hidden_dim) if shared_kind == "dwconv" else MLPShared(dim, hidden_dim)
        )
        self.last_routing: Routing | None = None
        self.aux_loss = torch.zeros(())

    def routed(self, tokens: Tensor, routing: Routing) -> Tensor:
        """Sum over slots of weight * expert(token), for tokens [T, dim]."""
        flat = routing.flat()
        out = torch.zeros_like(tokens)
        ends = flat.offsets.tolist()
        start = 0
        for e, end in enumerate(ends):
            if end > start:  # idle experts are skipped
                rows = flat.tokens[start:end]
                y = self.experts[e](tokens[rows]) * flat.weights[start:end, None].to(tokens.dtype)
                out = out.index_add(0, rows, y)
            start = end
        return out

    def dense_reference(self, tokens: Tensor, routing: Routing) -> Tensor:
        """Every expert on every token, weighted by the dense [T, E] routing weights."""
        outs = torch.stack([expert(tokens) for expert in self.experts], dim=1)
        return (routing.dense_weights().to(tokens.dtype)[..., None] * outs).sum(1)

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        routing = self.router(tokens)
        self.last_routing = routing.detach()
        self.aux_loss = switch_balance_loss(routing) if self.training else torch.zeros(())
        return self.shared(x) + self.routed(tokens, routing).view_as(x)


def moving_average(x: Tensor, kernel_size: int) -> Tensor:
    """Moving average over time of x [B, L, C], ends padded by repeating the end values
    (DLinear's ``series_decomp``); ``kernel_size`` must be odd so the window is centred."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")
    pad = kernel_size // 2
    padded = torch.cat([x[:, :1].expand(-1, pad, -1), x, x[:, -1:].expand(-1, pad, -1)], dim=1)
    return F.avg_pool1d(padded.transpose(1, 2), kernel_size, stride=1).transpose(1, 2)


class DLinear(nn.Module):
    """DLinear (Zeng et al., arXiv 2205.13504): trend = moving average, seasonal = x - trend,
    each mapped lookback -> horizon by one linear map shared by the channels. x [B, L, C]
    -> [B, H, C]. Departure: the kernel is capped at the largest odd size <= lookback (the
    paper's 25 is longer than some of our lookbacks)."""

    def __init__(self, lookback: int, horizon: int, kernel_size: int = 25):
        super().__init__()
        self.lookback, self.horizon = lookback, horizon
        self.kernel_size = min(kernel_size, lookback if lookback % 2 else lookback - 1)
        self.trend = nn.Linear(lookback, horizon)
        self.seasonal = nn.Linear(lookback, horizon)

    def decompose(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(seasonal, trend) of x [B, L, C]; they sum to x."""
        trend = moving_average(x, self.kernel_size)
        return x - trend, trend

    def forward(self, x: Tensor, exog: Tensor | None = None) -> Tensor:
        _check_window(x, self.lookback, "x")
        seasonal, trend = self.decompose(x)
        out = self.seasonal(seasonal.transpose(1, 2)) + self.trend(trend.transpose(1, 2))
        return out.transpose(1, 2)


def _check_window(x: Tensor, lookback: int, name: str) -> None:
    if x.dim() != 3 or x.shape[1] != lookback:
        raise ValueError(
            f"{name} must be [batch, lookback={lookback}, channels], got {tuple(x.shape)}"
        )


@dataclass(frozen=True)
class MoHETSConfig(Config):
    """Sizes of a MoHETS model. ``num_exog`` = 0: no cross-attention (univariate series).

    ``expert_kind`` is "fan" or "mlp" (routed experts), ``shared_kind`` "dwconv" or "mlp".
    """

    lookback: int = 32
    horizon: int = 8
    patch_len: int = 4
    dim: int = 32
    hidden_dim: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_experts: int = 4
    top_k: int = 2
    num_exog: int = 0
    expert_kind: str = "fan"
    shared_kind: str = "dwconv"
    router: str = "topk"
    dropout: float = 0.0

    def validate(self) -> None:
        if self.patch_len < 1 or self.lookback % self.patch_len:
            raise ConfigError(
                f"patch_len={self.patch_len} must divide lookback={self.lookback}; pick a "
                f"patch_len among the divisors of {self.lookback} or change the lookback"
            )
        if self.dim % self.num_heads:
            raise ConfigError(f"dim={self.dim} must be divisible by num_heads={self.num_heads}")
        if self.horizon < 1 or self.num_exog < 0:
            raise ConfigError(
                f"horizon must be >= 1 and num_exog >= 0, got {self.horizon, self.num_exog}"
            )
        if self.expert_kind not in EXPERT_KINDS or self.shared_kind not in SHARED_KINDS:
            raise ConfigError(
                f"expert_kind must be one of {EXPERT_KINDS} and shared_kind one of "
                f"{SHARED_KINDS}, got {self.expert_kind!r}, {self.shared_kind!r}"
            )


class MoHETSBlock(nn.Module):
    """Pre-norm: self-attention, cross-attention to exogenous patches (if any), MoHE layer."""

    def __init__(self, cfg: MoHETSConfig):
        super().__init__()
        self.norm1, self.norm3 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.attn = nn.MultiheadAttention(cfg.dim, cfg.num_heads, cfg.dropout, batch_first=True)
        self.cross = None
        if cfg.num_exog:
            self.norm2 = nn.LayerNorm(cfg.dim)
            self.cross = nn.MultiheadAttention(
                cfg.dim, cfg.num_heads, cfg.dropout, batch_first=True
            )
        self.moe = MoHELayer(
            cfg.dim,
            cfg.hidden_dim,
            cfg.num_experts,
            cfg.top_k,
            cfg.expert_kind,
            cfg.shared_kind,
            cfg.router,
        )

    def forward(self, x: Tensor, exog: Tensor | None) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        if self.cross is not None:
            x = x + self.cross(self.norm2(x), exog, exog, need_weights=False)[0]
        return x + self.moe(self.norm3(x))


class PatchDecoder(nn.Module):
    """Convolutional patch decoder: conv (k = 3) along the N input patches, a 1x1 map of
    the N patches to ceil(H / P) output patches, and a transposed conv (kernel = stride =
    P) that unpatches each output token into P values; the first H are kept.

    The notes confirm only "a lightweight convolutional patch decoder (UnPatch)"; this
    layout is our choice.
    """

    def __init__(self, dim: int, num_patches: int, patch_len: int, horizon: int):
        super().__init__()
        self.horizon = horizon
        self.mix = nn.Conv1d(dim, dim, 3, padding=1)
        self.to_out = nn.Linear(num_patches, math.ceil(horizon / patch_len))
        self.unpatch = nn.ConvTranspose1d(dim, 1, patch_len, stride=patch_len)

    def forward(self, x: Tensor) -> Tensor:  # [B, N, dim] -> [B, H]
        h = F.gelu(self.mix(x.transpose(1, 2)))  # [B, dim, N]
        return self.unpatch(self.to_out(h)).squeeze(1)[:, : self.horizon]


class MoHETS(nn.Module):
    """MoHETS (Ortigossa, Lutsker, Segal; arXiv 2601.21866): x [B, L, C] (+ exog [B, L, X])
    -> forecast [B, H, C].

    Channel-independent: every target channel is RevIN-normalised (instance mean and std
    over the lookback, no affine), cut into L / P non-overlapping patches, embedded
    (Linear + learned position) and encoded on its own. Exogenous covariates (``num_exog``
    columns) are instance-normalised, patched and embedded the same way (their own
    embedding plus a learned per-covariate embedding), and every target channel
    cross-attends to all X * N covariate patches of its batch row. ``aux_loss`` after a
    forward is the mean over layers of the Switch balance loss.

    Departures: RevIN without the learned affine; sizes, k, router and the balance loss are
    ours (the paper leaves them open); the patch decoder's layout is our choice
    (``PatchDecoder``). ``expert_kind="mlp", shared_kind="mlp"`` gives the homogeneous
    MLP-expert MoE the experiment compares with.
    """

    def __init__(self, cfg: MoHETSConfig):
        super().__init__()
        self.cfg = cfg
        n = cfg.lookback // cfg.patch_len
        self.embed = nn.Linear(cfg.patch_len, cfg.dim)
        self.position = nn.Parameter(torch.randn(n, cfg.dim) * 0.02)
        if cfg.num_exog:
            self.exog_embed = nn.Linear(cfg.patch_len, cfg.dim)
            self.exog_id = nn.Parameter(torch.randn(cfg.num_exog, 1, cfg.dim) * 0.02)
            self.exog_position = nn.Parameter(torch.randn(n, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(MoHETSBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.dim)
        self.decoder = PatchDecoder(cfg.dim, n, cfg.patch_len, cfg.horizon)
        self.aux_loss = torch.zeros(())

    def _patches(self, x: Tensor) -> Tensor:  # [B, L, C] -> [B, C, N, P], instance-normalised
        mean, std = x.mean(1, keepdim=True), x.std(1, keepdim=True, unbiased=False) + 1e-5
        z = ((x - mean) / std).transpose(1, 2)
        return z.reshape(*z.shape[:2], -1, self.cfg.patch_len), mean, std

    def forward(self, x: Tensor, exog: Tensor | None = None) -> Tensor:
        cfg = self.cfg
        _check_window(x, cfg.lookback, "x")
        if (exog is None) != (cfg.num_exog == 0):
            raise ValueError(
                f"the model was built with num_exog={cfg.num_exog}; pass exog [B, L, {cfg.num_exog}] exactly when num_exog > 0"
            )
        b, _, c = x.shape
        patches, mean, std = self._patches(x)
        h = (self.embed(patches) + self.position).reshape(b * c, -1, cfg.dim)
        memory = None
        if exog is not None:
            _check_window(exog, cfg.lookback, "exog")
            if exog.shape[2] != cfg.num_exog:
                raise ValueError(
                    f"exog has {exog.shape[2]} columns, the model num_exog={cfg.num_exog}"
                )
            ex = self._patches(exog)[0]  # [B, X, N, P]
            ex = self.exog_embed(ex) + self.exog_position + self.exog_id
            memory = ex.reshape(b, -1, cfg.dim).repeat_interleave(c, dim=0)
        aux = []
        for block in self.blocks:
            h = block(h, memory)
            aux.append(block.moe.aux_loss)
        self.aux_loss = torch.stack(aux).mean()
        y = self.decoder(self.norm(h)).reshape(b, c, cfg.horizon).transpose(1, 2)
        return y * std + mean


__all__ = [
    "DLinear",
    "DwConvExpert",
    "FANExpert",
    "FANLayer",
    "MLPExpert",
    "MoHELayer",
    "MoHETS",
    "MoHETSBlock",
    "MoHETSConfig",
    "PatchDecoder",
    "moving_average",
]
