"""Deterministic image transformations that turn one digits set into many "tasks".

Each transformation maps float images [..., H, W] in [0, 1] to images of the same shape in
[0, 1]; names compose with ``+`` and apply left to right (``"rot90+noise"`` rotates, then
adds noise). Used to build task families on :func:`gatelab.data.load_digits` (a task per
transformation, a held-out task for zero-shot tests):

- ``identity``; ``rot90`` / ``rot180`` / ``rot270`` (counter-clockwise as displayed, exact
  pixel moves by ``torch.rot90``); ``flip_lr`` / ``flip_ud`` (mirror left-right / up-down);
  ``transpose`` (mirror about the main diagonal);
- ``invert``: 1 - x (white digit on black becomes black on white);
- ``noise``: additive Gaussian noise, standard deviation ``NOISE_STD`` = 0.25, clipped to
  [0, 1], drawn from a generator seeded by ``seed`` (the same seed gives the same noise);
- ``shift``: translate one pixel right and one down, zeros enter at the edges.

:func:`mixed_transform` applies one of several transformations per image, drawn at random.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

NOISE_STD = 0.25


def _shift(x: Tensor) -> Tensor:
    out = torch.zeros_like(x)
    out[..., 1:, 1:] = x[..., :-1, :-1]
    return out


_PLAIN: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda x: x.clone(),
    "rot90": lambda x: torch.rot90(x, 1, dims=(-2, -1)),
    "rot180": lambda x: torch.rot90(x, 2, dims=(-2, -1)),
    "rot270": lambda x: torch.rot90(x, 3, dims=(-2, -1)),
    "flip_lr": lambda x: torch.flip(x, dims=(-1,)),
    "flip_ud": lambda x: torch.flip(x, dims=(-2,)),
    "transpose": lambda x: x.transpose(-2, -1).clone(),
    "invert": lambda x: 1.0 - x,
    "shift": _shift,
}
DIGIT_TRANSFORMS = (*_PLAIN, "noise")


def transform_images(images: Tensor, name: str, *, seed: int = 0) -> Tensor:
    """Apply the transformation ``name`` (see the module docstring) to ``images``."""
    if images.dim() < 2 or not images.is_floating_point():
        raise ValueError(
            f"images must be float [..., H, W], got {images.dtype} {tuple(images.shape)}"
        )
    parts = name.split("+")
    unknown = [p for p in parts if p not in DIGIT_TRANSFORMS]
    if unknown:
        raise ValueError(
            f"unknown transformation {unknown[0]!r} in {name!r}; valid names are "
            f"{', '.join(DIGIT_TRANSFORMS)}, joined with '+'"
        )
    if any(p in ("rot90", "rot270", "transpose") for p in parts) and (
        images.shape[-1] != images.shape[-2]
    ):
        raise ValueError(f"{name!r} needs square images, got {tuple(images.shape[-2:])}")
    out = images
    for i, part in enumerate(parts):
        if part == "noise":
            gen = torch.Generator().manual_seed(seed * 1000 + i)
            noise = torch.randn(out.shape, generator=gen, dtype=out.dtype) * NOISE_STD
            out = (out + noise.to(out.device)).clamp(0.0, 1.0)
        else:
            out = _PLAIN[part](out)
    return out


def mixed_transform(
    images: Tensor, names: tuple[str, ...] | list[str], *, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Each image under one of ``names``, drawn uniformly with a generator seeded by ``seed``.

    Returns the images and the index [N] of the transformation each one got (a task that mixes
    modes, e.g. digits in any of the four right-angle orientations).
    """
    if not names:
        raise ValueError("names is empty: give at least one transformation")
    which = torch.randint(
        0, len(names), (images.shape[0],), generator=torch.Generator().manual_seed(seed)
    )
    out = torch.empty_like(images)
    for k, name in enumerate(names):
        chosen = which == k
        out[chosen] = transform_images(images[chosen], name, seed=seed + k)
    return out, which


__all__ = ["DIGIT_TRANSFORMS", "NOISE_STD", "mixed_transform", "transform_images"]
