"""Neural fields and Coordinate-Aware Modulation (CAM)."""

from __future__ import annotations

import pytest
import torch

from gatelab import experiments
from gatelab.layers import CoordinateAwareModulation, FourierFeatures, pixel_coords
from gatelab.models import NeuralField


def test_cam_starts_as_plain_normalisation():
    cam = CoordinateAwareModulation(8, norm=True)
    h, coords = torch.randn(20, 16), torch.rand(20, 2) * 2 - 1
    want = (h - h.mean(-1, keepdim=True)) / torch.sqrt(
        h.var(-1, unbiased=False, keepdim=True) + 1e-5
    )
    assert torch.allclose(cam(h, coords), want, atol=1e-6)
    assert torch.allclose(CoordinateAwareModulation(8, norm=False)(h, coords), h)


def _bilinear(grid: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """grid [C, R1, R2] at (x, y) in [-1, 1], corners on the corner cells (align_corners)."""
    r1, r2 = grid.shape[1:]
    fx, fy = (x + 1) / 2 * (r2 - 1), (y + 1) / 2 * (r1 - 1)
    x0, y0 = min(int(fx), r2 - 2), min(int(fy), r1 - 2)
    ax, ay = fx - x0, fy - y0
    top = grid[:, y0, x0] * (1 - ax) + grid[:, y0, x0 + 1] * ax
    bottom = grid[:, y0 + 1, x0] * (1 - ax) + grid[:, y0 + 1, x0 + 1] * ax
    return top * (1 - ay) + bottom * ay


def test_modulation_is_a_bilinear_sample_of_the_grid():
    cam = CoordinateAwareModulation((5, 7)).double()
    with torch.no_grad():
        cam.grid.normal_()
    coords = torch.tensor(
        [[-1.0, -1.0], [1.0, 1.0], [0.3, -0.6], [-0.95, 0.2]], dtype=torch.float64
    )
    gamma, beta = cam.modulation(coords)
    for i, (x, y) in enumerate(coords.tolist()):
        want = _bilinear(cam.grid, x, y)
        assert torch.allclose(torch.stack([gamma[i, 0], beta[i, 0]]), want, atol=1e-12)
    # x runs along the grid's last axis: the corner (x=1, y=-1) is grid[:, 0, -1].
    g, b = cam.modulation(torch.tensor([[1.0, -1.0]], dtype=torch.float64))
    assert torch.allclose(torch.cat([g[0], b[0]]), cam.grid[:, 0, -1])


@pytest.mark.parametrize("cam", [False, True])
def test_field_shapes_range_gradients_and_parameter_count(cam):
    m, h, layers, r, out = 6, 10, 3, 4, 3
    field = NeuralField(out, h, layers, num_frequencies=m, cam=cam, grid_size=r)
    coords = pixel_coords(5, 4)
    y = field(coords)
    assert y.shape == (20, out) and y.dtype == torch.float32
    assert bool(((y > 0) & (y < 1)).all())
    formula = (2 * m + 1) * h + (layers - 1) * (h + 1) * h + (h + 1) * out
    formula += layers * 2 * r * r if cam else 0
    assert sum(p.numel() for p in field.parameters()) == formula
    with torch.no_grad():  # move the grids off their constant init so beta's gradient varies
        for grid in field.grid_parameters():
            grid.add_(0.1 * torch.randn_like(grid))
    field(coords).square().sum().backward()
    for name, p in field.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert len(field.grid_parameters()) == (layers if cam else 0)


def test_field_runs_in_float64_and_on_zero_points():
    field = NeuralField(1, 8, 2, num_frequencies=4, grid_size=3, out_act="none").double()
    assert field(pixel_coords(3, 3).double()).dtype == torch.float64
    assert field(torch.zeros(0, 2, dtype=torch.float64)).shape == (0, 1)


def test_pixel_coords_and_fourier_features():
    c = pixel_coords(2, 4)
    assert c.shape == (8, 2)
    assert torch.allclose(c[0], torch.tensor([-0.75, -0.5]))  # (x, y) of the top-left pixel
    assert torch.allclose(c[-1], torch.tensor([0.75, 0.5]))
    enc = FourierFeatures(2, 5, sigma=3.0)
    feats = enc(c)
    assert feats.shape == (8, 10) and enc.out_dim == 10
    assert torch.allclose(feats[:, :5] ** 2 + feats[:, 5:] ** 2, torch.ones(8, 5), atol=1e-6)


def test_field_bad_configuration_raises_clear_errors():
    with pytest.raises(ValueError, match="grid_size must be >= 2"):
        CoordinateAwareModulation(1)
    with pytest.raises(ValueError, match="hidden_dim must be a positive int"):
        NeuralField(hidden_dim=0)
    with pytest.raises(ValueError, match="out_act must be"):
        NeuralField(out_act="tanh")
    with pytest.raises(ValueError, match="num_frequencies >= 1"):
        FourierFeatures(2, 0)
    with pytest.raises(ValueError, match=r"coords \[N, 2\]"):
        NeuralField(hidden_dim=4, num_frequencies=2)(torch.zeros(5, 3))


def test_cam_fit_experiment_smoke(tmp_path):
    result = experiments.get("cam-fit").run("smoke", out_dir=tmp_path)
    assert set(result["runs"]) == {"plain", "cam"}
    for runs in result["runs"].values():
        assert all(0 < v < 100 for r in runs for v in r["psnr"].values())
    assert "| cam |" in result["table"]


def test_old_import_paths_warn_and_give_the_same_class():
    import gatelab.layers
    import gatelab.layers.field

    for module in (gatelab.layers, gatelab.layers.field):
        with pytest.warns(DeprecationWarning, match="moved to gatelab.models.field.NeuralField"):
            assert module.NeuralField is NeuralField
    assert "NeuralField" not in gatelab.layers.__all__
