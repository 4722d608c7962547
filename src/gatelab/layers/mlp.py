"""MLP blocks with one constructor vocabulary: ``dim``, ``hidden_dim``, ``act``, ``bias``, ``dropout``.

After timm's ``layers/mlp.py``: one file of MLP variants a model picks by name.

- :class:`Mlp`: ``down_proj(act(up_proj(x)))``, the transformer / ViT MLP.
- :class:`GluMlp`: the GLU family, ``down(act(x W_gate) * (x W_up))``, with the named variants
  SwiGLU, GeGLU, ReGLU and bilinear.
- :class:`SharedExpert`: an MoE's dense shared expert, a GluMlp or Mlp with an optional
  per-token sigmoid gate.
- :class:`ResidualMlpBlock`: ``x + Mlp(norm(x))``; :class:`BottleneckBlock` is its inverted
  bottleneck (Scaling MLPs), :class:`HourglassBlock` its narrow bottleneck (Hourglass MLP).
- :class:`BottleneckMLP` and :class:`HourglassMLP`: lift -> residual blocks -> readout, the
  classifiers of those two papers.
- :class:`HourglassFFN`: K stacked hourglass blocks that replace a transformer FFN.

``MLPS`` registers them by name (``MLPS.get("geglu")(dim=64, hidden_dim=128)``) so recipes
and model configs can name a block. Every input is [..., dim]; the classifiers flatten
[B, ...] examples.

One parameter spelling for every two-layer FFN, the expert bank's (``gatelab.experts``):
``gate_up_proj`` (gated: gate rows, then up rows) or ``up_proj`` (plain), then
``down_proj``. A dense FFN of this family is one expert of a bank as is, and
``gatelab.experts.read_dense_ffn`` reads it into bank layout by a reshape. State dicts of
earlier versions (``fc1``/``fc2``; the shared expert's ``gate_proj``/``up_proj``) load
through key maps registered on the modules (``gatelab.legacy``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..experts import ACTIVATION_NAMES, activation
from ..legacy import rename_on_load
from ..registry import Registry
from ._checks import check_dropout, check_positive

MLPS: Registry[Callable[..., nn.Module]] = Registry("mlp block")

# GLU variant -> the activation of its gate ("GLU Variants Improve Transformer", Table 1).
GLU_VARIANTS = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu", "bilinear": "identity"}
NORMS = ("layer", "rms")

__all__ = [
    "GLU_VARIANTS",
    "MLPS",
    "BottleneckBlock",
    "BottleneckMLP",
    "GluMlp",
    "HourglassBlock",
    "HourglassFFN",
    "HourglassMLP",
    "Mlp",
    "ResidualMlpBlock",
    "SharedExpert",
]


def _act(name: str) -> Callable[[Tensor], Tensor]:
    if name == "identity":
        return nn.Identity()
    if name not in ACTIVATION_NAMES:
        valid = ", ".join((*ACTIVATION_NAMES, "identity"))
        raise ValueError(f"unknown act {name!r}; valid names are: {valid}")
    return activation(name)


def _check_input(who: str, x: Tensor, dim: int) -> None:
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != dim:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{who} expects inputs [..., dim={dim}], got {shape}")


def _norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rms":
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}; valid: {', '.join(NORMS)}")


# -- Plain and gated MLPs -----------------------------------------------------------------

# Keys of Mlp state dicts written before issue 14 -> today's.
_MLP_KEYS = {
    "fc1.weight": "up_proj.weight",
    "fc1.bias": "up_proj.bias",
    "fc2.weight": "down_proj.weight",
    "fc2.bias": "down_proj.bias",
}


@MLPS.register("mlp")
class Mlp(nn.Module):
    """``dropout(down_proj(dropout(act(up_proj(x)))))``: the MLP of a transformer block
    (timm's ``Mlp``, whose ``fc1``/``fc2`` are ``up_proj``/``down_proj`` here, the names of
    a plain expert bank; state dicts with ``fc1``/``fc2`` still load).

    ``hidden_dim`` defaults to 4 * dim, ``out_dim`` to dim. Parameters:
    ``dim * hidden_dim + hidden_dim * out_dim`` (+ ``hidden_dim + out_dim`` with ``bias``).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int | None = None,
        out_dim: int | None = None,
        act: str = "gelu",
        bias: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        check_positive("Mlp", dim=dim, hidden_dim=hidden_dim, out_dim=out_dim)
        check_dropout("Mlp", dropout)
        self.dim, self.act = dim, act
        self.hidden_dim = hidden_dim or 4 * dim
        self.out_dim = out_dim or dim
        self.act_fn = _act(act)
        self.up_proj = nn.Linear(dim, self.hidden_dim, bias=bias)  # [hidden_dim, dim]
        self.down_proj = nn.Linear(self.hidden_dim, self.out_dim, bias=bias)
        self.drop = nn.Dropout(dropout)
        rename_on_load(self, _MLP_KEYS)

    def forward(self, x: Tensor) -> Tensor:
        _check_input("Mlp", x, self.dim)
        return self.drop(self.down_proj(self.drop(self.act_fn(self.up_proj(x)))))


