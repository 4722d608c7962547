"""AdvMoE: a robust MoE-CNN trained with router-expert alternating TRADES.

"Robust Mixture-of-Expert Training for Convolutional Neural Networks" (Zhang et al., ICCV 2023,
arXiv 2308.10110; reference code ``OPTML-Group/Robust-MoE-CNN``). Every convolution of the CNN
holds ``num_experts`` channel groups (experts) of ``round(ratio * width)`` output channels each;
a router reads the layer's input and picks one group per image (argmax, one-hot in the forward,
the gradient passed straight through to the router's softmax, as the code's ``GetMask``). The
next layer then sees only the chosen group's channels, so an image costs about ratio² of the
dense convolution's multiply-adds plus the router's.

Training (:func:`advmoe_step`, the code's ``train_moe.py::trainer``), per batch:

1. expert step: x_adv by PGD-sign from x + 0.001·N(0, 1), maximising
   KL(model(x) ‖ model(x_adv)) + Σ_l KL(router_l(x) ‖ router_l(x_adv)); then update the experts
   (and the classifier head) with CE(model(x), y) + β·KL(model(x) ‖ model(x_adv)) (TRADES);
2. router step: x_adv regenerated the same way; update the routers with
   α·Σ_l CE(router_l(x), y mod num_experts) + β·Σ_l KL(router_l(x) ‖ router_l(x_adv)).

Each step updates only its parameter group; the other group's ``requires_grad`` is off for the
step, so its parameters (and optimiser state) stay bit-identical. :func:`trades_step` is the
plain adversarial-training arm: one TRADES update of all parameters jointly.

Departures from the paper and why:

- Router: the code's router is a small ResNet (widths 16/32/64) over the image. On 8x8 digits we
  give each MoE convolution its own router of one 3x3 convolution (``router_dim`` channels),
  ReLU, global average pooling and a linear map to the expert scores, reading that layer's input
  (per image, as in the paper). It keeps the router's cost small next to 8x8 convolutions.
- No batch normalisation (the CNN is three convolutions deep); the optimiser is the caller's
  choice (the paper: SGD, lr 0.1, cosine, 100 epochs; the experiment documents its own).
- Router label: we keep the released code's quirk ``y mod num_experts`` (it pushes each class
  to a fixed expert, an arbitrary but consistent assignment).
- KL direction: the notes write KL(model(x_adv) ‖ model(x)) in PyTorch's argument order; the
  TRADES code computes KLDivLoss(log_softmax(adv), softmax(clean)) = KL(p_clean ‖ p_adv),
  summed and divided by the batch size. We use that, ``batchmean``, in :func:`trades_kl`.
- Inference cost is counted (:func:`count_macs`): multiply-adds of convolutions and linear maps
  only (no ReLU, pooling or bias adds), the MoE convolution counting its chosen group only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adversarial import AttackConfig, pgd_linf, trades_kl, trades_loss  # re-exported


# ----------------------------------------------------------------------------- model
@dataclass(frozen=True)
class AdvMoEConfig:
    """A 3-conv CNN for small images. ``num_experts == 1`` with ``ratio == 1`` is the dense CNN.

    widths: dense output channels per convolution (each expert keeps round(ratio · width));
    a 2x2 max-pool follows the second convolution; global average pooling and a linear head
    end the network.
    """

    in_channels: int = 1
    num_classes: int = 10
    widths: tuple[int, ...] = (16, 32, 32)
    num_experts: int = 2
    ratio: float = 0.5
    router_dim: int = 8
    kernel_size: int = 3

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if not self.widths or any(w < 1 for w in self.widths):
            raise ValueError(f"widths must be a non-empty tuple of positive ints: {self.widths}")
        if any(round(self.ratio * w) < 1 for w in self.widths):
            raise ValueError(f"ratio {self.ratio} leaves an expert with no channel: {self.widths}")
        if self.in_channels < 1 or self.num_classes < 2 or self.router_dim < 1:
            raise ValueError(
                "need in_channels >= 1, num_classes >= 2 and router_dim >= 1, got "
                f"{self.in_channels}, {self.num_classes}, {self.router_dim}"
            )
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1, got {self.kernel_size}")

    @property
    def expert_widths(self) -> tuple[int, ...]:
        return tuple(round(self.ratio * w) for w in self.widths)


class ConvRouter(nn.Module):
    """Per-image expert scores: 3x3 conv (router_dim) -> ReLU -> global average pool -> linear."""

    def __init__(self, in_channels: int, num_experts: int, router_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, router_dim, 3, padding=1)
        self.fc = nn.Linear(router_dim, num_experts)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


class MoEConv2d(nn.Module):
    """A convolution of ``num_experts`` channel groups of ``out_channels``; one group per image.

    Training computes every group and keeps the chosen one through a straight-through one-hot
    mask (the router gets gradients); eval mode gathers the chosen group's filters per image and
    convolves only those (the same output, the counted cost). With one expert it is a plain
    convolution and has no router.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_experts: int,
        *,
        kernel_size: int = 3,
        router_dim: int = 8,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_experts, self.kernel_size = num_experts, kernel_size
        conv = nn.Conv2d(in_channels, out_channels * num_experts, kernel_size)
        self.weight, self.bias = conv.weight, conv.bias  # Conv2d's default init, per group
        self.router = ConvRouter(in_channels, num_experts, router_dim) if num_experts > 1 else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(output [B, out_channels, H, W], router logits [B, num_experts] or None)."""
        pad = self.kernel_size // 2
        if self.router is None:
            return F.conv2d(x, self.weight, self.bias, padding=pad), None
        logits = self.router(x)
        choice = logits.argmax(-1)
        if not self.training:
            return self._gathered(x, choice, pad), logits
        probs = logits.softmax(-1)
        mask = F.one_hot(choice, self.num_experts).to(probs) + probs - probs.detach()
        out = F.conv2d(x, self.weight, self.bias, padding=pad)
        out = out.unflatten(1, (self.num_experts, self.out_channels))
        return (out * mask[:, :, None, None, None]).sum(1), logits

    def _gathered(self, x: Tensor, choice: Tensor, pad: int) -> Tensor:
        b = x.shape[0]
        if b == 0:
            return x.new_zeros(0, self.out_channels, *x.shape[2:])
        weight = self.weight.unflatten(0, (self.num_experts, self.out_channels))[choice]
        bias = self.bias.unflatten(0, (self.num_experts, self.out_channels))[choice]
        out = F.conv2d(
            x.reshape(1, -1, *x.shape[2:]),
            weight.flatten(0, 1),
            bias.flatten(),
            padding=pad,
            groups=b,
        )
        return out.reshape(b, self.out_channels, *out.shape[2:])


class AdvMoEOutput(NamedTuple):
    logits: Tensor
    router_logits: list[Tensor]  # one [B, num_experts] per MoE convolution; empty when dense


class MoECNN(nn.Module):
    """The MoE-CNN of AdvMoE (arXiv 2308.10110); see the module docstring for its departures."""

    def __init__(self, config: AdvMoEConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or AdvMoEConfig()
        ins = (c.in_channels, *c.expert_widths[:-1])
        self.convs = nn.ModuleList(
            MoEConv2d(i, o, c.num_experts, kernel_size=c.kernel_size, router_dim=c.router_dim)
            for i, o in zip(ins, c.expert_widths, strict=True)
        )
        self.head = nn.Linear(c.expert_widths[-1], c.num_classes)

    def forward(self, x: Tensor) -> AdvMoEOutput:
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"x must be [B, {self.config.in_channels}, H, W] images, got {tuple(x.shape)}"
            )
        router_logits = []
        for i, conv in enumerate(self.convs):
            x, logits = conv(x)
            x = F.relu(x)
            if i == 1:
                x = F.max_pool2d(x, 2)
            if logits is not None:
                router_logits.append(logits)
        return AdvMoEOutput(self.head(x.mean((2, 3))), router_logits)

    def router_parameters(self) -> list[nn.Parameter]:
        return [
            p for conv in self.convs if conv.router is not None for p in conv.router.parameters()
        ]

    def expert_parameters(self) -> list[nn.Parameter]:
        routers = {id(p) for p in self.router_parameters()}
        return [p for p in self.parameters() if id(p) not in routers]


# ----------------------------------------------------------------------------- cost
def count_macs(model: nn.Module, x: Tensor) -> float:
    """Multiply-adds per image of one eval-mode forward on ``x``, counted by forward hooks.

    nn.Conv2d: output elements · in_channels/groups · k²; nn.Linear: in · out per row;
    MoEConv2d: output elements (of the chosen group) · in_channels · k². Activations, pooling
    and bias adds are not counted.
    """
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x must hold at least one image, got shape {tuple(x.shape)}")
    total = [0]

    def hook(module: nn.Module, _inputs, output) -> None:
        out = output[0] if isinstance(output, tuple) else output
        if isinstance(module, MoEConv2d):
            total[0] += out.numel() * module.in_channels * module.kernel_size**2
        elif isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total[0] += out.numel() * module.in_channels // module.groups * k
        else:
            total[0] += out.numel() * module.in_features

    kinds = (MoEConv2d, nn.Conv2d, nn.Linear)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total[0] / x.shape[0]


# ----------------------------------------------------------------------------- training
@contextlib.contextmanager
def _only_trainable(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Turn requires_grad off for every parameter of ``model`` outside ``params``."""
    keep = {id(p) for p in params}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _router_kl(adv: list[Tensor], clean: list[Tensor]) -> Tensor:
    return sum((trades_kl(a, c) for a, c in zip(adv, clean, strict=True)), torch.zeros(()))


