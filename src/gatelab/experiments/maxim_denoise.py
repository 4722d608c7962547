"""Gaussian denoising (sigma 25/255) of the shipped photographs: a small MAXIM UNet against a
convolutional UNet of about the same parameter count.

Claim tested: MAXIM (Tu et al., arXiv 2201.02973) reports that its multi-axis gated MLP
UNet restores images at the state of the art (SIDD denoising 39.96 dB with 22.2M
parameters), i.e. that global (grid) plus local (block) gated MLP mixing with
cross-gating is a strong restoration backbone. Here, at CPU scale, the question is
whether the MAXIM blocks beat plain 3x3 convolutions in the same UNet skeleton at equal
parameters and equal training.

Protocol (grey photographs, BT.709 luma, of :func:`gatelab.data.load_photos`):

- train on fresh random 32x32 crops of 13 photographs (TRAIN_PHOTOS), each batch a
  uniformly drawn photo per crop and fresh N(0, (25/255)^2) noise, unclipped (the usual
  AWGN protocol);
- test on non-overlapping 64x64 crops (every other one, in raster order) of 4 held-out
  photographs (TEST_PHOTOS), with noise from a fixed generator, so both models see the
  same noisy inputs; PSNR of the output clamped to [0, 1] against the clean crop, averaged
  over crops (the test crops are larger than the training crops: MAXIM's grid branch
  then mixes over a coarser, farther-reaching grid, as in the paper's full-resolution
  inference);
- both models: the same batches in the same order, Charbonnier loss (eps 1e-3; the
  paper's frequency loss is left out), AdamW (lr 1e-3, no weight decay, 5% warm-up,
  cosine decay), gradient norm clipped at 1, one seed.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from ..data import extract_patches, load_photos
from ..models.common import num_parameters
from ..models.maxim import ConvUNet, ConvUNetConfig, MaximUNet, MaximUNetConfig
from ._loop import train_loop, warmup_then_cosine

NAME = "maxim-denoise"
DESCRIPTION = (
    "Gaussian denoising (sigma 25/255) of held-out photographs: small MAXIM UNet vs "
    "a conv UNet of equal size"
)

SIGMA = 25.0 / 255.0
TRAIN_PHOTOS = (
    "brick",
    "clock",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "rocket",
    "text",
    "china",
    "flower",
)
TEST_PHOTOS = ("astronaut", "camera", "chelsea", "coffee")
SCALES = {
    "smoke": {
        "maxim": {"features": 4, "depth": 1, "block_size": 4, "grid_size": 4},
        "crop": 16,
        "test_crop": 32,
        "test_every": 16,
        "steps": 3,
        "batch": 4,
        "train_photos": ("camera",),  # smoke: one photo for both, to load quickly
        "test_photos": ("camera",),
    },
    "full": {
        "maxim": {"features": 16, "depth": 2, "block_size": 4, "grid_size": 4},
        "crop": 32,
        "test_crop": 64,
        "test_every": 2,
        "steps": 700,
        "batch": 8,
        "train_photos": TRAIN_PHOTOS,
        "test_photos": TEST_PHOTOS,
    },
}


def psnr(output: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image [N] of images in [0, 1] (output clamped to [0, 1])."""
    mse = (output.clamp(0, 1) - clean).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def random_crops(
    photos: list[torch.Tensor], size: int, count: int, gen: torch.Generator
) -> torch.Tensor:
    """``count`` crops [count, C, size, size], each from a uniformly drawn photo at a
    uniformly drawn position."""
    picks = torch.randint(len(photos), (count,), generator=gen).tolist()
    crops = []
    for i in picks:
        img = photos[i]
        top = int(torch.randint(img.shape[-2] - size + 1, (1,), generator=gen))
        left = int(torch.randint(img.shape[-1] - size + 1, (1,), generator=gen))
        crops.append(img[:, top : top + size, left : left + size])
    return torch.stack(crops)


