"""What every model here shares: its output type, aux-loss collection, parameter counts."""

from __future__ import annotations

import dataclasses

import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100


@dataclasses.dataclass
class ModelOutput:
    """What every ``gatelab.models`` model returns from ``forward``.

    logits: [B, S, vocab_size] for the LM, [B, num_classes] for the classifiers.
    loss: the task loss (cross entropy, the mean over real tokens or examples) when targets
        were given, else None; 0 when no token or example is real.
    aux_loss: the sum over MoE layers of their weighted auxiliary losses (0-dim; 0 for a
        model without MoE and in eval mode, where MoE layers compute none).
    aux_losses: the same split by loss name ("balance", "z", ...), summed over layers.

    Train on ``total_loss`` (= loss + aux_loss); log ``loss``.
    """

    logits: Tensor
    loss: Tensor | None
    aux_loss: Tensor
    aux_losses: dict[str, Tensor]

    @property
    def total_loss(self) -> Tensor:
        if self.loss is None:
            raise ValueError("total_loss needs targets: call model(inputs, targets)")
        return self.loss + self.aux_loss


def collect_aux_losses(model: nn.Module, like: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """(sum, by name) of the weighted aux losses the MoE layers of ``model`` computed in
    their last forward; a 0-dim zero like ``like`` when there are none."""
    by_name: dict[str, Tensor] = {}
    for moe in moe_modules(model).values():
        for name, value in moe.aux_losses.items():
            by_name[name] = by_name[name] + value if name in by_name else value
    total = sum(by_name.values()) if by_name else like.new_zeros(())
    return total, by_name


def masked_cross_entropy(logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """Cross entropy of logits [N, C] against targets [N], the mean over the real rows:
    ``mask`` True (when given) and target != -100. 0 when no row is real."""
    per_row = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="none")
    real = targets != IGNORE_INDEX
    if mask is not None:
        real = real & mask.bool()
    real = real.to(per_row.dtype)
    return (per_row * real).sum() / real.sum().clamp_min(1.0)


def num_parameters(module: nn.Module) -> int:
    """Distinct parameters (a tied tensor counted once)."""
    return sum(p.numel() for p in module.parameters())


def moe_modules(module: nn.Module) -> dict[str, nn.Module]:
    """The gatelab ``MoE`` layers inside ``module``, by qualified name, in module order."""
    from ..layers import MoE

    return {name: m for name, m in module.named_modules() if isinstance(m, MoE)}


def num_active_parameters(module: nn.Module) -> int:
    """The parameters one token passes through.

    Every parameter outside MoE layers counts in full. Inside an MoE layer: the router's
    parameters (every token is scored against every expert), ``top_k`` of the E experts
    (for expert-choice routing ``top_k`` is the average number of experts per token), and
    the shared expert. Capacity drops are not subtracted: this is the count at full
    routing. An embedding counts in full here; the LM's method can leave it out.
    """
    total = num_parameters(module)
    for moe in moe_modules(module).values():
        bank = num_parameters(moe.experts)
        per_expert = bank // moe.num_experts
        total -= bank - moe.top_k * per_expert
    return total


def as_images(x: Tensor, channels: int, size: int, who: str, config: str) -> Tensor:
    """Images [B, C, S, S] from themselves, [B, S, S] (one channel) or flattened [B, C*S*S];
    ``who`` and ``config`` name the model and its config class in the errors."""
    c, s = channels, size
    if not isinstance(x, Tensor) or not x.is_floating_point():
        kind = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{who} expects a float tensor of images, got {kind}")
    if x.dim() == 2 and x.shape[1] == c * s * s:
        return x.view(-1, c, s, s)
    if x.dim() == 3 and c == 1 and tuple(x.shape[1:]) == (s, s):
        return x.unsqueeze(1)
    if x.dim() == 4 and tuple(x.shape[1:]) == (c, s, s):
        return x
    raise ValueError(
        f"{who} expects images [B, {c}, {s}, {s}], [B, {s}, {s}] (one channel) or "
        f"flattened [B, {c * s * s}], got {tuple(x.shape)}; set image_size and "
        f"in_channels in {config} to match the data"
    )