class GluMlp(nn.Module):
    """``dropout(down_proj(act(x W_gate) * (x W_up)))``: the GLU family.

    "GLU Variants Improve Transformer" (Shazeer, arXiv 2002.05202). ``variant`` names the
    gate's activation: "swiglu" (silu), "geglu" (gelu), "reglu" (relu), "bilinear" (none);
    a gatelab activation name ("gelu_tanh", ...) is accepted as well. The gate and up
    projections are one fused ``gate_up_proj`` (gate rows first), the layout of the LM's
    ``SwiGLU`` and of a gatelab expert bank, so a trained block copies into an expert as is.

    ``hidden_dim`` defaults to round(8 * dim / 3), Shazeer's choice: three matrices of
    that width hold as many weights as a 4 * dim two-matrix MLP. Parameters:
    ``3 * dim * hidden_dim`` for out_dim = dim (+ ``2 * hidden_dim + out_dim`` with
    ``bias``). Departure: no bias by default (the paper's T5 setting); ``bias=True`` adds them.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int | None = None,
        out_dim: int | None = None,
        variant: str = "swiglu",
        bias: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        check_positive("GluMlp", dim=dim, hidden_dim=hidden_dim, out_dim=out_dim)
        check_dropout("GluMlp", dropout)
        self.variant = variant
        self.act = GLU_VARIANTS.get(variant, variant)
        if self.act not in (*ACTIVATION_NAMES, "identity"):
            valid = ", ".join((*GLU_VARIANTS, *ACTIVATION_NAMES))
            raise ValueError(f"GluMlp: unknown variant {variant!r}; valid: {valid}")
        self.act_fn = _act(self.act)
        self.dim = dim
        self.hidden_dim = hidden_dim or round(8 * dim / 3)
        self.out_dim = out_dim or dim
        self.gate_up_proj = nn.Linear(dim, 2 * self.hidden_dim, bias=bias)
        self.down_proj = nn.Linear(self.hidden_dim, self.out_dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}"

    def forward(self, x: Tensor) -> Tensor:
        _check_input("GluMlp", x, self.dim)
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.drop(self.down_proj(self.drop(self.act_fn(gate) * up)))


for _name in GLU_VARIANTS:
    MLPS.register(_name)(functools.partial(GluMlp, variant=_name))


class SharedExpert(nn.Module):
    """An MoE's shared expert: a dense :class:`GluMlp` (``glu=True``, gate activation
    ``act``) or :class:`Mlp`, ``ffn``, optionally scaled by a per-token sigmoid gate.

    ``gated=True`` is Qwen2-MoE's shared expert: sigmoid(x w_g) * FFN(x) with
    ``shared_expert_gate`` = Linear(D, 1, bias=False). DeepSeek's shared experts are
    ungated (several of them are one FFN of their summed width). Parameters ``ffn.*`` in
    the family's spelling; a state dict with HF's (and earlier gatelab's) ``gate_proj``,
    ``up_proj``, ``down_proj`` is read through a key map (the gate and up rows fused).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        act: str = "silu",
        glu: bool = True,
        bias: bool = False,
        gated: bool = False,
    ):
        super().__init__()
        if act not in ACTIVATION_NAMES:  # an expert's activation, as the routed experts'
            raise ValueError(f"unknown act {act!r}; valid names are: {', '.join(ACTIVATION_NAMES)}")
        self.glu = glu
        self.ffn = (
            GluMlp(dim, hidden_dim, variant=act, bias=bias)
            if glu
            else Mlp(dim, hidden_dim, act=act, bias=bias)
        )
        self.shared_expert_gate = nn.Linear(dim, 1, bias=False) if gated else None
        self._register_load_state_dict_pre_hook(self._accept_split_layout)

    def forward(self, x: Tensor) -> Tensor:
        out = self.ffn(x)
        if self.shared_expert_gate is not None:
            out = torch.sigmoid(self.shared_expert_gate(x)) * out
        return out

    def _accept_split_layout(self, state_dict: dict[str, Tensor], prefix: str, *args) -> None:
        # gate_proj / up_proj / down_proj (before issue 14, and HF) -> ffn.* (gate rows first).
        for kind in ("weight", "bias"):
            gate = state_dict.pop(f"{prefix}gate_proj.{kind}", None)
            up = state_dict.pop(f"{prefix}up_proj.{kind}", None)
            down = state_dict.pop(f"{prefix}down_proj.{kind}", None)
            if gate is not None and up is not None:
                state_dict[f"{prefix}ffn.gate_up_proj.{kind}"] = torch.cat([gate, up])
            elif up is not None:
                state_dict[f"{prefix}ffn.up_proj.{kind}"] = up
            if down is not None:
                state_dict[f"{prefix}ffn.down_proj.{kind}"] = down


