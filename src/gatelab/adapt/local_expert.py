"""Customise a frozen classifier with a small local expert and a gate that picks one of the two.

"A Mixture of Expert Approach for Low-Cost Customization of Deep Neural Networks" (Zhang,
Davoodi, Hu; arXiv 1811.00056). A global expert (GE, LeNet-5 in the paper) trained on
generic data is frozen; a small local expert (LE) is trained on a user's few samples; a
gating network (GN) decides, per input, whether the GE or the LE answers. Only the LE and
the GN are trained, on the device, so the user's data stays there.

The notes found neither the LE / GN architectures nor the gate's training signal nor whether
the gate is hard. Choices made here:

- **LE and GN inputs** (``source``): ``"pixels"`` reads the image average-pooled to
  ``pool_size`` x ``pool_size`` (a model separate from the GE, as the paper's LE); ``"global"``
  reads the GE's penultimate features (LeNet-5's F6, 84 units), a linear head on the frozen
  trunk. Both LE and GN are an MLP with one GELU hidden layer of ``hidden_dim`` /
  ``gate_hidden_dim`` units (0: a single Linear).
- **Training**: first the LE with cross entropy on the user's samples; then the GN, with GE and
  LE frozen, by the mixture likelihood of Jacobs et al. (1991)::

      p = sigmoid(GN(x));   loss = -log( p * P_LE(y | x) + (1 - p) * P_GE(y | x) )

  on the user's samples together with a few generic samples kept on the device, so the gate
  learns where the LE is right and the GE wrong (and vice versa) without hand-made labels.
- **Hardening**: in training the output is the mixture; at inference (``eval()``) each input
  goes to one expert, the LE when p > 0.5, as the paper's "determine whether an incoming data
  should be handled by GE or LE". The GE still runs on every input here (its features or its
  answer may be needed); the added size, not the saved compute, is what is measured.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.classifier import LeNet5

SOURCES = ("pixels", "global")


class LocalExpertOutput(NamedTuple):
    """logits [B, C] (the mixture's log-probabilities in training, the chosen expert's logits
    at inference), p_local [B] (the gate's probability of the LE), route_local [B] bool
    (where the hard gate sends the input to the LE), and both experts' logits."""

    logits: Tensor
    p_local: Tensor
    route_local: Tensor
    global_logits: Tensor
    local_logits: Tensor


def _mlp(dim: int, hidden_dim: int, out: int) -> nn.Module:
    if hidden_dim == 0:
        return nn.Linear(dim, out)
    # GELU, not ReLU: with a few hidden units, a ReLU gate can die (every unit off on every
    # input, a constant p); in a first run one simulated user's 4-unit ReLU gate did.
    return nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out))


