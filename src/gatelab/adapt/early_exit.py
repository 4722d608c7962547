"""Early exit with learned exit gates trained jointly with the exit heads (JEI-DNN).

"Jointly-Learned Exit and Inference for a Dynamic Neural Network" (Regol, Chataoui, Coates;
ICLR 2024; reference code ``networkslab/dynn``; its arXiv id is not in our notes). A frozen
backbone gets an intermediate inference module (IM, an exit head) after some of its blocks and
a gate per IM:

- gate: g_l = sigmoid(Linear([p_max, entropy, margin, entropy_pow])) of IM l's softmax, the
  four features detached (``entropy_pow`` is the entropy of p² / Σp², as in the code);
- P(exit at l) = g_l · Π_{j<l}(1 - g_j), and the final head takes the rest;
- gate targets: l* = argmin_l [CE_l + λ·cost_l] per sample, cost_l the normalised compute of
  stopping at l (the final exit costs 1); gate l's target is 1 for l ≥ l* ("exit subsequent"),
  trained with BCE whose positive terms are weighted by the batch's zeros-to-ones ratio (the
  code's balancing);
- IM loss: each IM's CE weighted by P(exit at l), rescaled per sample so that the sample's
  total equals its unweighted sum;
- schedule: a warm-up of the IMs alone (plain summed CE), then alternating gate and IM phases;
- inference: the hardened gate: exit at the first l with g_l >= 0.5 (``threshold``).

Choices where the notes or code leave room (each tested): P(exit at l) is the product form of
the notes, where one version of the code clips g_l to 1 - Σ_{j<l} g_j; the per-sample rescaling
ratio is detached, because with the ratio left in the graph (as in that code) the weights cancel
exactly in value and gradient and the loss reduces to the plain sum; cost_l counts the
multiply-adds of the blocks and of every exit head and gate run up to exit l (a measured
compute, rather than the code's layer index (l+1)/(L+1)); the final head's CE, a frozen part of
the backbone, is not in the IM loss. Calibration is measured by :func:`expected_calibration_error`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NUM_GATE_FEATURES = 4


def uncertainty_features(logits: Tensor) -> Tensor:
    """[T, 4] detached (p_max, entropy, margin, entropy_pow) of softmax(logits) [T, C]."""
    if logits.dim() != 2 or logits.shape[-1] < 2:
        raise ValueError(f"logits must be [T, C] with C >= 2, got {tuple(logits.shape)}")
    with torch.no_grad():
        p = logits.float().softmax(-1)
        top2 = p.topk(2, dim=-1).values
        entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)
        q = p.square() / p.square().sum(-1, keepdim=True)
        entropy_pow = -(q * q.clamp_min(1e-12).log()).sum(-1)
        return torch.stack([top2[:, 0], entropy, top2[:, 0] - top2[:, 1], entropy_pow], -1)


class ExitGate(nn.Module):
    """JEI-DNN's learnable uncertainty gate: a logit from the four uncertainty features."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(NUM_GATE_FEATURES, 1)

    def forward(self, exit_logits: Tensor) -> Tensor:
        return self.linear(uncertainty_features(exit_logits)).squeeze(-1)