# -- Residual blocks ----------------------------------------------------------------------


class ResidualMlpBlock(nn.Module):
    """``x + Mlp(norm(x))`` at width ``dim`` through a hidden width ``hidden_dim``.

    The pre-norm residual MLP block both papers below build on; ``norm`` is "layer"
    (LayerNorm, with bias) or "rms". ``branch(x)`` is the residual branch alone.
    Parameters: the norm's (2 * dim or dim) plus :class:`Mlp` (dim, hidden_dim, dim).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        act: str = "gelu",
        bias: bool = True,
        dropout: float = 0.0,
        norm: str = "layer",
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        who = type(self).__name__
        check_positive(who, dim=dim, hidden_dim=hidden_dim)
        if norm not in NORMS:
            raise ValueError(f"{who}: norm must be one of {NORMS}, got {norm!r}")
        self.dim, self.hidden_dim = dim, hidden_dim
        self.norm = _norm(norm, dim, norm_eps)
        self.mlp = Mlp(dim, hidden_dim, dim, act=act, bias=bias, dropout=dropout)

    def branch(self, x: Tensor) -> Tensor:
        return self.mlp(self.norm(x))

    def forward(self, x: Tensor) -> Tensor:
        _check_input(type(self).__name__, x, self.dim)
        return x + self.branch(x)


@MLPS.register("bottleneck")
class BottleneckBlock(ResidualMlpBlock):
    """The inverted-bottleneck block of "Scaling MLPs: A Tale of Inductive Bias" (Bachmann,
    Anagnostidis, Hofmann; arXiv 2306.13575): ``x + W2 GELU(W1 LN(x))``, W1: dim -> 4 dim.

    ``hidden_dim`` defaults to 4 * dim, the reference's expansion (gregorbachmann/
    scaling_mlps, ``BottleneckBlock``); LayerNorm and biases as there.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int | None = None,
        act: str = "gelu",
        bias: bool = True,
        dropout: float = 0.0,
        norm: str = "layer",
        norm_eps: float = 1e-5,
    ):
        super().__init__(dim, hidden_dim or 4 * dim, act, bias, dropout, norm, norm_eps)


