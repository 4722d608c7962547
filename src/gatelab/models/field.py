"""A neural field: an MLP from coordinates to signal, with Coordinate-Aware Modulation (CAM).

"Coordinate-Aware Modulation for Neural Fields" (Lee et al., ICLR 2024, arXiv 2311.14993).
Each hidden layer's features are normalised and then scaled and shifted by (gamma, beta)
read from a small learnable grid at the point's coordinate, so a spectral-bias-free grid
steers the MLP's intermediate features while the MLP stays compact. The blocks
(:class:`~gatelab.layers.FourierFeatures`, :class:`~gatelab.layers.CoordinateAwareModulation`,
:func:`~gatelab.layers.pixel_coords`) are in :mod:`gatelab.layers.field`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.field import CoordinateAwareModulation, FourierFeatures

__all__ = ["NeuralField"]


class NeuralField(nn.Module):
    """Coordinates [N, 2] in [-1, 1] -> signal [N, out_dim]: Fourier features, ReLU MLP.

    Each of ``num_layers`` hidden layers is Linear -> (CAM) -> ReLU; the output layer is
    Linear -> sigmoid (``out_act="sigmoid"``, values in [0, 1]) or none. With
    ``cam=False`` it is the plain Fourier-feature MLP CAM is compared against (no
    normalisation: the paper finds normalisation helps only together with CAM).
    CAM's image defaults: 3 x 256 hidden, 256 frequencies (sigma 10), a 32 x 32 grid per
    layer.

    Parameters: (2M + 1) H + (L - 1)(H + 1) H + (H + 1) out_dim, plus L * 2 * R1 * R2 with CAM.
    """

    def __init__(
        self,
        out_dim: int = 3,
        hidden_dim: int = 256,
        num_layers: int = 3,
        num_frequencies: int = 256,
        sigma: float = 10.0,
        cam: bool = True,
        grid_size: int | tuple[int, int] = 32,
        norm: bool = True,
        out_act: str = "sigmoid",
        seed: int = 0,
    ):
        super().__init__()
        for name, value in (
            ("out_dim", out_dim),
            ("hidden_dim", hidden_dim),
            ("num_layers", num_layers),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if out_act not in ("sigmoid", "none"):
            raise ValueError(f"out_act must be 'sigmoid' or 'none', got {out_act!r}")
        self.encode = FourierFeatures(2, num_frequencies, sigma, seed)
        widths = [self.encode.out_dim] + [hidden_dim] * num_layers
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.cams = (
            nn.ModuleList(CoordinateAwareModulation(grid_size, norm) for _ in range(num_layers))
            if cam
            else None
        )
        self.out = nn.Linear(hidden_dim, out_dim)
        self.out_act = out_act

    def grid_parameters(self) -> list[nn.Parameter]:
        """The CAM grids (the paper trains them at 10x the MLP's learning rate)."""
        return [] if self.cams is None else [c.grid for c in self.cams]

    def forward(self, coords: Tensor) -> Tensor:
        if not isinstance(coords, Tensor) or coords.dim() != 2 or coords.shape[-1] != 2:
            shape = tuple(coords.shape) if isinstance(coords, Tensor) else type(coords).__name__
            raise ValueError(f"NeuralField expects coords [N, 2] in [-1, 1], got {shape}")
        h = self.encode(coords)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if self.cams is not None:
                h = self.cams[i](h, coords)
            h = F.relu(h)
        y = self.out(h)
        return y.sigmoid() if self.out_act == "sigmoid" else y
