"""The one contract between routers, dispatchers, losses, telemetry and edits."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

EMPTY = -1
"""Expert id that marks an empty slot (dropped, skipped, or beyond a dynamic k)."""

HOST_CHECK_SLOTS = 256
"""CPU routings of at most this many slots have their values checked on the host, from
Python lists (one-token decode steps), instead of with tensor ops."""

_EMPTY_WEIGHT_MESSAGE = "Routing.weights must be 0 in empty slots (experts == -1)"
_REPEATED_MESSAGE = "Routing.experts names the same expert twice for one token"


def _compiling() -> bool:
    return torch.compiler.is_compiling()


class FlatRouting(NamedTuple):
    """The non-empty slots of a Routing as flat arrays, sorted by expert (stable).

    ``tokens[i]`` went to ``experts[i]`` through slot ``slots[i]`` with ``weights[i]``;
    ``counts[e]`` is how many slots expert ``e`` received, so expert ``e`` owns rows
    ``offsets[e] - counts[e] : offsets[e]``.
    """

    tokens: Tensor  # [N] int64
    experts: Tensor  # [N] int64
    weights: Tensor  # [N] float
    slots: Tensor  # [N] int64, index into experts.view(-1) of the Routing
    counts: Tensor  # [E] int64

    @property
    def offsets(self) -> Tensor:
        return self.counts.cumsum(0)


@dataclasses.dataclass(frozen=True, eq=False)
class Routing:
    """What a router decided for T tokens over E experts, in K fixed-width slots.

    Attributes:
        logits: [T, E] float32, raw router logits (HF's ``router_logits``).
        scores: [T, E] float32, the normalised scores the router ranked by
            (softmax, sigmoid, ...).
        experts: [T, K] int64, chosen expert per slot; ``EMPTY`` (-1) marks an empty slot.
        weights: [T, K] float, combine weight per slot; 0 where the slot is empty.
        aux: router-specific extras (temperature, bias, dropped count, ...).

    Construction validates shapes and dtypes; outside ``torch.compile`` it also checks
    the values (expert ids in range, no expert twice in a row, zero weight in empty slots),
    unless ``check=False``.
    """

    logits: Tensor
    scores: Tensor
    experts: Tensor
    weights: Tensor
    aux: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    check: dataclasses.InitVar[bool] = True

    def __post_init__(self, check: bool) -> None:
        self._check_structure()
        if check and not _compiling():
            self._check_values()

    # -- validation -------------------------------------------------------------------
    def _check_structure(self) -> None:
        for name in ("logits", "scores", "experts", "weights"):
            value = getattr(self, name)
            if not isinstance(value, Tensor) or value.dim() != 2:
                raise ValueError(f"Routing.{name} must be a 2-D tensor, got {_describe(value)}")
        if self.logits.shape != self.scores.shape:
            raise ValueError(
                f"Routing.logits {tuple(self.logits.shape)} and scores "
                f"{tuple(self.scores.shape)} must both be [tokens, experts]"
            )
        if self.experts.shape != self.weights.shape:
            raise ValueError(
                f"Routing.experts {tuple(self.experts.shape)} and weights "
                f"{tuple(self.weights.shape)} must both be [tokens, slots]"
            )
        if self.experts.shape[0] != self.logits.shape[0]:
            raise ValueError(
                f"Routing has {self.logits.shape[0]} tokens in logits but "
                f"{self.experts.shape[0]} in experts"
            )
        if self.experts.dtype != torch.int64:
            raise TypeError(f"Routing.experts must be int64, got {self.experts.dtype}")
        for name in ("logits", "scores", "weights"):
            if not getattr(self, name).is_floating_point():
                raise TypeError(f"Routing.{name} must be floating point")
        if not isinstance(self.aux, dict):
            raise TypeError("Routing.aux must be a dict of tensors")

    def _check_values(self) -> None:
        if self.experts.numel() == 0:
            return
        if self.experts.device.type == "cpu":
            if self.experts.numel() <= HOST_CHECK_SLOTS:
                return self._check_values_host()
            return self._check_values_cpu()
        experts = self.experts
        in_range = (experts >= EMPTY) & (experts < self.num_experts)
        empty_weight_zero = (self.weights.detach() == 0) | (experts != EMPTY)
        ordered = experts.sort(dim=1).values
        repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] != EMPTY)
        checks = (
            (in_range.all(), self._out_of_range_message()),
            (empty_weight_zero.all(), _EMPTY_WEIGHT_MESSAGE),
            (~repeated.any(), _REPEATED_MESSAGE),
        )
        for ok, message in checks:
            # A host check would stall the stream every layer; this assertion fails
            # asynchronously instead (a device-side assert).
            torch._assert_async(ok, message)

    def _check_values_cpu(self) -> None:
        """The same checks with host reads, skipping those the ids' range rules out: one
        aminmax gives the range and says whether any slot is empty, and one slot a row
        cannot repeat (0.48 ms at [4096, 8] with every check as a tensor op, most of it
        the sort the repeat check needs)."""
        experts = self.experts
        low, high = (int(v) for v in torch.aminmax(experts))
        if low < EMPTY or high >= self.num_experts:
            raise ValueError(self._out_of_range_message())
        if low == EMPTY and not bool(((self.weights.detach() == 0) | (experts != EMPTY)).all()):
            raise ValueError(_EMPTY_WEIGHT_MESSAGE)
        if experts.shape[1] > 1:
            ordered = experts.sort(dim=1).values
            repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] != EMPTY)
            if bool(repeated.any()):
                raise ValueError(_REPEATED_MESSAGE)

    def _check_values_host(self) -> None:
        """The same checks on the ids read as a list: a decode step's few slots cost a
        dozen tiny tensor ops the tensor path (~50 us) and a few us this way."""
        rows = self.experts.tolist()
        if not all(EMPTY <= e < self.num_experts for row in rows for e in row):
            raise ValueError(self._out_of_range_message())
        if any(EMPTY in row for row in rows):
            weights = self.weights.detach().tolist()
            for ids, values in zip(rows, weights, strict=True):
                if any(e == EMPTY and w != 0 for e, w in zip(ids, values, strict=True)):
                    raise ValueError(_EMPTY_WEIGHT_MESSAGE)
        for row in rows:
            chosen = [e for e in row if e != EMPTY]
            if len(set(chosen)) != len(chosen):
                raise ValueError(_REPEATED_MESSAGE)

    def _out_of_range_message(self) -> str:
        return (
            f"Routing.experts holds an id outside the valid ids: valid ids "
            f"are 0..{self.num_experts - 1} and {EMPTY} for an empty slot"
        )

    # -- sizes ------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.experts.shape[0]

    @property
    def num_experts(self) -> int:
        return self.logits.shape[1]

    @property
    def num_slots(self) -> int:
        return self.experts.shape[1]

    @property
    def valid(self) -> Tensor:
        """[T, K] bool, True where a slot holds an expert."""
        return self.experts != EMPTY

    # -- views every consumer needs ------------------------------------------------------
    def tokens_per_expert(self, token_mask: Tensor | None = None) -> Tensor:
        """[E] int64: how many slots each expert received (masked tokens excluded)."""
        valid = self.valid
        if token_mask is not None:
            if token_mask.numel() != self.num_tokens:
                raise ValueError(
                    f"token_mask has {token_mask.numel()} elements for {self.num_tokens} tokens"
                )
            valid = valid & token_mask.reshape(-1, 1).bool()
        ids = self.experts[valid]
        return torch.bincount(ids, minlength=self.num_experts)

    def flat(self) -> FlatRouting:
        """The non-empty slots as flat (token, expert, weight) arrays sorted by expert."""
        flat_experts = self.experts.reshape(-1)
        slots = torch.nonzero(flat_experts != EMPTY).squeeze(1)
        experts = flat_experts[slots]
        order = torch.argsort(experts, stable=True)
        slots, experts = slots[order], experts[order]
        return FlatRouting(
            tokens=torch.div(slots, max(self.num_slots, 1), rounding_mode="floor"),
            experts=experts,
            weights=self.weights.reshape(-1)[slots],
            slots=slots,
            counts=torch.bincount(experts, minlength=self.num_experts),
        )

    def dense_weights(self) -> Tensor:
        """[T, E] combine weights, 0 for experts a token does not use."""
        out = self.weights.new_zeros(self.num_tokens, self.num_experts + 1)
        index = torch.where(self.valid, self.experts, self.num_experts)
        out = out.scatter_add(1, index, self.weights)
        return out[:, : self.num_experts]

    # -- edits ------------------------------------------------------------------------
    def replace(self, **changes) -> Routing:
        """A copy with some fields replaced (validated again)."""
        return dataclasses.replace(self, **changes)

    def keep_slots(self, keep: Tensor, renormalize: bool = False) -> Routing:
        """Empty every slot where ``keep`` [T, K] is False."""
        keep = keep & self.valid
        weights = torch.where(keep, self.weights, torch.zeros_like(self.weights))
        if renormalize:
            total = weights.sum(dim=1, keepdim=True)
            weights = torch.where(total > 0, weights / total.clamp_min(1e-20), weights)
        experts = torch.where(keep, self.experts, torch.full_like(self.experts, EMPTY))
        return self.replace(experts=experts, weights=weights)

    def mask_experts(self, experts: Tensor | Sequence[int], renormalize: bool = False) -> Routing:
        """Remove the given experts (ids, or an [E] bool mask of experts to remove)."""
        off = _expert_mask(experts, self.num_experts, self.experts.device)
        lookup = torch.cat([off, off.new_zeros(1)])  # index -1 reads the trailing False
        return self.keep_slots(~lookup[self.experts], renormalize=renormalize)

    def detach(self) -> Routing:
        return Routing(
            self.logits.detach(),
            self.scores.detach(),
            self.experts,
            self.weights.detach(),
            {k: v.detach() if isinstance(v, Tensor) else v for k, v in self.aux.items()},
            check=False,
        )


def _expert_mask(experts: Tensor | Sequence[int], num_experts: int, device) -> Tensor:
    ids = torch.as_tensor(experts, device=device)
    if ids.dtype == torch.bool:
        if ids.shape != (num_experts,):
            raise ValueError(
                f"an expert mask must have shape [{num_experts}], got {tuple(ids.shape)}"
            )
        return ids
    ids = ids.reshape(-1).long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_experts):
        raise ValueError(f"expert ids must lie in 0..{num_experts - 1}, got {ids.tolist()}")
    mask = torch.zeros(num_experts, dtype=torch.bool, device=device)
    mask[ids] = True
    return mask


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__
