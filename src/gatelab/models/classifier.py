"""Image and vector classifiers: an MLP whose hidden layers can be MoE, and LeNet-5.

Both take a batch of examples and optional integer class targets and return a
:class:`~gatelab.models.ModelOutput` (logits [B, num_classes], cross-entropy loss).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..experts import ACTIVATION_NAMES, activation
from ..layers.mlp import MLPS
from .common import (
    ModelOutput,
    as_images,
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
)

# -- MLP ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MLPConfig(Config):
    """Every setting of :class:`MLPClassifier`; the keys of a recipe's ``[model]`` table.

    ``input_dim`` features in, ``hidden_dims`` the widths of the hidden representations,
    ``num_classes`` logits out, ``act`` (a gatelab activation name) and ``dropout``.
    ``moe_layers`` ("all", "none", "every_other" or indices into ``hidden_dims``) picks
    the hidden layers that are MoE; an MoE layer keeps its width, so
    ``hidden_dims[i]`` must equal the width before it. ``moe`` configures those layers: a
    :class:`~gatelab.models.MoEConfig` (a recipe's ``[model.moe]`` table, as for
    :class:`~gatelab.models.LMConfig`; here by default experts of width 128 and the
    balance loss alone); the experts are plain two-layer MLPs (``act``) of width
    ``moe.hidden_dim``. The flat keys of earlier versions (``num_experts``,
    ``expert_hidden_dim``, ... directly in ``[model]``) still work, with a deprecation message.

    ``block`` "linear" (default) makes every dense hidden layer ``act(Linear(x))``.
    "bottleneck" or "hourglass" (names in ``gatelab.layers.MLPS``) builds the residual MLPs
    of Scaling MLPs and Hourglass MLPs instead: a dense hidden layer that changes the width
    is a Linear lift (no activation), one that keeps it is that residual block (its own
    ``x + mlp(norm(x))``) with hidden width ``block_hidden_dim`` (0: the block's default,
    4 * width or width // 2).
    """

    input_dim: int = 64
    hidden_dims: list[int] = dataclasses.field(default_factory=lambda: [128, 128])
    num_classes: int = 10
    act: str = "gelu"
    dropout: float = 0.0
    moe_layers: Literal["all", "none", "every_other"] | list[int] = "none"
    moe: MoEConfig = dataclasses.field(
        default_factory=lambda: MoEConfig(hidden_dim=128, loss_weights={"balance": 0.01})
    )
    block: Literal["linear", "bottleneck", "hourglass"] = "linear"
    block_hidden_dim: int = 0

    _moved = FLAT_MOE_KEYS  # the flat MoE keys of earlier versions, now in ``moe``

    def validate(self) -> None:
        check_positive(self, "input_dim", "num_classes")
        for i, width in enumerate(self.hidden_dims):
            if width < 1:
                raise ConfigError(f"{self._key('hidden_dims')}[{i}] must be > 0, got {width}")
        check_choice(self._key("act"), self.act, ACTIVATION_NAMES)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{self._key('dropout')} must lie in [0, 1), got {self.dropout}")
        width = self.input_dim
        for i in range(len(self.hidden_dims)):
            if i in self.moe_layer_indices() and self.hidden_dims[i] != width:
                raise ConfigError(
                    f"{self._key('hidden_dims')}[{i}]={self.hidden_dims[i]}: hidden layer {i} "
                    f"is MoE, which keeps the width, so it must equal the width before it "
                    f"({width})"
                )
            width = self.hidden_dims[i]
        check_positive(self, "block_hidden_dim", allow_zero=True)
        narrow = [i for i, w in enumerate(self.hidden_dims) if w < self.input_dim]
        if self.block == "hourglass" and narrow:  # the paper's premise, as HourglassMLP's
            i = narrow[0]
            raise ConfigError(
                f"{self._key('hidden_dims')}[{i}]={self.hidden_dims[i]} is narrower than "
                f"input_dim={self.input_dim}: an hourglass lifts the input to a wider residual "
                f'stream; give widths >= {self.input_dim}, or block = "bottleneck"'
            )
        if self.block == "hourglass" and self.block_hidden_dim:
            for i, width in enumerate(self.hidden_dims):
                if self.block_hidden_dim >= width:
                    raise ConfigError(
                        f"{self._key('block_hidden_dim')}={self.block_hidden_dim}: hourglass "
                        f"blocks are narrow, so it must be < hidden_dims[{i}]={width}"
                    )
        self.moe_top_ks()
        if self.moe.router == "hash" and self.moe.router_kwargs.get("key", "token") == "token":
            raise ConfigError(
                f"{self._key('moe.router_kwargs')}: the classifier has no token ids to hash; "
                'use router_kwargs = { key = "position" }'
            )

    def moe_layer_indices(self) -> list[int]:
        """The sorted indices of the hidden layers that are MoE."""
        return resolve_layers(self.moe_layers, len(self.hidden_dims), self._key("moe_layers"))

    def moe_top_ks(self) -> list[int]:
        """K_max of each MoE layer, in the order of :meth:`moe_layer_indices`."""
        with nested_errors(type(self), "moe", MoEConfig):
            return self.moe.layer_top_ks(len(self.moe_layer_indices()))


class MLPClassifier(nn.Module):
    """An MLP classifier whose hidden layers are dense or MoE.

    A dense hidden layer is ``dropout(act(Linear(x)))``. An MoE hidden layer is the
    residual ``x + dropout(MoE(x))`` with two-layer MLP experts, as the FFN of a
    transformer block: it keeps the width, starts close to the identity, and passes a token
    whose expert slots were all dropped (capacity) through unchanged instead of zeroing it.
    The head is a Linear to ``num_classes`` logits. Inputs [B, input_dim], or [B, ...]
    with ``input_dim`` elements per example (e.g. 8x8 images), which are flattened.
    PyTorch's default initialisation.
    """

    def __init__(self, config: MLPConfig):
        super().__init__()
        if not isinstance(config, MLPConfig):
            raise TypeError(f"MLPClassifier takes an MLPConfig, got {type(config).__name__}")
        self.config = config
        moe = self.moe_indices = frozenset(config.moe_layer_indices())
        top_ks = dict(zip(config.moe_layer_indices(), config.moe_top_ks(), strict=True))
        self.act_fn = activation(config.act)
        self.drop = nn.Dropout(config.dropout)
        layers, width = [], config.input_dim
        for i, hidden in enumerate(config.hidden_dims):
            if i in moe:
                layers.append(
                    config.moe.build(width, top_k=top_ks[i], experts="mlp", act=config.act)
                )
            elif config.block != "linear" and hidden == width:
                layers.append(_residual_block(config, width))
            else:
                layers.append(nn.Linear(width, hidden))
            width = hidden
        self.layers = nn.ModuleList(layers)
        # Layers applied as they are: the lifts and residual blocks of a non-linear ``block``.
        self.as_is = frozenset(range(len(layers)) if config.block != "linear" else ()) - moe
        self.head = nn.Linear(width, config.num_classes)

    def forward(self, x: Tensor, targets: Tensor | None = None) -> ModelOutput:
        """x [B, input_dim] (or [B, ...] flattened) -> logits [B, num_classes]."""
        x = _flatten_examples(x, self.config.input_dim, "MLPClassifier")
        for i, layer in enumerate(self.layers):
            if i in self.as_is:
                x = layer(x)
                continue
            x = (
                x + self.drop(layer(x))
                if i in self.moe_indices
                else self.drop(self.act_fn(layer(x)))
            )
        logits = self.head(x)
        return _classifier_output(self, logits, targets)

    def moe_layers(self) -> dict[str, nn.Module]:
        """The MoE modules by qualified name ("layers.1", ...)."""
        return moe_modules(self)

    def num_parameters(self) -> int:
        return num_parameters(self)

    def num_active_parameters(self) -> int:
        """See :func:`gatelab.models.common.num_active_parameters`."""
        return num_active_parameters(self)


def _residual_block(config: MLPConfig, width: int) -> nn.Module:
    """A ``config.block`` residual block (gatelab.layers.MLPS) of width ``width``."""
    factory = MLPS.get(config.block)
    hidden = config.block_hidden_dim or None
    return factory(width, hidden, act=config.act, dropout=config.dropout)


# -- LeNet-5 ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LeNet5Config(Config):
    """Every setting of :class:`LeNet5`; the keys of a recipe's ``[model]`` table.

    ``image_size`` (square inputs, H = W), ``in_channels``, ``num_classes``.
    ``input_adapt`` brings the input to the 32x32 the network is built for: "pad" centres
    it with zeros (at most 32), "resize" interpolates bilinearly, "auto" pads images of at
    least 28 pixels (the paper's MNIST setup) and resizes smaller ones (8x8 digits).
    ``act``: the paper's "scaled_tanh" (1.7159 tanh(2a/3)), "tanh" or "relu".
    ``c3_table``: connect C3 to S2 through the paper's Table I (else fully).
    ``dropout`` before the output layer (not in the paper; 0 by default).
    """

    image_size: int = 28
    in_channels: int = 1
    num_classes: int = 10
    input_adapt: Literal["auto", "pad", "resize"] = "auto"
    act: Literal["scaled_tanh", "tanh", "relu"] = "scaled_tanh"
    c3_table: bool = True
    dropout: float = 0.0

    def validate(self) -> None:
        check_positive(self, "image_size", "in_channels", "num_classes")
        if self.adapt_method() == "pad" and self.image_size > 32:
            raise ConfigError(
                f"{self._key('image_size')}={self.image_size}: 'pad' needs images of at most "
                "32 pixels; use input_adapt = 'resize'"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{self._key('dropout')} must lie in [0, 1), got {self.dropout}")

    def adapt_method(self) -> str:
        """ "pad" or "resize": what ``input_adapt`` means for this ``image_size``."""
        if self.input_adapt != "auto":
            return self.input_adapt
        return "pad" if self.image_size >= 28 else "resize"


def c3_connections() -> Tensor:
    """LeNet-5's Table I: [16, 6] bool, True where C3 map j reads S2 map i.

    Maps 0-5 read 3 contiguous S2 maps, 6-11 read 4 contiguous ones, 12-14 read 4
    discontinuous ones, and 15 reads all six (contiguous modulo 6).
    """
    table = torch.zeros(16, 6, dtype=torch.bool)
    for j in range(6):
        table[j, [(j + i) % 6 for i in range(3)]] = True
        table[6 + j, [(j + i) % 6 for i in range(4)]] = True
    for j, inputs in enumerate(([0, 1, 3, 4], [1, 2, 4, 5], [0, 2, 3, 5])):
        table[12 + j, inputs] = True
    table[15] = True
    return table


class Subsample(nn.Module):
    """LeNet-5's S2/S4: the mean of each 2x2 block times a trainable per-map coefficient,
    plus a trainable per-map bias (the paper sums the four inputs: the factor 4 is in the
    coefficient)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, 2) * self.weight.view(-1, 1, 1) + self.bias.view(-1, 1, 1)


def scaled_tanh(x: Tensor) -> Tensor:
    """LeNet-5's squashing function f(a) = 1.7159 tanh(2a / 3)."""
    return 1.7159 * torch.tanh(x * (2.0 / 3.0))


_LENET_ACTS = {"scaled_tanh": scaled_tanh, "tanh": torch.tanh, "relu": F.relu}


class LeNet5(nn.Module):
    """LeNet-5: C1 conv 6@5x5 -> S2 -> C3 conv 16@5x5 -> S4 -> C5 conv 120@5x5 -> F6 84 ->
    output, on 32x32 inputs.

    "Gradient-Based Learning Applied to Document Recognition" (LeCun, Bottou, Bengio,
    Haffner; Proc. IEEE 86(11), 1998). Kept: the layer sizes, the trainable subsampling
    (coefficient and bias per map), the scaled tanh after every layer, and C3's sparse
    connection table (Table I: the masked weights are stored but stay zero, so C3 stores
    16*6*25 + 16 parameters and uses the paper's 1,516). Departures:

    - Output: a Linear layer to ``num_classes`` logits trained with cross entropy, instead
      of the paper's Euclidean RBF units with fixed 7x12 bitmap prototypes and its MAP loss.
    - Initialisation: PyTorch's defaults instead of U(-2.4/F_in, 2.4/F_in).
    - Input size: the network needs 32x32. 28x28 MNIST is zero-padded by 2 on each side,
      as in the paper (digits at most 20x20 in a 28x28 field, input field 32x32). The
      paper never saw 8x8 inputs: those (scikit-learn digits) are resized bilinearly to
      32x32 so that the digit fills the field as MNIST's does; padding would leave it a
      few pixels wide after S2. ``LeNet5Config.input_adapt`` chooses.
    - Optional dropout before the output layer and other activations (``act``).

    Inputs: [B, H, W], [B, C, H, W], or [B, C*H*W] flattened, with H = W = image_size.
    """

    def __init__(self, config: LeNet5Config):
        super().__init__()
        if not isinstance(config, LeNet5Config):
            raise TypeError(f"LeNet5 takes a LeNet5Config, got {type(config).__name__}")
        self.config = config
        self.act_fn = _LENET_ACTS[config.act]
        self.c1 = nn.Conv2d(config.in_channels, 6, 5)
        self.s2 = Subsample(6)
        self.c3 = nn.Conv2d(6, 16, 5)
        self.s4 = Subsample(16)
        self.c5 = nn.Conv2d(16, 120, 5)
        self.f6 = nn.Linear(120, 84)
        self.drop = nn.Dropout(config.dropout)
        self.output = nn.Linear(84, config.num_classes)
        if config.c3_table:
            mask = c3_connections().float()[:, :, None, None].expand(16, 6, 5, 5).clone()
            self.register_buffer("c3_mask", mask, persistent=False)
            with torch.no_grad():
                self.c3.weight.mul_(mask)
                # fan_in of a map that reads n of the 6 inputs is n*25, not 150: rescale
                # PyTorch's default bound 1/sqrt(fan_in) accordingly.
                reads = mask[:, :, 0, 0].sum(dim=1).view(16, 1, 1, 1)
                self.c3.weight.mul_(torch.sqrt(6.0 / reads))
        else:
            self.c3_mask = None

    def extra_repr(self) -> str:
        c = self.config
        return f"image_size={c.image_size}, input_adapt={c.adapt_method()!r}, act={c.act!r}"

    def adapt(self, x: Tensor) -> Tensor:
        """[B, C, H, W] images of ``image_size`` -> [B, C, 32, 32]."""
        size = self.config.image_size
        if size == 32:
            return x
        if self.config.adapt_method() == "resize":
            return F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        before = (32 - size) // 2
        after = 32 - size - before
        return F.pad(x, (before, after, before, after))

    def forward(self, x: Tensor, targets: Tensor | None = None) -> ModelOutput:
        """Images (see the class docstring) -> logits [B, num_classes]."""
        x = self.adapt(self._as_images(x))
        f = self.act_fn
        c3_weight = self.c3.weight if self.c3_mask is None else self.c3.weight * self.c3_mask
        x = f(self.s2(f(self.c1(x))))
        x = f(self.s4(f(F.conv2d(x, c3_weight, self.c3.bias))))
        x = f(self.c5(x)).flatten(1)
        x = self.drop(f(self.f6(x)))
        return _classifier_output(self, self.output(x), targets)

    def _as_images(self, x: Tensor) -> Tensor:
        c = self.config
        return as_images(x, c.in_channels, c.image_size, "LeNet5", "LeNet5Config")

    def num_parameters(self) -> int:
        """Stored parameters (C3's masked weights included)."""
        return num_parameters(self)

    def num_active_parameters(self) -> int:
        """Parameters the forward uses: C3's masked-out weights left out."""
        unused = 0 if self.c3_mask is None else int((self.c3_mask == 0).sum())
        return num_parameters(self) - unused


# -- Shared -------------------------------------------------------------------------------


def _flatten_examples(x: Tensor, features: int, who: str) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        kind = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{who} expects a float tensor, got {kind}")
    if x.dim() < 2 or math.prod(x.shape[1:]) != features:
        raise ValueError(
            f"{who} expects [batch, {features}] (or [batch, ...] with {features} elements per "
            f"example), got {tuple(x.shape)}; set input_dim to match the data"
        )
    return x.reshape(x.shape[0], features)


def _classifier_output(model: nn.Module, logits: Tensor, targets: Tensor | None) -> ModelOutput:
    aux_loss, aux_losses = collect_aux_losses(model, logits)
    loss = None
    if targets is not None:
        if tuple(targets.shape) != (logits.shape[0],):
            raise ValueError(
                f"targets must be class ids [{logits.shape[0]}], got {tuple(targets.shape)}"
            )
        loss = masked_cross_entropy(logits, targets)
    return ModelOutput(logits, loss, aux_loss, aux_losses)