class LocalExpertMoE(nn.Module):
    """A frozen LeNet-5 global expert, a small local expert and a hard gate between them.

    Args:
        global_expert: the trained :class:`~gatelab.models.LeNet5`; frozen here
            (``requires_grad=False``) and kept in eval mode.
        source: what the LE and GN read, "pixels" or "global" (see the module docstring).
        hidden_dim / gate_hidden_dim: hidden widths of the LE and the GN (0: linear).
        pool_size: the side the image is average-pooled to for ``source="pixels"``.
    """

    def __init__(
        self,
        global_expert: LeNet5,
        source: Literal["pixels", "global"] = "pixels",
        hidden_dim: int = 16,
        gate_hidden_dim: int = 4,
        pool_size: int = 8,
    ):
        super().__init__()
        if not isinstance(global_expert, LeNet5):
            raise TypeError(
                f"global_expert must be a gatelab LeNet5, got {type(global_expert).__name__}"
            )
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        for name, value in (("hidden_dim", hidden_dim), ("gate_hidden_dim", gate_hidden_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0 (0: a single Linear), got {value!r}")
        config = global_expert.config
        if source == "pixels" and not 1 <= pool_size <= config.image_size:
            raise ValueError(
                f"pool_size must lie in [1, image_size={config.image_size}], got {pool_size}"
            )
        self.global_expert = global_expert.requires_grad_(False)
        self.source, self.pool_size = source, pool_size
        num_classes = config.num_classes
        dim = (
            global_expert.f6.out_features
            if source == "global"
            else (config.in_channels * pool_size * pool_size)
        )
        self.local_expert = _mlp(dim, hidden_dim, num_classes)
        self.gate = _mlp(dim, gate_hidden_dim, 1)
        self.train(False)

    def train(self, mode: bool = True) -> LocalExpertMoE:
        super().train(mode)
        self.global_expert.eval()  # frozen
        return self

    def _global(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The GE's logits and its F6 features (after the activation)."""
        ge = self.global_expert
        seen: list[Tensor] = []
        hook = ge.f6.register_forward_hook(lambda m, i, o: seen.append(ge.act_fn(o)))
        try:
            logits = ge(x).logits
        finally:
            hook.remove()
        return logits, seen[0]

    def local_input(self, x: Tensor, features: Tensor) -> Tensor:
        if self.source == "global":
            return features
        images = self.global_expert._as_images(x)
        return F.adaptive_avg_pool2d(images, self.pool_size).flatten(1)

    def forward(self, x: Tensor) -> LocalExpertOutput:
        with torch.no_grad():
            ge_logits, features = self._global(x)
        z = self.local_input(x, features)
        le_logits = self.local_expert(z)
        p = torch.sigmoid(self.gate(z)).squeeze(-1)
        route = p > 0.5
        if self.training:
            mix = p[:, None] * le_logits.softmax(-1) + (1 - p[:, None]) * ge_logits.softmax(-1)
            logits = mix.clamp_min(1e-12).log()
        else:
            logits = torch.where(route[:, None], le_logits, ge_logits)
        return LocalExpertOutput(logits, p, route, ge_logits, le_logits)

    def added_parameters(self) -> int:
        """Parameters of the LE and the GN (what customisation adds)."""
        return sum(p.numel() for m in (self.local_expert, self.gate) for p in m.parameters())

    def added_share(self) -> float:
        """Added parameters as a share of the GE's (the parameters its forward uses)."""
        return self.added_parameters() / self.global_expert.num_active_parameters()


def _batches(n: int, steps: int, batch_size: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randint(n, (min(batch_size, n),), generator=gen)


def train_local_expert(
    moe: LocalExpertMoE,
    user_x: Tensor,
    user_y: Tensor,
    generic_x: Tensor,
    generic_y: Tensor,
    steps: int = 300,
    gate_steps: int = 300,
    lr: float = 1e-2,
    batch_size: int = 32,
    seed: int = 0,
) -> dict[str, float]:
    """Train the LE on the user's samples, then the GN by the mixture likelihood on the user's
    and the generic samples (module docstring). Returns the final losses of both stages."""
    if len(user_x) == 0 or len(user_x) != len(user_y):
        raise ValueError(
            f"need at least one user sample and one label per sample, got {len(user_x)} "
            f"samples and {len(user_y)} labels"
        )
    if len(generic_x) != len(generic_y):
        raise ValueError(f"generic_x has {len(generic_x)} samples, generic_y {len(generic_y)}")
    moe.train()
    opt = torch.optim.Adam(moe.local_expert.parameters(), lr=lr)
    with torch.no_grad():
        _, user_features = moe._global(user_x)
    user_z = moe.local_input(user_x, user_features)
    le_loss = torch.tensor(float("nan"))
    for idx in _batches(len(user_x), steps, batch_size, seed):
        le_loss = F.cross_entropy(moe.local_expert(user_z[idx]), user_y[idx])
        opt.zero_grad(set_to_none=True)
        le_loss.backward()
        opt.step()
    x, y = torch.cat([user_x, generic_x]), torch.cat([user_y, generic_y])
    opt = torch.optim.Adam(moe.gate.parameters(), lr=lr)
    moe.local_expert.requires_grad_(False)
    gate_loss = torch.tensor(float("nan"))
    try:
        for idx in _batches(len(x), gate_steps, batch_size, seed + 1):
            gate_loss = F.nll_loss(moe(x[idx]).logits, y[idx])
            opt.zero_grad(set_to_none=True)
            gate_loss.backward()
            opt.step()
    finally:
        moe.local_expert.requires_grad_(True)
    moe.eval()
    return {"local_loss": float(le_loss.detach()), "gate_loss": float(gate_loss.detach())}


__all__ = ["SOURCES", "LocalExpertMoE", "LocalExpertOutput", "train_local_expert"]