def test_set(
    photos: tuple[str, ...], size: int, every: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(clean, noisy, photo name per crop) of the held-out photographs."""
    clean, names = [], []
    for name, img in load_photos(photos, channels=1).items():
        patches = extract_patches(img, size)[::every]
        clean.append(patches)
        names += [name] * len(patches)
    x = torch.cat(clean)
    gen = torch.Generator().manual_seed(10_000 + seed)
    return x, x + SIGMA * torch.randn(x.shape, generator=gen), names


def matched_conv(maxim: MaximUNet) -> ConvUNet:
    """The ConvUNet with MAXIM's depth whose parameter count is nearest to MAXIM's."""
    target, depth = num_parameters(maxim), maxim.config.depth
    best, best_gap = 1, math.inf
    for f in range(1, 257):  # parameters grow with features: stop once past the target
        gap = _conv_params(f, depth) - target
        if abs(gap) < best_gap:
            best, best_gap = f, abs(gap)
        if gap > 0:
            break
    return ConvUNet(ConvUNetConfig(features=best, depth=depth))


def _conv_params(features: int, depth: int) -> int:
    return num_parameters(ConvUNet(ConvUNetConfig(features=features, depth=depth)))


def charbonnier(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    return torch.sqrt((x - y).pow(2) + eps * eps).mean()


def train(model: torch.nn.Module, photos: list[torch.Tensor], cfg: dict, seed: int) -> float:
    """Train ``model`` on the batches seeded by ``seed``; return the seconds taken."""
    gen = torch.Generator().manual_seed(seed)
    steps = cfg["steps"]
    warmup = max(1, steps // 20)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    sched = warmup_then_cosine(opt, warmup, steps)

    def batches():  # (noisy, clean) crops, both drawn from gen
        while True:
            clean = random_crops(photos, cfg["crop"], cfg["batch"], gen)
            yield clean + SIGMA * torch.randn(clean.shape, generator=gen), clean

    start = time.perf_counter()
    loss_fn = lambda m, b: charbonnier(m(b[0]), b[1])  # noqa: E731
    train_loop(model, loss_fn, batches(), opt, steps=steps, schedule=sched, clip=1.0)
    return time.perf_counter() - start


@torch.no_grad()
def evaluate(model: torch.nn.Module, noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """PSNR per test crop [N]."""
    model.eval()
    out = torch.cat([model(noisy[i : i + 16]) for i in range(0, len(noisy), 16)])
    return psnr(out, clean)


def run(scale: str = "full", seed: int = 0, out_dir: str | Path | None = None) -> dict:
    cfg = SCALES[scale]
    photos = list(load_photos(cfg["train_photos"], channels=1).values())
    clean, noisy, names = test_set(cfg["test_photos"], cfg["test_crop"], cfg["test_every"], seed)
    torch.manual_seed(seed)
    maxim = MaximUNet(MaximUNetConfig(**cfg["maxim"]))
    conv = matched_conv(maxim)
    per_crop = {"noisy input": psnr(noisy, clean)}
    params, seconds = {"noisy input": 0}, {"noisy input": 0.0}
    for label, model in (("conv UNet", conv), ("MAXIM UNet", maxim)):
        seconds[label] = train(model, photos, cfg, seed)
        per_crop[label] = evaluate(model, noisy, clean)
        params[label] = num_parameters(model)
    photo_names = list(dict.fromkeys(names))
    header = "| model | params | train s | PSNR (dB) | " + " | ".join(photo_names) + " |"
    rows = [header, "|---" * (4 + len(photo_names)) + "|"]
    raw = {}
    for label, values in per_crop.items():
        by_photo = [values[[n == p for n in names]].mean().item() for p in photo_names]
        raw[label] = {
            "params": params[label],
            "train_seconds": round(seconds[label], 1),
            "psnr": values.mean().item(),
            "psnr_by_photo": dict(zip(photo_names, by_photo, strict=True)),
        }
        rows.append(
            f"| {label} | {params[label]:,} | {seconds[label]:.0f} | {values.mean():.2f} | "
            + " | ".join(f"{v:.2f}" for v in by_photo)
            + " |"
        )
    gain = per_crop["MAXIM UNet"] - per_crop["conv UNet"]
    wins = int((gain > 0).sum())
    summary = (
        f"MAXIM - conv: {gain.mean():+.2f} dB mean over {len(gain)} test crops "
        f"({cfg['test_crop']}x{cfg['test_crop']}), MAXIM better on {wins}; "
        f"{cfg['steps']} steps of {cfg['batch']} crops of {cfg['crop']}x{cfg['crop']}"
    )
    raw["maxim_minus_conv_db"] = gain.mean().item()
    raw["maxim_wins"] = wins
    return {
        "table": "\n".join([summary, "", *rows]),
        "results": raw,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
    }
