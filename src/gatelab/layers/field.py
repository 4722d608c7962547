"""Blocks of neural fields: Fourier features, Coordinate-Aware Modulation (CAM), pixel
coordinates (the MLP from coordinates to signal that uses them is
:class:`gatelab.models.NeuralField`).

"Coordinate-Aware Modulation for Neural Fields" (Lee et al., ICLR 2024, arXiv 2311.14993).
Each hidden layer's features are normalised and then scaled and shifted by (gamma, beta)
read from a small learnable grid at the point's coordinate, so a spectral-bias-free grid
steers the MLP's intermediate features while the MLP stays compact.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..legacy import moved


class CoordinateAwareModulation(nn.Module):
    """h -> gamma(c) * Norm(h) + beta(c), gamma and beta bilinear samples of a 2-D grid.

    CAM (arXiv 2311.14993), as in the reference image code (``maincold2/CAM``,
    ``CAM_image.py``): the grid is [2, R1, R2] (channel 0 gamma, initialised to 1;
    channel 1 beta, initialised to 0); gamma and beta are one scalar per point, broadcast
    over the features. ``norm=True`` normalises each point's feature vector to zero mean
    and unit variance without affine (the image code's ``instance_norm`` over features).
    Our choice where the notes are silent: coordinates in [-1, 1] address the grid with
    ``align_corners=True`` (the corner cells sit on the image corners), border padding.
    Parameters: 2 * R1 * R2.
    """

    def __init__(self, grid_size: int | tuple[int, int] = 32, norm: bool = True, eps: float = 1e-5):
        super().__init__()
        r1, r2 = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
        if r1 < 2 or r2 < 2:
            raise ValueError(
                f"grid_size must be >= 2 per axis (bilinear needs 2 cells), got {grid_size}"
            )
        self.grid_size, self.norm, self.eps = (r1, r2), norm, eps
        init = torch.stack([torch.ones(r1, r2), torch.zeros(r1, r2)])
        self.grid = nn.Parameter(init)

    def extra_repr(self) -> str:
        return f"grid_size={self.grid_size}, norm={self.norm}"

    def modulation(self, coords: Tensor) -> tuple[Tensor, Tensor]:
        """gamma, beta [N, 1] at coords [N, 2] ((x, y) in [-1, 1])."""
        where = coords.to(self.grid.dtype).view(1, -1, 1, 2)
        sampled = F.grid_sample(
            self.grid.unsqueeze(0),
            where,
            mode="bilinear",
            padding_mode="border",
            align_corners=True,
        )  # [1, 2, N, 1]
        gamma, beta = sampled[0, :, :, 0].unsqueeze(-1)
        return gamma, beta

    def forward(self, h: Tensor, coords: Tensor) -> Tensor:
        if self.norm:
            centred = h - h.mean(dim=-1, keepdim=True)
            var = centred.square().mean(dim=-1, keepdim=True)  # biased, as instance_norm
            h = centred / torch.sqrt(var + self.eps)
        gamma, beta = self.modulation(coords)
        return gamma.to(h.dtype) * h + beta.to(h.dtype)


class FourierFeatures(nn.Module):
    """Random Fourier features [cos(2 pi B p), sin(2 pi B p)], B ~ N(0, sigma^2) [M, in_dim].

    "Fourier Features Let Networks Learn High Frequency Functions in Low Dimensional
    Domains" (Tancik et al., arXiv 2006.10739), the encoding CAM's image MLP reads
    (M = 256, sigma = 10). Coordinates in [-1, 1] are mapped to p in [0, 1] first, the
    range that sigma was chosen for. B is a fixed buffer (seeded by ``seed``).
    """

    def __init__(
        self, in_dim: int = 2, num_frequencies: int = 256, sigma: float = 10.0, seed: int = 0
    ):
        super().__init__()
        if num_frequencies < 1 or sigma <= 0:
            raise ValueError(
                f"need num_frequencies >= 1 and sigma > 0, got {num_frequencies}, {sigma}"
            )
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(num_frequencies, in_dim, generator=gen) * sigma)
        self.out_dim = 2 * num_frequencies

    def forward(self, coords: Tensor) -> Tensor:
        angles = 2 * math.pi * F.linear((coords + 1) / 2, self.freqs.to(coords.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=-1)


def pixel_coords(height: int, width: int) -> Tensor:
    """[H * W, 2] pixel-centre coordinates (x, y) in [-1, 1], row-major (grid_sample's order)."""
    ys = (torch.arange(height) + 0.5) / height * 2 - 1
    xs = (torch.arange(width) + 0.5) / width * 2 - 1
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 2)


__all__ = ["CoordinateAwareModulation", "FourierFeatures", "pixel_coords"]

# The complete model moved to gatelab.models.field (issue 14); the old path warns.
__getattr__ = moved(__name__, {"NeuralField": "gatelab.models.field"})
