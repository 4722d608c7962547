"""The shapes ``gatelab bench moe`` runs: T tokens of width D through E experts of width F,
top-k per token; their ``[NAME=]T,D,F,E,k`` spelling, the defaults per device and the named
shape sets of ``--set``."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

DECODE_TOKENS = 64
"""Shapes with at most this many tokens are small-batch (decode) shapes: they get a roofline."""


@dataclass(frozen=True)
class Shape:
    """One benchmark case: T tokens of width D through E experts of width F, k per token."""

    name: str
    tokens: int
    dim: int
    hidden_dim: int
    num_experts: int
    top_k: int

    def __post_init__(self) -> None:
        for attr in ("tokens", "dim", "hidden_dim", "num_experts", "top_k"):
            value = getattr(self, attr)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"shape {self.name!r}: {attr} must be a positive int, got {value!r}"
                )
        if self.top_k > self.num_experts:
            raise ValueError(
                f"shape {self.name!r}: k={self.top_k} exceeds E={self.num_experts}; use k <= E"
            )

    @property
    def decode(self) -> bool:
        """A small-batch shape, bounded by reading weights rather than by FLOPs."""
        return self.tokens <= DECODE_TOKENS

    @property
    def spec(self) -> str:
        """The ``T,D,F,E,k`` form ``--shapes`` reads."""
        return f"{self.tokens},{self.dim},{self.hidden_dim},{self.num_experts},{self.top_k}"

    def describe(self) -> str:
        return (
            f"T={self.tokens} D={self.dim} F={self.hidden_dim} E={self.num_experts} k={self.top_k}"
        )

    def active_flops(self) -> int:
        """Forward FLOPs of the routed experts (= the dense baseline's): 6 * T * k * D * F."""
        return 6 * self.tokens * self.top_k * self.dim * self.hidden_dim


SHAPE_FORMAT = "T,D,F,E,k (five positive integers, k <= E), optionally prefixed by NAME="

_SHAPE_RE = re.compile(r"^(?:(?P<name>[A-Za-z_][\w.-]*)=)?(?P<dims>.*)$")


def parse_shape(text: str) -> Shape:
    """Parse ``"T,D,F,E,k"`` or ``"name=T,D,F,E,k"``; ValueError with the format otherwise."""
    match = _SHAPE_RE.match(text.strip())
    name, dims = (match["name"], match["dims"]) if match else (None, text)
    parts = [p.strip() for p in dims.split(",")]
    if len(parts) != 5:
        raise ValueError(
            f"bad shape {text!r}: expected {SHAPE_FORMAT}, e.g. 4096,512,1024,8,2 or "
            f"coarse=4096,512,1024,8,2; got {len(parts)} field(s)"
        )
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(
            f"bad shape {text!r}: expected {SHAPE_FORMAT}; {dims!r} holds a non-integer"
        ) from None
    if any(v < 1 for v in values):
        raise ValueError(f"bad shape {text!r}: T, D, F, E and k must all be >= 1")
    tokens, dim, hidden_dim, num_experts, top_k = values
    if top_k > num_experts:
        raise ValueError(f"bad shape {text!r}: k={top_k} exceeds E={num_experts}; use k <= E")
    return Shape(name or f"T{tokens}-E{num_experts}", tokens, dim, hidden_dim, num_experts, top_k)


DEFAULT_SHAPES: dict[tuple[str, bool], tuple[Shape, ...]] = {
    ("cpu", False): (
        Shape("coarse", 4096, 512, 1024, 8, 2),
        Shape("fine", 4096, 512, 256, 64, 8),
        Shape("decode", 8, 512, 1024, 8, 2),
    ),
    ("cpu", True): (
        Shape("coarse", 512, 512, 1024, 8, 2),
        Shape("fine", 512, 512, 256, 64, 8),
        Shape("decode", 8, 512, 1024, 8, 2),
    ),
    ("cuda", False): (
        Shape("mixtral", 8192, 4096, 14336, 8, 2),
        Shape("fine-64", 8192, 2048, 1024, 64, 8),
        Shape("fine-128", 8192, 2048, 512, 128, 8),
        Shape("decode", 16, 4096, 14336, 8, 2),
    ),
    ("cuda", True): (
        Shape("mixtral", 2048, 4096, 14336, 8, 2),
        Shape("fine-64", 2048, 2048, 1024, 64, 8),
        Shape("decode", 16, 4096, 14336, 8, 2),
    ),
}


def default_shapes(device: str, quick: bool) -> tuple[Shape, ...]:
    return DEFAULT_SHAPES[(torch.device(device).type, quick)]


SWEEP_TRAINING: tuple[Shape, ...] = (
    Shape("coarse", 4096, 512, 1024, 8, 2),
    Shape("fine", 4096, 512, 256, 64, 8),
    Shape("fine-128", 2048, 512, 64, 128, 8),
    Shape("mid-32", 2048, 768, 384, 32, 4),
    Shape("wide-8", 1024, 1024, 4096, 8, 2),
    Shape("fine-short", 512, 512, 256, 64, 8),
    Shape("top1-16", 4096, 256, 128, 16, 1),
)
"""Issue 17's training shapes (timed forward+backward; CPU, fp32)."""

SWEEP_DECODE: tuple[Shape, ...] = (
    Shape("decode-1", 1, 512, 1024, 8, 2),
    Shape("decode-1-fine", 1, 1024, 256, 128, 8),
    Shape("decode", 8, 512, 1024, 8, 2),
    Shape("decode-16-fine", 16, 2048, 512, 64, 8),
)
"""Issue 17's decode shapes (T <= DECODE_TOKENS: judged on the forward and the roofline)."""

QUICK_SWEEP_DIVISOR = 8
QUICK_SWEEP_MIN_TOKENS = 256
"""With --quick the sweep's training shapes run T // 8 tokens, at least 256 (the decode
shapes are unchanged)."""

SHAPE_SETS = ("default", "sweep")
"""The names ``--set`` takes: ``default`` (the per-device defaults above) and ``sweep``."""


def sweep_shapes(quick: bool) -> tuple[Shape, ...]:
    """Issue 17's sweep: the training shapes, then the decode shapes. With ``quick`` the
    training shapes run ``max(T // 8, 256)`` tokens."""
    training = SWEEP_TRAINING
    if quick:
        training = tuple(
            replace(s, tokens=max(s.tokens // QUICK_SWEEP_DIVISOR, QUICK_SWEEP_MIN_TOKENS))
            for s in training
        )
    return training + SWEEP_DECODE


def shape_set(name: str, device: str, quick: bool) -> tuple[Shape, ...]:
    """The shapes of the named set (see ``SHAPE_SETS``); ValueError naming the valid sets."""
    if name == "default":
        return default_shapes(device, quick)
    if name == "sweep":
        return sweep_shapes(quick)
    raise ValueError(f"unknown shape set {name!r}; valid: {', '.join(SHAPE_SETS)}")