def _linear_macs(module: nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


class EarlyExitNet(nn.Module):
    """A frozen backbone of ``blocks`` and a ``final_head``, with exit heads and gates.

    ``exit_heads[i]`` reads the output of block ``exits_after[i]`` (block indices, increasing,
    before the last block); the final exit is ``final_head`` after the last block. ``costs``
    gives the compute of stopping at each exit (L + 1 numbers, increasing, the last one the
    reference); by default the multiply-adds of the ``nn.Linear`` layers run up to that exit
    (blocks, exit heads, gates), normalised so the final exit costs 1.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        final_head: nn.Module,
        exit_heads: Sequence[nn.Module],
        exits_after: Sequence[int],
        costs: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if len(blocks) < 2:
            raise ValueError(f"need at least 2 blocks to exit early, got {len(blocks)}")
        exits_after = [int(i) for i in exits_after]
        if len(exit_heads) != len(exits_after) or not exit_heads:
            raise ValueError(
                f"need one exits_after index per exit head (at least one), got "
                f"{len(exit_heads)} heads and {len(exits_after)} indices"
            )
        if sorted(set(exits_after)) != exits_after or not (
            0 <= exits_after[0] and exits_after[-1] < len(blocks) - 1
        ):
            raise ValueError(
                f"exits_after must be increasing block indices in [0, {len(blocks) - 2}] (the "
                f"last block feeds the final head), got {exits_after}"
            )
        self.blocks = nn.ModuleList(blocks)
        self.final_head = final_head
        self.exit_heads = nn.ModuleList(exit_heads)
        self.gates = nn.ModuleList(ExitGate() for _ in exit_heads)
        self.exits_after = exits_after
        self.blocks.requires_grad_(False)
        self.final_head.requires_grad_(False)
        costs = self._default_costs() if costs is None else [float(c) for c in costs]
        if len(costs) != len(exit_heads) + 1 or any(
            b <= a for a, b in zip(costs, costs[1:], strict=False)
        ):
            raise ValueError(
                f"costs must be {len(exit_heads) + 1} increasing numbers (one per exit, the "
                f"final exit last), got {costs}"
            )
        self.register_buffer("costs", torch.tensor(costs) / costs[-1])

    @property
    def num_exits(self) -> int:
        """Exits including the final head."""
        return len(self.exit_heads) + 1

    def _default_costs(self) -> list[float]:
        block = [_linear_macs(b) for b in self.blocks]
        if not all(block):
            raise ValueError("blocks without nn.Linear layers: pass costs explicitly")
        gate = NUM_GATE_FEATURES
        costs, spent = [], 0
        for i, after in enumerate(self.exits_after):
            start = self.exits_after[i - 1] + 1 if i else 0
            spent += sum(block[start : after + 1]) + _linear_macs(self.exit_heads[i]) + gate
            costs.append(spent)
        costs.append(spent + sum(block[self.exits_after[-1] + 1 :]) + _linear_macs(self.final_head))
        return costs

    def exit_logits(self, x: Tensor) -> list[Tensor]:
        """The logits of every exit, the final head's last: L + 1 tensors [T, C]."""
        out, h = [], x
        heads = dict(zip(self.exits_after, self.exit_heads, strict=True))
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i in heads:
                out.append(heads[i](h))
        out.append(self.final_head(h))
        return out

    def gate_logits(self, logits: Sequence[Tensor]) -> Tensor:
        """[T, L] gate logits of the L intermediate exits."""
        return torch.stack([g(z) for g, z in zip(self.gates, logits, strict=False)], -1)

    def forward(self, x: Tensor) -> Tensor:
        return self.predict(x)[0]

    def predict(self, x: Tensor, threshold: float = 0.5) -> tuple[Tensor, Tensor]:
        """Hardened gates: the logits of the exit each sample takes and its index [T]."""
        logits = self.exit_logits(x)
        exits = first_exit(torch.sigmoid(self.gate_logits(logits)), threshold)
        return pick_exit(logits, exits), exits


def _check_threshold(threshold: float) -> None:
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")


def first_exit(scores: Tensor, threshold: float) -> Tensor:
    """Index of the first of the L intermediate exits whose score is >= threshold, else L."""
    _check_threshold(threshold)
    hit = scores >= threshold
    last = torch.full_like(hit[:, :1], True)
    return torch.cat([hit, last], -1).int().argmax(-1)


def pick_exit(logits: Sequence[Tensor], exits: Tensor) -> Tensor:
    """The logits [T, C] of exit ``exits[t]`` for every sample t."""
    stacked = torch.stack(list(logits), 1)
    return stacked[torch.arange(len(exits)), exits]


def confidence_exit(logits: Sequence[Tensor], threshold: float) -> Tensor:
    """The baseline: exit at the first intermediate head whose max softmax >= threshold."""
    p_max = torch.stack([z.softmax(-1).amax(-1) for z in logits[:-1]], -1)
    return first_exit(p_max, threshold)


def exit_probabilities(gate_probs: Tensor) -> Tensor:
    """[T, L + 1]: P(exit at l) = g_l Π_{j<l}(1 - g_j); the final exit takes the rest."""
    survive = torch.cumprod(1 - gate_probs, -1)
    before = torch.cat([torch.ones_like(survive[:, :1]), survive[:, :-1]], -1)
    return torch.cat([gate_probs * before, survive[:, -1:]], -1)


def gate_targets(ce: Tensor, costs: Tensor, tradeoff: float) -> tuple[Tensor, Tensor]:
    """l* = argmin_l CE_l + λ cost_l over the L + 1 exits ([T]) and the exit-subsequent targets
    [T, L]: 1 for the gates at and after l*, 0 before."""
    if tradeoff < 0:
        raise ValueError(f"tradeoff (λ) must be >= 0, got {tradeoff}")
    best = (ce + tradeoff * costs).argmin(-1)
    gates = torch.arange(ce.shape[1] - 1, device=ce.device)
    return best, (gates[None, :] >= best[:, None]).float()


def gate_loss(gate_logits: Tensor, targets: Tensor) -> Tensor:
    """BCE of the gates against the exit-subsequent targets, ones weighted by zeros / ones."""
    ones = targets.sum()
    ratio = (targets.numel() - ones) / ones.clamp_min(1.0)
    weight = torch.where(targets > 0, ratio, torch.ones_like(targets))
    bce = F.binary_cross_entropy_with_logits(gate_logits, targets, reduction="none")
    return (bce * weight).mean()


def weighted_exit_loss(logits: Sequence[Tensor], y: Tensor, p_exit: Tensor) -> Tensor:
    """Σ_l w_l CE_l over the intermediate exits, w ∝ P(exit at l) (detached) rescaled so each
    sample's total equals its plain Σ_l CE_l; averaged over samples."""
    ce = torch.stack([F.cross_entropy(z, y, reduction="none") for z in logits], -1)
    p = p_exit[:, : ce.shape[1]].detach()
    weighted = p * ce
    ratio = (ce.sum(-1) / weighted.sum(-1).clamp_min(1e-12)).detach()
    return (weighted * ratio[:, None]).sum(-1).mean()


def expected_calibration_error(confidence: Tensor, correct: Tensor, num_bins: int = 15) -> float:
    """ECE (Guo et al. 2017): Σ_b (n_b / n) |accuracy_b - mean confidence_b| over ``num_bins``
    equal-width bins of confidence in [0, 1] (bin b holds (b/B, (b+1)/B], the first bin 0 too).
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    confidence, correct = confidence.flatten().double(), correct.flatten().double()
    if confidence.shape != correct.shape:
        raise ValueError(f"confidence {confidence.shape} and correct {correct.shape} differ")
    if not len(confidence):
        return 0.0
    if confidence.min() < 0 or confidence.max() > 1:
        raise ValueError("confidence must lie in [0, 1]")
    bins = (torch.ceil(confidence * num_bins) - 1).clamp(0, num_bins - 1).long()
    ece = 0.0
    for b in bins.unique():
        inside = bins == b
        gap = correct[inside].mean() - confidence[inside].mean()
        ece += inside.double().mean().item() * abs(gap.item())
    return ece


def _batches(n: int, batch_size: int, steps: int, gen: torch.Generator):
    for _ in range(steps):
        yield torch.randint(0, n, (min(batch_size, n),), generator=gen)


def train_exit_heads(
    model: EarlyExitNet, x: Tensor, y: Tensor, *, steps: int, lr: float = 3e-3, seed: int = 0
) -> None:
    """Warm-up: the exit heads alone, plain Σ_l CE_l (also the baseline's heads)."""
    params = list(model.exit_heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for idx in _batches(len(x), 128, steps, gen):
        logits = model.exit_logits(x[idx])[:-1]
        loss = sum(F.cross_entropy(z, y[idx]) for z in logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def train_jei(
    model: EarlyExitNet,
    x: Tensor,
    y: Tensor,
    *,
    tradeoff: float,
    rounds: int = 5,
    gate_steps: int = 100,
    head_steps: int = 100,
    lr: float = 3e-3,
    batch_size: int = 128,
    seed: int = 0,
) -> list[dict[str, float]]:
    """JEI-DNN's alternating phases after the warm-up: each round trains the gates against
    the targets of trade-off λ = ``tradeoff``, then the exit heads with the weighted loss.
    The backbone stays frozen. Returns the last losses of each round."""
    if rounds < 1 or gate_steps < 1 or head_steps < 1:
        raise ValueError(
            f"rounds, gate_steps, head_steps must be >= 1, got {rounds}, {gate_steps}, {head_steps}"
        )
    if tradeoff < 0:
        raise ValueError(f"tradeoff (λ) must be >= 0, got {tradeoff}")
    gate_opt = torch.optim.AdamW(model.gates.parameters(), lr=lr)
    head_opt = torch.optim.AdamW(model.exit_heads.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(rounds):
        for idx in _batches(len(x), batch_size, gate_steps, gen):
            with torch.no_grad():
                logits = model.exit_logits(x[idx])
                ce = torch.stack([F.cross_entropy(z, y[idx], reduction="none") for z in logits], -1)
            _, targets = gate_targets(ce, model.costs, tradeoff)
            g_loss = gate_loss(model.gate_logits(logits), targets)
            gate_opt.zero_grad(set_to_none=True)
            g_loss.backward()
            gate_opt.step()
        for idx in _batches(len(x), batch_size, head_steps, gen):
            logits = model.exit_logits(x[idx])
            with torch.no_grad():
                p_exit = exit_probabilities(torch.sigmoid(model.gate_logits(logits)))
            h_loss = weighted_exit_loss(logits[:-1], y[idx], p_exit)
            head_opt.zero_grad(set_to_none=True)
            h_loss.backward()
            head_opt.step()
        history.append({"gate_loss": g_loss.item(), "head_loss": h_loss.item()})
    return history


def evaluate_exits(model: EarlyExitNet, logits: Sequence[Tensor], exits: Tensor, y: Tensor) -> dict:
    """Accuracy, mean compute (normalised, final exit = 1), ECE and exit shares of a policy."""
    chosen = pick_exit(logits, exits)
    p = chosen.softmax(-1)
    correct = p.argmax(-1) == y
    return {
        "accuracy": correct.float().mean().item(),
        "compute": model.costs[exits].mean().item(),
        "ece": expected_calibration_error(p.amax(-1), correct),
        "exit_share": torch.bincount(exits, minlength=model.num_exits).div(len(y)).tolist(),
    }


__all__ = [
    "EarlyExitNet",
    "ExitGate",
    "confidence_exit",
    "evaluate_exits",
    "exit_probabilities",
    "expected_calibration_error",
    "first_exit",
    "gate_loss",
    "gate_targets",
    "pick_exit",
    "train_exit_heads",
    "train_jei",
    "uncertainty_features",
    "weighted_exit_loss",
]