@MLPS.register("hourglass")
class HourglassBlock(ResidualMlpBlock):
    """The wide-narrow-wide block of "Hourglass MLPs" (MediaTek, arXiv 2510.01796):
    ``z + W_up act(W_down norm(z))`` with the residual stream at the wide width ``dim``
    (the paper's d_z) and a narrow ``hidden_dim`` (d_h < d_z; default dim // 2).

    Here ``mlp.up_proj`` is the paper's W_down (dim -> hidden_dim) and ``mlp.down_proj``
    its W_up (the family's names say which side is the hidden layer, not which is wider).
    A ``hidden_dim`` that is not narrower than ``dim`` raises: that is a conventional or
    inverted block (:class:`BottleneckBlock`).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int | None = None,
        act: str = "gelu",
        bias: bool = True,
        dropout: float = 0.0,
        norm: str = "layer",
        norm_eps: float = 1e-5,
    ):
        check_positive("HourglassBlock", dim=dim, hidden_dim=hidden_dim)
        hidden_dim = hidden_dim or max(1, dim // 2)
        if hidden_dim >= dim:
            raise ValueError(
                f"HourglassBlock: hidden_dim={hidden_dim} must be narrower than dim={dim} "
                "(wide-narrow-wide); use BottleneckBlock for hidden_dim >= dim"
            )
        super().__init__(dim, hidden_dim, act, bias, dropout, norm, norm_eps)


@MLPS.register("hourglass_ffn")
class HourglassFFN(nn.Module):
    """The hourglass FFN of "Hourglass FFN in Transformer LMs" (arXiv 2602.06471):
    ``num_blocks`` (K) stacked :class:`HourglassBlock` at the model width, each
    ``h <- h + W_up act(W_down norm(h))`` with ``hidden_dim`` < dim (the paper's range
    d_h / d_model ~ 0.4-0.6; default dim // 2).

    It replaces a transformer block's whole FFN sublayer, its pre-norm included (each
    sub-block has its own norm). So that it drops into the ``x + ffn(...)`` slot of a
    block, ``forward(x)`` returns the update ``h_K - x`` (the sum of the K branches) and
    the host must pass the un-normed stream: ``x + HourglassFFN(x)`` is the paper's FFN.
    Departures: RMSNorm and no biases by default, to match gatelab's LM (the paper's norm
    is not stated in the notes). Parameters: K * (dim + 2 * dim * hidden_dim) for those
    defaults.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int | None = None,
        num_blocks: int = 2,
        act: str = "gelu",
        bias: bool = False,
        dropout: float = 0.0,
        norm: str = "rms",
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        check_positive("HourglassFFN", num_blocks=num_blocks)
        self.dim, self.num_blocks = dim, num_blocks
        self.blocks = nn.ModuleList(
            HourglassBlock(dim, hidden_dim, act, bias, dropout, norm, norm_eps)
            for _ in range(num_blocks)
        )
        self.hidden_dim = self.blocks[0].hidden_dim

    def forward(self, x: Tensor) -> Tensor:
        _check_input("HourglassFFN", x, self.dim)
        h, update = x, torch.zeros_like(x)
        for block in self.blocks:
            step = block.branch(h)
            h, update = h + step, update + step
        return update


# -- Classifiers --------------------------------------------------------------------------


