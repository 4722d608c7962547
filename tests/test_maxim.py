"""The small MAXIM UNet, its convolutional baseline and the denoising experiment."""

from __future__ import annotations

import pytest
import torch

from gatelab.models import ConfigError
from gatelab.models.maxim import (
    RCAB,
    RDCAB,
    ConvUNet,
    ConvUNetConfig,
    MaximUNet,
    MaximUNetConfig,
    SqueezeExcite,
)

SMALL = {"features": 4, "depth": 2, "block_size": 2, "grid_size": 2}


@pytest.mark.parametrize("size", [(16, 24), (24, 8), (8, 8)])
def test_maxim_unet_takes_non_square_multiples(size):
    model = MaximUNet(MaximUNetConfig(**SMALL))
    assert model.config.multiple == 8
    x = torch.rand(2, 1, *size)
    y = model(x)
    assert y.shape == x.shape and y.dtype == x.dtype


def test_maxim_unet_float64_and_empty_batch():
    model = MaximUNet(MaximUNetConfig(**SMALL)).double()
    assert model(torch.rand(1, 1, 8, 16, dtype=torch.float64)).dtype == torch.float64
    assert model(torch.rand(0, 1, 8, 8, dtype=torch.float64)).shape == (0, 1, 8, 8)


def test_maxim_unet_rejects_other_sizes_naming_the_multiple():
    model = MaximUNet(MaximUNetConfig(features=4, depth=2, block_size=2, grid_size=3))
    assert model.config.multiple == 24  # 2^2 * lcm(2, 3)
    with pytest.raises(ValueError, match=r"multiples of 24 .*lcm\(block_size, grid_size\)"):
        model(torch.rand(1, 1, 24, 36))
    with pytest.raises(ValueError, match=r"images \[batch, 1, height, width\]"):
        model(torch.rand(1, 3, 24, 24))
    with pytest.raises(TypeError, match="float tensor"):
        model(torch.zeros(1, 1, 24, 24, dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiples of 4"):
        ConvUNet(ConvUNetConfig(features=4, depth=2))(torch.rand(1, 1, 8, 10))


def test_unet_configs_validate():
    with pytest.raises(ConfigError, match="features"):
        MaximUNetConfig(features=0)
    with pytest.raises(ConfigError, match="dropout"):
        MaximUNetConfig(dropout=1.5)
    with pytest.raises(ConfigError, match="unknown key 'featurs'.*'features'"):
        ConvUNetConfig.from_dict({"featurs": 8})


@pytest.mark.parametrize(
    "cls,cfg",
    # se_reduction 2: a squeeze-excitation of one hidden unit can be a dead ReLU
    [(MaximUNet, MaximUNetConfig(**SMALL, se_reduction=2)), (ConvUNet, ConvUNetConfig(features=4))],
)
def test_unet_gradient_reaches_every_parameter(cls, cfg):
    model = cls(cfg)
    x = torch.rand(2, 1, 8, 16)
    (model(x) * torch.randn_like(x)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_maxim_unet_uses_cross_gating_and_multi_axis_blocks():
    """The bridges come from the cross-gating blocks: zeroing a CGB's output projection
    changes the result (a plain-skip UNet would not have them)."""
    model = MaximUNet(MaximUNetConfig(**SMALL))
    names = {type(m).__name__ for m in model.modules()}
    assert {"MultiAxisGatedMLPBlock", "CrossGatingBlock", "RCAB", "RDCAB"} <= names
    x = torch.rand(1, 1, 8, 8)
    before = model(x)
    with torch.no_grad():
        model.cross_gates[0].x_out.weight.zero_()
    assert not torch.allclose(before, model(x))


def test_companion_block_parameter_counts():
    d, r = 8, 4
    se = d * (d // r) + d // r + (d // r) * d + d
    assert sum(p.numel() for p in SqueezeExcite(d, r).parameters()) == se
    rcab = 2 * d + 2 * (9 * d * d + d) + se
    assert sum(p.numel() for p in RCAB(d, r).parameters()) == rcab
    rdcab = 2 * d + 2 * (d * d + d) + se
    assert sum(p.numel() for p in RDCAB(d, r).parameters()) == rdcab


def test_conv_unet_matches_maxim_size_in_the_experiment():
    from gatelab.experiments.maxim_denoise import matched_conv

    maxim = MaximUNet(MaximUNetConfig(features=8, depth=2))
    conv = matched_conv(maxim)
    ratio = conv.num_parameters() / maxim.num_parameters()
    assert 0.9 < ratio < 1.1


def test_psnr_and_noise_level():
    from gatelab.experiments.maxim_denoise import SIGMA, psnr

    clean = torch.full((4, 1, 32, 32), 0.5)
    noisy = clean + SIGMA * torch.randn(clean.shape)
    # PSNR of N(0, sigma^2) noise is -20 log10(sigma) = 20.17 dB at sigma 25/255
    assert abs(psnr(noisy, clean).mean().item() - 20.17) < 0.1
    assert torch.isinf(psnr(clean, clean)).logical_not().all()


def test_maxim_denoise_experiment_smoke(tmp_path):
    from gatelab import experiments

    result = experiments.get("maxim-denoise").run("smoke", out_dir=tmp_path)
    assert "| MAXIM UNet |" in result["table"] and "| conv UNet |" in result["table"]
    noisy = result["results"]["noisy input"]["psnr"]
    assert 19.0 < noisy < 21.5
