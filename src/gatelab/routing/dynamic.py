"""Dynamic-k routing (a per-token number of experts) and layer-wise K_max schedules.

Two routers give each token between ``k_min`` and ``top_k`` (= K_max) experts in K_max
fixed-width slots, the unused slots ``EMPTY``:

- ``dynamic_k`` (:class:`DynamicKRouter`): DynaMoE's percentile-thresholded gating;
- ``top_p`` (:class:`TopPRouter`): the smallest set of experts holding a probability mass p.

``K_SCHEDULES`` maps a schedule name to a function ``(layer, num_layers, k_min, k_max) ->
K_max`` that spreads expert capacity over depth (DynaMoE's six schedules);
:func:`resolve_k_schedule` turns a name, a callable or an explicit list into one K_max per
MoE layer, the form the model configs use (``k_schedule = "descending"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..registry import Registry
from .routers import ROUTERS, Router
from .routing import EMPTY, Routing

KSchedule = Callable[[int, int, int, int], int]
K_SCHEDULES: Registry[KSchedule] = Registry("k schedule")


# -- layer-wise capacity schedules ---------------------------------------------------------


def _position(layer: int, num_layers: int) -> float:
    """Depth in [0, 1]: 0 for the first MoE layer, 1 for the last (1 when there is one)."""
    return layer / (num_layers - 1) if num_layers > 1 else 1.0


def _between(fraction: float, k_min: int, k_max: int) -> int:
    """k_min + fraction * (k_max - k_min), rounded half up (so the result is exact and
    does not depend on banker's rounding)."""
    return k_min + math.floor(fraction * (k_max - k_min) + 0.5)


@K_SCHEDULES.register("uniform")
def uniform(layer: int, num_layers: int, k_min: int, k_max: int) -> int:
    """Every layer gets k_max (the usual MoE, and DynaMoE's baseline)."""
    return k_max


@K_SCHEDULES.register("descending")
def descending(layer: int, num_layers: int, k_min: int, k_max: int) -> int:
    """k_max at the first layer, falling linearly to k_min at the last (k_max for one layer)."""
    if num_layers == 1:
        return k_max
    return _between(1.0 - _position(layer, num_layers), k_min, k_max)


@K_SCHEDULES.register("ascending")
def ascending(layer: int, num_layers: int, k_min: int, k_max: int) -> int:
    """k_min at the first layer, rising linearly to k_max at the last (k_max for one layer)."""
    return _between(_position(layer, num_layers), k_min, k_max)


@K_SCHEDULES.register("pyramid")
def pyramid(layer: int, num_layers: int, k_min: int, k_max: int) -> int:
    """k_max in the middle of the stack, k_min at both ends (a tent: 1 - |2 pos - 1|)."""
    if num_layers == 1:
        return k_max
    return _between(1.0 - abs(2.0 * _position(layer, num_layers) - 1.0), k_min, k_max)


@K_SCHEDULES.register("valley")
def valley(layer: int, num_layers: int, k_min: int, k_max: int) -> int:
    """The sixth schedule (gatelab's choice; the paper's sixth name was not found): the
    inverse pyramid, k_max at both ends and k_min in the middle (|2 pos - 1|)."""
    if num_layers == 1:
        return k_max
    return _between(abs(2.0 * _position(layer, num_layers) - 1.0), k_min, k_max)


@K_SCHEDULES.register("wave")
def wave(layer: int, num_layers: int, k_min: int, k_max: int) -> int:
    """Oscillates with depth, period two layers: k_max, k_min, k_max, ... ((1 + cos(pi l)) / 2).

    The paper's wave formula was not found; the shortest period makes the oscillation
    visible at every depth, including the 3-6 MoE layers of small models."""
    return _between(0.5 * (1.0 + math.cos(math.pi * layer)), k_min, k_max)


def resolve_k_schedule(
    schedule: str | Sequence[int] | KSchedule,
    num_layers: int,
    k_min: int,
    k_max: int,
    num_experts: int | None = None,
) -> list[int]:
    """K_max for each of ``num_layers`` MoE layers (indexed by position among the MoE layers).

    ``schedule`` is a name in ``K_SCHEDULES``, a function ``(layer, num_layers, k_min,
    k_max) -> int``, or an explicit list with one K_max per MoE layer. Every K_max must lie
    in 1..num_experts (when given) and a named schedule needs 1 <= k_min <= k_max.
    """
    for name, value in (("num_layers", num_layers), ("k_min", k_min), ("k_max", k_max)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if k_min > k_max:
        raise ValueError(f"k_min={k_min} exceeds k_max={k_max}; use k_min <= k_max")
    if num_experts is not None and k_max > num_experts:
        raise ValueError(
            f"k_max={k_max} exceeds num_experts={num_experts}; use k_max <= num_experts"
        )
    if isinstance(schedule, str):
        fn = K_SCHEDULES.get(schedule)
        values = [fn(i, num_layers, k_min, k_max) for i in range(num_layers)]
    elif callable(schedule):
        values = [schedule(i, num_layers, k_min, k_max) for i in range(num_layers)]
    elif isinstance(schedule, Sequence):
        values = list(schedule)
        if len(values) != num_layers:
            raise ValueError(
                f"the k schedule {values} gives {len(values)} values for {num_layers} MoE "
                f"layers; give exactly one K_max per MoE layer"
            )
    else:
        raise TypeError(
            f"a k schedule is a name ({', '.join(K_SCHEDULES.names())}), a function or a "
            f"list of ints, got {type(schedule).__name__}"
        )
    upper = num_experts if num_experts is not None else math.inf
    for i, k in enumerate(values):
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= upper:
            raise ValueError(
                f"the k schedule gives K_max={k!r} for MoE layer {i}; every K_max must be an "
                f"int in 1..{num_experts if num_experts is not None else 'num_experts'}"
            )
    return values


# -- routers -------------------------------------------------------------------------------


def _check_fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {value!r}")
    return float(value)


class _PrefixRouter(Router):
    """Shared by the dynamic routers: softmax scores, the K_max best experts in descending
    order, and a kept prefix of them (at least ``k_min``)."""

    def __init__(self, dim, num_experts, top_k, k_min, normalize, nan_policy):
        super().__init__(dim, num_experts, top_k, nan_policy)
        if not isinstance(k_min, int) or isinstance(k_min, bool) or not 1 <= k_min <= top_k:
            raise ValueError(f"k_min must be an int in 1..top_k={top_k}, got {k_min!r}")
        self.k_min, self.normalize = k_min, normalize

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k_min={self.k_min}"

    def _routing(
        self, logits: Tensor, scores: Tensor, rule: Callable[[Tensor], Tensor], aux
    ) -> Routing:
        """``rule`` maps the K_max best scores [T, K] (sorted) to the slots to keep."""
        top, experts = scores.topk(self.top_k, dim=-1)  # sorted, best first
        keep = rule(top)
        keep[:, : self.k_min] = True
        weights = torch.where(keep, top, torch.zeros_like(top))
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        experts = torch.where(keep, experts, torch.full_like(experts, EMPTY))
        return Routing(logits, scores, experts, weights, aux)


@ROUTERS.register("dynamic_k")
class DynamicKRouter(_PrefixRouter):
    """Percentile-thresholded gating: each token takes every expert whose softmax score is
    above the ``percentile`` of the batch's scores, at least ``k_min``, at most ``top_k``.

    "DynaMoE: Dynamic Token-Level Expert Activation with Layer-Wise Adaptive Capacity for
    Mixture-of-Experts Neural Networks" (Gülmez, arXiv 2603.01697). The paper's exact rule
    was not available (only "percentile-thresholded gating", 1 to K_max(l) experts per
    token), so this is gatelab's reading:

    1. p = softmax(W x) over the E experts of each token;
    2. tau = the nearest-rank ``percentile`` q of all T * E scores of the batch: the value
       of rank ceil(q * T * E) in ascending order;
    3. token t keeps its best experts while their score is > tau, at least ``k_min`` and at
       most ``top_k`` (= K_max of the layer), best first; weight = p (optionally
       renormalised over the kept experts).

    Why the batch and not each token's own scores: the q-percentile of one token's E
    scores always leaves about (1 - q) * E experts above it, whatever the token, so it
    would not make k depend on the token. Over the batch, q sets the budget (before the
    clamp, (1 - q) * E experts per token on average) and tokens whose probability is
    spread over several experts take more of them than confident ones.

    The threshold is computed from detached scores; in training it also updates a running
    threshold (``momentum``, like BatchNorm's statistics) that eval mode uses, so at
    inference a token's routing depends on that token alone. Without ``track_running``, or
    in eval before any training batch, the batch threshold is used in eval too. Training
    routing depends on the whole batch (as expert choice and capacity do), so in a causal LM
    a later token can change an earlier one's k in training.

    ``normalize`` is off by default for the reason :class:`TopKRouter` gives: a token with
    one expert would get weight 1 and no router gradient. The router trains through the
    kept softmax weights; the selection itself, like top-k's, has no gradient.
    ``aux["threshold"]`` holds tau.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 2,
        percentile: float = 0.75,
        k_min: int = 1,
        normalize: bool = False,
        track_running: bool = True,
        momentum: float = 0.1,
        nan_policy: str = "raise",
    ):
        super().__init__(dim, num_experts, top_k, k_min, normalize, nan_policy)
        self.percentile = _check_fraction("percentile", percentile)
        if (
            isinstance(momentum, bool)
            or not isinstance(momentum, int | float)
            or not 0 < momentum <= 1
        ):
            raise ValueError(f"momentum must lie in (0, 1], got {momentum!r}")
        self.momentum = float(momentum)
        self.track_running = track_running
        self.register_buffer("running_threshold", torch.zeros(()))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, percentile={self.percentile}"

    def batch_threshold(self, scores: Tensor) -> Tensor:
        """The nearest-rank ``percentile`` of the scores (0-dim, detached)."""
        flat = scores.detach().reshape(-1)
        rank = max(1, math.ceil(self.percentile * flat.numel()))
        return flat.kthvalue(rank).values

    def threshold(self, scores: Tensor) -> Tensor:
        # The buffer counts are read on the device (torch.where), never on the host: a
        # GPU step does not wait, and torch.compile keeps one graph.
        if scores.numel() == 0:
            return self.running_threshold.clone()
        tau = self.batch_threshold(scores)
        tracked = self.num_batches_tracked > 0
        if self.track_running and not self.training:
            return torch.where(tracked, self.running_threshold, tau.to(self.running_threshold))
        if self.training and self.track_running:
            with torch.no_grad():
                m = torch.where(tracked, self.momentum, 1.0).to(self.running_threshold)
                self.running_threshold.mul_(1.0 - m).add_(m * tau.to(self.running_threshold))
                self.num_batches_tracked += 1
        return tau

    def route(self, logits: Tensor) -> Routing:
        scores = logits.softmax(dim=-1)
        tau = self.threshold(scores)
        return self._routing(logits, scores, lambda top: top > tau, {"threshold": tau})


@ROUTERS.register("top_p")
class TopPRouter(_PrefixRouter):
    """Top-p routing: the fewest best experts whose softmax mass reaches ``top_p``.

    "Harder Tasks Need More Experts: Dynamic Routing in MoE Models" (Huang et al., arXiv
    2403.07652). Experts are taken best first while the mass of those already taken is
    below ``top_p``, so expert j (0-based, sorted) is kept when sum_{i<j} p_i < top_p; at
    least ``k_min``, at most ``top_k`` (= K_max). Weights are the kept softmax
    probabilities (``normalize`` renormalises them). Departures: the paper's dynamic
    (entropy) loss that pushes the distribution to be peaked is not part of the router
    (add it as a loss if wanted), and the K_max cap is gatelab's, to fit fixed-width slots.
    Unlike :class:`DynamicKRouter`, each token's routing depends on that token alone.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 2,
        top_p: float = 0.5,
        k_min: int = 1,
        normalize: bool = False,
        nan_policy: str = "raise",
    ):
        super().__init__(dim, num_experts, top_k, k_min, normalize, nan_policy)
        self.top_p = _check_fraction("top_p", top_p)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_p={self.top_p}"

    def route(self, logits: Tensor) -> Routing:
        scores = logits.softmax(dim=-1)

        def keep(top: Tensor) -> Tensor:
            before = top.detach().cumsum(dim=-1) - top.detach()  # mass of the better experts
            return before < self.top_p

        return self._routing(logits, scores, keep, {})


def experts_per_token(routing: Routing) -> Tensor:
    """[T] float: the number of non-empty slots of each token."""
    return routing.valid.sum(dim=1).float()