class BottleneckMLP(nn.Module):
    """The classifier of "Scaling MLPs: A Tale of Inductive Bias" (arXiv 2306.13575)::

        x = lift(flatten(example))            # input_dim -> dim
        x = block(x), num_blocks times        # BottleneckBlock: x + W2 GELU(W1 LN(x))
        logits = readout(x)                   # dim -> num_classes, no final norm

    as the reference's ``BottleneckMLP`` (gregorbachmann/scaling_mlps): B-12/Wi-1024 is
    ``dim=1024, num_blocks=12``. ``hidden_dim`` defaults to 4 * dim. Returns logits
    [B, num_classes] for inputs [B, input_dim] or [B, ...] with input_dim elements.

    ``fixed_lift=True`` freezes the lift at its random initialisation (a buffer
    ``lift_weight`` [dim, input_dim] ~ N(0, 1 / input_dim), no bias), the Hourglass MLP
    paper's option; it is then not a parameter and not counted. The trainable lift is an
    ``nn.Linear`` with bias.
    """

    block_cls: type[ResidualMlpBlock] = BottleneckBlock

    def __init__(
        self,
        input_dim: int,
        dim: int,
        num_blocks: int,
        num_classes: int,
        hidden_dim: int | None = None,
        act: str = "gelu",
        bias: bool = True,
        dropout: float = 0.0,
        norm: str = "layer",
        fixed_lift: bool = False,
    ):
        super().__init__()
        who = type(self).__name__
        check_positive(who, input_dim=input_dim, dim=dim, num_classes=num_classes)
        if not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(f"{who}: num_blocks must be an int >= 0, got {num_blocks!r}")
        self.input_dim, self.dim, self.fixed_lift = input_dim, dim, fixed_lift
        if fixed_lift:
            lift = torch.randn(dim, input_dim) / math.sqrt(input_dim)
            self.register_buffer("lift_weight", lift)
            self.lift = None
        else:
            self.lift = nn.Linear(input_dim, dim)
        self.blocks = nn.Sequential(
            *(self.block_cls(dim, hidden_dim, act, bias, dropout, norm) for _ in range(num_blocks))
        )
        self.readout = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        who = type(self).__name__
        if not isinstance(x, Tensor) or not x.is_floating_point():
            kind = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"{who} expects a float tensor, got {kind}")
        if x.dim() < 2 or math.prod(x.shape[1:]) != self.input_dim:
            raise ValueError(
                f"{who} expects [batch, {self.input_dim}] (or [batch, ...] with "
                f"{self.input_dim} elements per example), got {tuple(x.shape)}"
            )
        x = x.reshape(x.shape[0], self.input_dim)
        z = F.linear(x, self.lift_weight) if self.lift is None else self.lift(x)
        return self.readout(self.blocks(z))


class HourglassMLP(BottleneckMLP):
    """The Hourglass MLP of "Hourglass MLPs" (MediaTek, arXiv 2510.01796)::

        z = W_in x                               # lift to the wide d_z = dim
        z = z + W_up act(W_down norm(z))         # HourglassBlock, num_blocks times
        y = W_out z                              # readout

    The residual stream is wide (``dim``), the computation narrow (``hidden_dim`` < dim,
    default dim // 2). The paper reports that W_in can stay at its random initialisation:
    ``fixed_lift=True`` (see :class:`BottleneckMLP`). Departure: the paper's norm and
    biases are not given in the notes; LayerNorm and biases here, as in the Scaling-MLPs
    block, so the two differ only in their widths.

    The premise is a lift: ``dim < input_dim`` (a residual stream narrower than the input)
    raises a ValueError; a narrow residual stream is :class:`BottleneckMLP`'s shape.
    """

    block_cls = HourglassBlock

    def __init__(self, input_dim: int, dim: int, *args, **kwargs):
        if isinstance(input_dim, int) and isinstance(dim, int) and 0 < dim < input_dim:
            raise ValueError(
                f"HourglassMLP: dim={dim} is narrower than input_dim={input_dim}; the hourglass "
                f"lifts the input to a wider residual stream: give dim >= {input_dim}, or use "
                "BottleneckMLP for a narrow one"
            )
        super().__init__(input_dim, dim, *args, **kwargs)
