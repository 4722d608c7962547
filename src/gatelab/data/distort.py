"""Simulated users: handwriting distortions of digit images, fixed per user.

A user's handwriting is modelled as a :class:`HandwritingStyle` applied to clean digits:

- **slant**: a horizontal shear ``x' = x + slant * y`` about the image centre (y up), so
  ``slant > 0`` leans the strokes to the right, as italic writing;
- **stroke width**: ``stroke > 0`` thickens strokes by blending the image with its grey-level
  dilation (3x3 max filter), ``stroke < 0`` thins them with its erosion (3x3 min filter);
  ``|stroke|`` (at most 1) is the blend weight;
- **elastic**: a smooth displacement field (Simard et al., "Best Practices for Convolutional
  Neural Networks Applied to Visual Document Analysis", ICDAR 2003: uniform noise in
  [-1, 1] per pixel, Gaussian-smoothed with ``elastic_sigma`` pixels, scaled by
  ``elastic_alpha`` pixels). The user's own field is drawn once from ``seed`` and applied to
  every image (the user's idiosyncrasy); ``jitter`` adds a fresh field of that fraction of
  the strength per image (no one writes a digit twice the same way).

Order: stroke, then slant and the elastic field in one resampling (bilinear, zeros outside).
Images are float [N, 1, H, W] in [0, 1]; outputs are clipped to [0, 1]. On scikit-learn's
8x8 digits, upsample first (``upsample``): the filters and fields then act on a finer grid.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class HandwritingStyle:
    """One simulated user's handwriting (see the module docstring for each field)."""

    slant: float = 0.0
    stroke: float = 0.0
    elastic_alpha: float = 0.0
    elastic_sigma: float = 2.0
    jitter: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not -1.0 <= self.stroke <= 1.0:
            raise ValueError(f"stroke must lie in [-1, 1] (the blend weight), got {self.stroke}")
        if self.elastic_alpha < 0 or self.jitter < 0:
            raise ValueError(
                f"elastic_alpha and jitter must be >= 0, got {self.elastic_alpha}, {self.jitter}"
            )
        if not self.elastic_sigma > 0:
            raise ValueError(f"elastic_sigma must be > 0 pixels, got {self.elastic_sigma}")
        if not math.isfinite(self.slant) or abs(self.slant) > 2:
            raise ValueError(f"slant must be a shear factor in [-2, 2], got {self.slant}")


def random_style(user: int, strength: float = 1.0) -> HandwritingStyle:
    """A user's style drawn from ``user`` (its seed): slant in +-[0.2, 0.5], stroke in
    +-[0.4, 0.9], elastic strength ~2 pixels at 16x16, all times ``strength``."""
    if not strength >= 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    gen = torch.Generator().manual_seed(10_007 * user + 1)
    u = torch.rand(4, generator=gen).tolist()
    sign = lambda v: 1.0 if v < 0.5 else -1.0  # noqa: E731
    return HandwritingStyle(
        slant=strength * sign(u[0]) * (0.2 + 0.3 * u[1]),
        stroke=min(1.0, strength * sign(u[2]) * (0.4 + 0.5 * u[3])) if strength else 0.0,
        elastic_alpha=2.0 * strength,
        elastic_sigma=2.0,
        jitter=0.3,
        seed=user,
    )


def upsample(images: Tensor, size: int) -> Tensor:
    """Bilinear resize of [N, C, H, W] images to ``size`` x ``size``."""
    _check_images(images)
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or not images.is_floating_point() or images.dim() != 4:
        what = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor [N, C, H, W], got {what}")


def _smooth_field(n: int, h: int, w: int, sigma: float, gen: torch.Generator) -> Tensor:
    """[n, 2, h, w] uniform noise in [-1, 1] blurred by a Gaussian of ``sigma`` pixels."""
    noise = torch.rand(n, 2, h, w, generator=gen) * 2 - 1
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    x = noise.reshape(n * 2, 1, h, w)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    x = x.reshape(n, 2, h, w)
    # Normalise so that alpha is the field's RMS displacement in pixels.
    return x / x.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-8)


def _stroke(images: Tensor, stroke: float) -> Tensor:
    if stroke == 0:
        return images
    if stroke > 0:
        morph = F.max_pool2d(images, 3, stride=1, padding=1)
    else:
        morph = -F.max_pool2d(-images, 3, stride=1, padding=1)
    return (1 - abs(stroke)) * images + abs(stroke) * morph


def distort(images: Tensor, style: HandwritingStyle, seed: int = 0) -> Tensor:
    """Write ``images`` [N, C, H, W] in ``style``'s handwriting; ``seed`` draws the
    per-image jitter (the user's own field comes from ``style.seed``)."""
    _check_images(images)
    n, _, h, w = images.shape
    x = _stroke(images, style.stroke)
    ys, xs = torch.meshgrid(
        torch.linspace(-1 + 1 / h, 1 - 1 / h, h),
        torch.linspace(-1 + 1 / w, 1 - 1 / w, w),
        indexing="ij",
    )
    # Output (x, y) samples the input at (x - slant * y_up, y): y_up = -ys in grid coordinates.
    grid = torch.stack([xs + style.slant * ys * h / w, ys], -1).expand(n, h, w, 2).clone()
    if style.elastic_alpha > 0:
        user = _smooth_field(
            1, h, w, style.elastic_sigma, torch.Generator().manual_seed(style.seed)
        )
        field = user.expand(n, -1, -1, -1)
        if style.jitter > 0 and n:
            gen = torch.Generator().manual_seed(seed)
            field = field + style.jitter * _smooth_field(n, h, w, style.elastic_sigma, gen)
        # pixels -> normalised coordinates (2 / size per pixel)
        scale = torch.tensor([2.0 / w, 2.0 / h]).view(1, 2, 1, 1)
        grid = grid + (style.elastic_alpha * field * scale).permute(0, 2, 3, 1)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.clamp(0.0, 1.0)


__all__ = ["HandwritingStyle", "distort", "random_style", "upsample"]
