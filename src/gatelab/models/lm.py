"""A decoder-only language model whose FFN is dense or MoE, layer by layer.

The model a reader holds in their head at once (after nanoGPT's ``model.py``)::

    h = embed(ids)                                   # [B, S, D]
    for block in blocks:                             # num_layers times
        h = h + attn(rms_norm(h))                    # causal, multi-head, RoPE on q and k
        h = h + ffn(rms_norm(h))                     # SwiGLU MLP, or a gatelab MoE
    logits = rms_norm(h) @ embed.weight.T            # LM head tied to the embedding

``LMConfig`` holds every choice as a plain value, one field per key of a recipe's TOML
table; ``LM(config)`` builds the model; ``dense_equivalent(config)`` gives the dense model
with the same active parameters, the baseline an MoE LM is compared against.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.attention import GatedAttention, rope_cache
from ..layers.attention import apply_rope as apply_rope  # re-exported (models.apply_rope)
from ..layers.mlp import MLPS, GluMlp, HourglassFFN
from ..routing.schedules import attach_moe_schedules, check_moe_schedules
from .common import (
    ModelOutput,
    collect_aux_losses,
    masked_cross_entropy,
    moe_modules,
    num_active_parameters,
    num_parameters,
)
from .config import (
    FLAT_MOE_KEYS,
    Config,
    ConfigError,
    MoEConfig,
    check_choice,
    check_positive,
    nested_errors,
    resolve_layers,
    unknown_key_message,
)

# LMConfig.ffn -> the gatelab.layers.MLPS name of the dense FFN ("swiglu": GluMlp).
LM_FFNS = {
    "swiglu": "swiglu",
    "geglu": "geglu",
    "reglu": "reglu",
    "bilinear": "bilinear",
    "mlp": "mlp",
    "hourglass": "hourglass_ffn",
}


@dataclasses.dataclass(frozen=True)
class LMConfig(Config):
    """Every setting of :class:`LM`; the fields are the keys of a recipe's ``[model]`` table.

    Sizes: ``vocab_size``, ``dim`` (D), ``num_layers``, ``num_heads`` (D must divide by it,
    into an even head width for RoPE), ``max_seq_len`` (the RoPE table's length),
    ``ffn_hidden_dim`` (hidden width of the dense SwiGLU FFNs).

    MoE: ``moe_layers`` picks the layers whose FFN is a gatelab ``MoE``: "all", "none",
    "every_other" (layers 1, 3, 5, ...) or a list of indices. Those layers are configured
    by ``moe``, a :class:`~gatelab.models.MoEConfig` (a recipe's ``[model.moe]`` table:
    ``num_experts`` SwiGLU experts of width ``hidden_dim``, ``top_k``, ``router``,
    ``router_kwargs``, ``capacity_factor``, a shared SwiGLU expert of width
    ``shared_hidden_dim``, ``loss_weights``, ``dispatcher``, ``k_schedule``,
    ``k_schedule_min``). The flat keys of earlier versions (``num_experts = 8`` directly in
    ``[model]``, ``expert_hidden_dim``, ``shared_expert_dim``, ...: ``FLAT_MOE_KEYS``) still
    work, with a deprecation message naming the new key.
    ``schedules`` changes MoE settings over training steps (``gatelab.routing.schedules``;
    the Trainer advances them): ``capacity_factor`` of every MoE layer and ``top_k`` of
    every router, each a table such as ``{ kind = "step", values = [2.0, 1.25],
    boundaries = [500] }``.

    Block kinds (gatelab.layers): ``ffn`` names the dense FFN, one of "swiglu" (default),
    "geglu", "reglu", "bilinear" (:class:`~gatelab.layers.GluMlp`), "mlp"
    (:class:`~gatelab.layers.Mlp`, act from ``ffn_kwargs``) or "hourglass"
    (:class:`~gatelab.layers.HourglassFFN`: ``ffn_hidden_dim`` is its narrow width, < dim;
    ``ffn_kwargs = { num_blocks = K }``); ``ffn_kwargs`` go to its constructor.
    ``attn_gate`` "headwise" / "elementwise" puts the G1 output gate of Gated Attention
    (:class:`~gatelab.layers.GatedAttention`) on every attention layer, and ``num_kv_heads``
    > 0 makes it grouped-query attention; with the defaults ("none", 0) the attention is the
    fused-qkv :class:`CausalSelfAttention`, so existing checkpoints load unchanged.

    Training: ``dropout`` (embedding, attention weights, residual branches), ``rope_theta``,
    ``norm_eps`` of the RMSNorms, ``init_std`` (see :meth:`LM.reset_parameters`).

    The defaults are the demo's MoE LM (4 layers, width 256, 8 experts of width 512, top-2,
    byte vocabulary); ``ffn_hidden_dim`` = 1024 = top_k * moe.hidden_dim, so a mixed
    model built from them has a dense equivalent.
    """

    vocab_size: int = 256
    dim: int = 256
    num_layers: int = 4
    num_heads: int = 4
    max_seq_len: int = 256
    ffn_hidden_dim: int = 1024
    moe_layers: Literal["all", "none", "every_other"] | list[int] = "all"
    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)
    dropout: float = 0.0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    ffn: str = "swiglu"
    ffn_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    attn_gate: Literal["none", "headwise", "elementwise"] = "none"
    num_kv_heads: int = 0
    schedules: dict[str, Any] = dataclasses.field(default_factory=dict)

    _moved = FLAT_MOE_KEYS  # the flat MoE keys of earlier versions, now in ``moe``

    def validate(self) -> None:
        check_positive(self, "vocab_size", "dim", "num_layers", "num_heads", "max_seq_len")
        check_positive(self, "rope_theta", "norm_eps", "init_std")
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ConfigError(
                f"{self._key('dim')}={self.dim} must split into num_heads={self.num_heads} "
                "heads of an even width (RoPE rotates pairs of channels)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{self._key('dropout')} must lie in [0, 1), got {self.dropout}")
        moe = self.moe_layer_indices()
        if len(moe) < self.num_layers:
            check_positive(self, "ffn_hidden_dim")
        try:
            check_moe_schedules(self.schedules, self.moe.num_experts)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{self._key('schedules')}: {error}") from None
        self.moe_top_ks()
        self._check_blocks(dense_layers=len(moe) < self.num_layers)

    def _check_blocks(self, dense_layers: bool) -> None:
        """The block-kind fields: ffn, ffn_kwargs, attn_gate, num_kv_heads."""
        check_choice(self._key("ffn"), self.ffn, list(LM_FFNS))
        if self.ffn != "swiglu":
            fixed = ("self", "dim", "hidden_dim", "out_dim", "bias", "dropout", "variant")
            params = inspect.signature(MLPS.get(LM_FFNS[self.ffn])).parameters
            accepted = [n for n in params if n not in fixed]
            for name in self.ffn_kwargs:
                if name not in accepted:
                    where = f"{self._key('ffn_kwargs')} ({self.ffn!r})"
                    raise ConfigError(unknown_key_message(name, accepted, where))
        elif self.ffn_kwargs:
            raise ConfigError(f"{self._key('ffn_kwargs')}: the swiglu FFN takes no options")
        if dense_layers and self.ffn == "hourglass" and self.ffn_hidden_dim >= self.dim:
            raise ConfigError(
                f"{self._key('ffn_hidden_dim')}={self.ffn_hidden_dim}: the hourglass FFN is "
                f"narrow, so it must be < dim={self.dim} (the paper uses 0.4-0.6 * dim)"
            )
        check_positive(self, "num_kv_heads", allow_zero=True)
        if self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"{self._key('num_kv_heads')}={self.num_kv_heads} must divide num_heads="
                f"{self.num_heads} (each key/value head serves a whole group of query heads)"
            )

    @property
    def gated_attention(self) -> bool:
        """True when the blocks use GatedAttention (a gate or grouped-query heads)."""
        return self.attn_gate != "none" or self.num_kv_heads > 0

    def moe_layer_indices(self) -> list[int]:
        """The sorted indices of the layers whose FFN is an MoE."""
        return resolve_layers(self.moe_layers, self.num_layers, self._key("moe_layers"))

    def moe_top_ks(self) -> list[int]:
        """K_max of each MoE layer, in the order of :meth:`moe_layer_indices`."""
        with nested_errors(type(self), "moe", MoEConfig):
            return self.moe.layer_top_ks(len(self.moe_layer_indices()))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


def dense_equivalent(config: LMConfig) -> LMConfig:
    """The dense LM config with the same active parameters as ``config``, up to the routers.

    Each MoE FFN becomes a dense SwiGLU FFN of hidden width
    ``moe.top_k * moe.hidden_dim + moe.shared_hidden_dim``: the same weights a token passes
    through. So ``LM(dense_equivalent(c)).num_active_parameters()`` equals
    ``LM(c).num_active_parameters()`` minus the MoE layers' router parameters (E * D per
    layer for the learned routers, E * D + E for ``topk_softmax`` with its bias, 0 for
    ``hash``). Every other field is kept. A mixed config (some dense layers) qualifies only
    when its dense layers already have that width, since one ``ffn_hidden_dim`` serves all.
    """
    moe = config.moe_layer_indices()
    if not moe:
        return config
    m = config.moe
    if m.k_schedule is not None:
        raise ConfigError(
            "dense_equivalent needs one top_k for every MoE layer; this config sets "
            f"moe.k_schedule={m.k_schedule!r}"
        )
    width = m.top_k * m.hidden_dim + m.shared_hidden_dim
    if len(moe) < config.num_layers and config.ffn_hidden_dim != width:
        raise ConfigError(
            f"dense_equivalent: the dense layers of this mixed config have ffn_hidden_dim="
            f"{config.ffn_hidden_dim}, but an MoE layer's dense equivalent needs "
            f"moe.top_k * moe.hidden_dim + moe.shared_hidden_dim = {width}; set ffn_hidden_dim="
            f"{width} so one width fits every layer"
        )
    if config.ffn != "swiglu" and len(moe) < config.num_layers:
        raise ConfigError(
            f"dense_equivalent: the dense layers of this mixed config use ffn={config.ffn!r}, "
            "but an MoE layer's dense equivalent is a SwiGLU FFN; use ffn = 'swiglu'"
        )
    return config.replace(moe_layers="none", ffn_hidden_dim=width, ffn="swiglu", ffn_kwargs={})


# -- Parts --------------------------------------------------------------------------------


# rope_cache and apply_rope live in gatelab.layers.attention and are re-exported here.


def dense_ffn(config: LMConfig) -> nn.Module:
    """The dense FFN ``config.ffn`` names, of hidden width ``ffn_hidden_dim``, no biases.

    "swiglu" is :class:`~gatelab.layers.GluMlp` (fused ``gate_up_proj``, gate rows first,
    the layout of an expert bank, so a dense FFN copies into an expert as is).
    """
    factory = MLPS.get(LM_FFNS[config.ffn])
    return factory(config.dim, config.ffn_hidden_dim, bias=False, **config.ffn_kwargs)


def attention(config: LMConfig) -> GatedAttention:
    """The attention of a block: :class:`~gatelab.layers.GatedAttention`, causal, RoPE.

    With the defaults (``attn_gate="none"``, ``num_kv_heads=0``) it is plain multi-head
    causal self-attention with one fused ``qkv_proj``, the former ``CausalSelfAttention``
    to the last bit, forward and backward (its ``qkv``/``proj`` checkpoints load through
    GatedAttention's key map).
    """
    return GatedAttention(
        config.dim,
        config.num_heads,
        config.num_kv_heads or None,
        gate=config.attn_gate,
        dropout=config.dropout,
        fused_qkv=not config.gated_attention,
    )


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, config: LMConfig, moe: bool, top_k: int | None = None):
        super().__init__()
        d = config.dim
        self.attn_norm = nn.RMSNorm(d, eps=config.norm_eps)
        self.attn = attention(config)
        self.ffn_norm = nn.RMSNorm(d, eps=config.norm_eps)
        self.is_moe = moe
        self.ffn = config.moe.build(d, top_k=top_k) if moe else dense_ffn(config)
        if isinstance(self.ffn, HourglassFFN):
            self.ffn_norm = nn.Identity()  # each hourglass sub-block norms its own input
        self.drop = nn.Dropout(config.dropout)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, token_ids: Tensor, token_mask: Tensor | None
    ) -> Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin))
        h = self.ffn_norm(x)
        h = self.ffn(h, token_ids=token_ids, token_mask=token_mask) if self.is_moe else self.ffn(h)
        return x + self.drop(h)


# -- The model ----------------------------------------------------------------------------


class LM(nn.Module):
    """Decoder-only transformer LM with dense or MoE FFNs (see the module docstring).

    Follows GPT-2 ("Language Models are Unsupervised Multitask Learners", Radford et al.
    2019) as nanoGPT writes it: pre-norm blocks, a final norm, the LM head tied to the
    token embedding ("Using the Output Embedding to Improve Language Models", Press & Wolf,
    arXiv 1608.05859), and its initialisation. Departs from GPT-2 where Llama ("LLaMA",
    Touvron et al., arXiv 2302.13971) does, because these train better at small scale:
    RMSNorm (Zhang & Sennrich, arXiv 1910.07467) for LayerNorm, rotary positions for learned
    position embeddings, a SwiGLU FFN for the GELU MLP, no biases. Any FFN can be a gatelab
    ``MoE`` (``LMConfig.moe_layers``).

    The head is ``F.linear(h, embed.weight)``: there is no separate head parameter, so the
    state dict holds the shared matrix once (``embed.weight``), as safetensors wants.
    ``lm_head_weight`` returns it.

    Causality: attention is causal, and so is every router that scores tokens one by one
    (topk, topk_softmax, sigmoid, hash). ``capacity_factor`` and the ``expert_choice``
    router let tokens compete for experts across the whole batch, so a later token can
    change how an earlier one is routed; use them knowing that (Zhou et al. note the same
    for expert choice in decoders).
    """

    def __init__(self, config: LMConfig):
        super().__init__()
        if not isinstance(config, LMConfig):
            raise TypeError(f"LM takes an LMConfig, got {type(config).__name__}")
        self.config = config
        moe = set(config.moe_layer_indices())
        top_ks = dict(zip(config.moe_layer_indices(), config.moe_top_ks(), strict=True))
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(config, i in moe, top_ks.get(i)) for i in range(config.num_layers)
        )
        for layer in moe_modules(self).values():
            attach_moe_schedules(layer, config.schedules)
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        cos, sin = rope_cache(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @property
    def lm_head_weight(self) -> Tensor:
        """The output projection [vocab_size, dim]: the token embedding itself."""
        return self.embed.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2's initialisation, as nanoGPT writes it.

        Every matrix (embedding, attention, FFN, expert banks, routers) ~ N(0, init_std);
        the projections that write into the residual stream (attention ``proj``, dense,
        expert and shared-expert ``down_proj``) ~ N(0, init_std / sqrt(2 * num_layers)),
        since each layer adds two of them. Vectors keep their modules' init (RMSNorm
        weights 1, router biases 0). A router at N(0, 0.02) starts close to uniform.
        """
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.num_layers)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                residual = name.endswith(
                    (
                        "attn.proj.weight",
                        "down_proj.weight",
                        "down_proj",
                        "o_proj.weight",
                        "fc2.weight",
                    )
                )
                nn.init.normal_(p, 0.0, residual_std if residual else std)

    def forward(
        self, ids: Tensor, targets: Tensor | None = None, token_mask: Tensor | None = None
    ) -> ModelOutput:
        """ids [B, S] int64 -> :class:`~gatelab.models.ModelOutput` (logits [B, S, V]).

        targets: [B, S] next-token ids (usually ids shifted left by one); -100 ignores one.
        token_mask: [B, S] True (or 1) for real tokens: padding is left out of the loss and
            of the MoE layers' routing statistics (aux losses). Attention is only causal, so
            put padding on the right, where no real token attends to it.
        """
        self._check_inputs(ids, targets, token_mask)
        mask = None if token_mask is None else token_mask.bool()
        h = self.drop(self.embed(ids))
        for block in self.blocks:
            h = block(h, self.rope_cos, self.rope_sin, ids, mask)
        logits = F.linear(self.norm(h), self.embed.weight)

        aux_loss, aux_losses = collect_aux_losses(self, logits)

        loss = None
        if targets is not None:
            flat_mask = None if mask is None else mask.flatten()
            loss = masked_cross_entropy(logits.flatten(0, 1), targets.flatten(), flat_mask)
        return ModelOutput(logits, loss, aux_loss, aux_losses)

    def _check_inputs(self, ids: Tensor, targets: Tensor | None, token_mask: Tensor | None):
        cfg = self.config
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            shape = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"LM expects token ids [batch, seq], got {shape}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"token ids must be an integer tensor, got {ids.dtype}")
        if ids.shape[1] > cfg.max_seq_len:
            raise ValueError(
                f"sequence length {ids.shape[1]} exceeds max_seq_len={cfg.max_seq_len}; "
                "cut the sequence or raise max_seq_len"
            )
        if ids.device.type == "cpu" and ids.numel() and not torch.compiler.is_compiling():
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= cfg.vocab_size:
                raise ValueError(
                    f"token ids must lie in [0, vocab_size={cfg.vocab_size}), got [{low}, {high}]"
                )
        for name, t in (("targets", targets), ("token_mask", token_mask)):
            if t is not None and tuple(t.shape) != tuple(ids.shape):
                raise ValueError(
                    f"{name} must have the shape of ids {tuple(ids.shape)}, got {tuple(t.shape)}"
                )

    def moe_layers(self) -> dict[str, nn.Module]:
        """The MoE modules by qualified name ("blocks.0.ffn", ...), in layer order."""
        return moe_modules(self)

    def num_parameters(self, include_embedding: bool = True) -> int:
        """All parameters; the tied embedding/head matrix counts once (or not at all)."""
        n = num_parameters(self)
        return n if include_embedding else n - self.embed.weight.numel()

    def num_active_parameters(self, include_embedding: bool = True) -> int:
        """The parameters one token passes through (see
        :func:`gatelab.models.common.num_active_parameters`): all dense parameters, and per
        MoE layer its router, ``top_k`` experts and the shared expert. The tied
        embedding/head matrix counts in full by default (the head multiplies all of it);
        ``include_embedding=False`` leaves it out."""
        n = num_active_parameters(self)
        return n if include_embedding else n - self.embed.weight.numel()


# -- Names of earlier versions ------------------------------------------------------------


def _causal_self_attention(dim: int, num_heads: int, dropout: float = 0.0) -> GatedAttention:
    return GatedAttention(dim, num_heads, gate="none", dropout=dropout, fused_qkv=True)


_REPLACED = {
    "SwiGLU": ("gatelab.layers.GluMlp (variant 'swiglu', the default)", GluMlp),
    "CausalSelfAttention": (
        "gatelab.layers.GatedAttention(dim, num_heads, gate='none', fused_qkv=True)",
        _causal_self_attention,
    ),
}


def __getattr__(name: str):
    if name not in _REPLACED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    where, obj = _REPLACED[name]
    warnings.warn(f"{__name__}.{name} is gone; use {where}", DeprecationWarning, stacklevel=2)
    return obj