def trades_attack(
    model: MoECNN,
    x: Tensor,
    attack: AttackConfig,
    *,
    with_routers: bool,
    generator: torch.Generator | None = None,
) -> Tensor:
    """TRADES's x_adv: PGD from x + 0.001·N(0,1) on KL(model(x) ‖ model(x_adv)), plus the
    routers' KL when ``with_routers`` (AdvMoE). The model is put in train mode (masked path)."""
    model.train()
    with torch.no_grad():
        clean = model(x)

    def objective(x_adv: Tensor) -> Tensor:
        out = model(x_adv)
        loss = trades_kl(out.logits, clean.logits)
        if with_routers:
            loss = loss + _router_kl(out.router_logits, clean.router_logits)
        return loss

    return pgd_linf(
        objective,
        x,
        eps=attack.eps,
        step_size=attack.step_size,
        steps=attack.steps,
        start="normal",
        generator=generator,
    )


def trades_step(
    model: MoECNN,
    x: Tensor,
    y: Tensor,
    optimizer: torch.optim.Optimizer,
    attack: AttackConfig,
    *,
    beta: float = 6.0,
    generator: torch.Generator | None = None,
) -> float:
    """Plain TRADES adversarial training: one joint update of whatever ``optimizer`` holds."""
    x_adv = trades_attack(model, x, attack, with_routers=False, generator=generator)
    loss = trades_loss(model(x).logits, model(x_adv).logits, y, beta)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def advmoe_step(
    model: MoECNN,
    x: Tensor,
    y: Tensor,
    expert_optimizer: torch.optim.Optimizer,
    router_optimizer: torch.optim.Optimizer,
    attack: AttackConfig,
    *,
    beta: float = 6.0,
    alpha: float = 6.0,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """One AdvMoE batch: the expert TRADES step, then the router step. Returns both losses."""
    if model.config.num_experts < 2:
        raise ValueError("advmoe_step needs a MoECNN with num_experts >= 2 (it trains routers)")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    expert_loss = expert_step(model, x, y, expert_optimizer, attack, beta=beta, generator=generator)
    router_loss = router_step(
        model, x, y, router_optimizer, attack, beta=beta, alpha=alpha, generator=generator
    )
    return expert_loss, router_loss


def expert_step(
    model: MoECNN,
    x: Tensor,
    y: Tensor,
    optimizer: torch.optim.Optimizer,
    attack: AttackConfig,
    *,
    beta: float = 6.0,
    generator: torch.Generator | None = None,
) -> float:
    """AdvMoE step 1: x_adv against model + routers, TRADES update of the experts only."""
    x_adv = trades_attack(model, x, attack, with_routers=True, generator=generator)
    with _only_trainable(model, model.expert_parameters()):
        loss = trades_loss(model(x).logits, model(x_adv).logits, y, beta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def router_step(
    model: MoECNN,
    x: Tensor,
    y: Tensor,
    optimizer: torch.optim.Optimizer,
    attack: AttackConfig,
    *,
    beta: float = 6.0,
    alpha: float = 6.0,
    generator: torch.Generator | None = None,
) -> float:
    """AdvMoE step 2: x_adv regenerated; alpha·CE(router, y mod E) + beta·KL on routers only."""
    x_adv = trades_attack(model, x, attack, with_routers=True, generator=generator)
    target = y % model.config.num_experts  # the released code's router label
    with _only_trainable(model, model.router_parameters()):
        clean, adv = model(x).router_logits, model(x_adv).router_logits
        ce = sum((F.cross_entropy(r, target) for r in clean), torch.zeros(()))
        loss = alpha * ce + beta * _router_kl(adv, clean)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return float((model(x).logits.argmax(-1) == y).float().mean())


def pgd_accuracy(
    model: MoECNN,
    x: Tensor,
    y: Tensor,
    attack: AttackConfig,
    *,
    generator: torch.Generator | None = None,
) -> float:
    """Accuracy under PGD-linf on the cross-entropy (uniform start), attacking the eval-mode
    model: the router's hard choice is part of what the attack faces (gradients still reach the
    input through the chosen experts)."""
    model.eval()
    x_adv = pgd_linf(
        lambda z: F.cross_entropy(model(z).logits, y),
        x,
        eps=attack.eps,
        step_size=attack.step_size,
        steps=attack.steps,
        generator=generator,
    )
    return accuracy(model, x_adv, y)


__all__ = [
    "AdvMoEConfig",
    "AdvMoEOutput",
    "AttackConfig",
    "ConvRouter",
    "MoECNN",
    "MoEConv2d",
    "accuracy",
    "advmoe_step",
    "count_macs",
    "expert_step",
    "pgd_accuracy",
    "pgd_linf",
    "router_step",
    "trades_attack",
    "trades_kl",
    "trades_loss",
    "trades_step",
]
