"""Images that ship with scikit-learn and scikit-image: digits, rotations, photographs, patches.

- :func:`load_digits`: scikit-learn's 1,797 8x8 handwritten digits as float32 [N, 1, 8, 8] in
  [0, 1] (the 0..16 counts divided by 16) with a seeded, class-stratified train/val/test split.
- :func:`rotate`: rotation by any angle (degrees, counter-clockwise as displayed, the direction
  of ``torch.rot90(x, 1, dims=(-2, -1))``) about the image centre, by ``grid_sample``:
  bilinear (or nearest) interpolation, ``align_corners=False``, zeros outside the image. The
  sine and cosine of multiples of 90 degrees are exact, so those rotations move pixels
  without blending them. For mode-shift experiments: train on upright digits, test rotated.
- :func:`load_photos` / :func:`photo_patches`: the photographs scikit-image ships in its wheel
  (``PHOTO_NAMES``, all loadable offline; those it would download, e.g. ``brain``, are not
  listed) and scikit-learn's two sample images (``china``, ``flower``), as float32 [C, H, W]
  in [0, 1], cut into [P, C, size, size] patches for restoration and neural-field work.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ._optional import require

SKIMAGE_PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "rocket",
    "text",
)
SKLEARN_PHOTOS = ("china", "flower")
PHOTO_NAMES = SKIMAGE_PHOTOS + SKLEARN_PHOTOS

# ITU-R BT.709 luma, the weights of skimage.color.rgb2gray.
_LUMA = (0.2125, 0.7154, 0.0721)


class ImageSet(NamedTuple):
    """images [N, C, H, W] (float32 in [0, 1] from scikit-learn, uint8 from the file
    loaders of :mod:`gatelab.data.loaders`), labels int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor


def load_digits(
    *, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2
) -> dict[str, ImageSet]:
    """scikit-learn's digits as ``{"train", "val", "test"}`` ImageSets of [N, 1, 8, 8].

    Each class is permuted with a generator seeded by ``seed`` and cut into val, test and
    train parts of ``round(fraction * class size)`` images, so every split holds every class
    in about the same proportion; each split is then in dataset order.
    """
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"need val_fraction, test_fraction >= 0 with a sum < 1, got {val_fraction}, "
            f"{test_fraction}"
        )
    datasets = require("sklearn.datasets", "gatelab.data.load_digits")
    x, y = datasets.load_digits(return_X_y=True)
    images = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    labels = torch.tensor(y, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {"train": [], "val": [], "test": []}
    for c in range(10):
        idx = torch.nonzero(labels == c).squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_val, n_test = round(val_fraction * len(idx)), round(test_fraction * len(idx))
        parts["val"].append(idx[:n_val])
        parts["test"].append(idx[n_val : n_val + n_test])
        parts["train"].append(idx[n_val + n_test :])
    out = {}
    for name, chunks in parts.items():
        idx = torch.cat(chunks).sort().values
        out[name] = ImageSet(images[idx], labels[idx])
    return out


def rotate(
    images: torch.Tensor, angle: float | torch.Tensor, *, mode: str = "bilinear"
) -> torch.Tensor:
    """Rotate [..., H, W] float images counter-clockwise by ``angle`` degrees.

    ``angle`` is one number for all images or a tensor [N] of one angle per image of
    ``images`` [N, ..., H, W]. See the module docstring for the interpolation.
    """
    if images.dim() < 2:
        raise ValueError(f"images must have at least 2 dims [..., H, W], got {images.shape}")
    if not images.is_floating_point():
        raise TypeError(f"rotate needs float images, got {images.dtype}")
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    shape = images.shape
    h, w = shape[-2:]
    deg = torch.as_tensor(angle, dtype=torch.float64)
    if deg.dim() == 0:
        x = images.reshape(-1, 1, h, w)
        deg = deg.expand(x.shape[0])
    elif deg.dim() == 1 and images.dim() >= 3 and len(deg) == shape[0]:
        x = images.reshape(shape[0], -1, h, w)
    else:
        raise ValueError(
            f"angle must be a number or a tensor [N] with N = images.shape[0], got angle "
            f"shape {tuple(deg.shape)} for images {tuple(shape)}"
        )
    rad = deg * (math.pi / 180.0)
    exact = torch.remainder(deg, 90.0) == 0
    c = torch.where(exact, torch.cos(rad).round(), torch.cos(rad))
    s = torch.where(exact, torch.sin(rad).round(), torch.sin(rad))
    zero = torch.zeros_like(c)
    # Output pixel (x, y) (x right, y down, centred) samples the input at R^-1 (x, y),
    # written in the normalised [-1, 1] coordinates of affine_grid.
    theta = torch.stack(
        [torch.stack([c, -s * h / w, zero], 1), torch.stack([s * w / h, c, zero], 1)], 1
    ).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)
    return out.reshape(shape)


def _to_chw(array, channels: int | None) -> torch.Tensor:
    img = torch.from_numpy(np.array(array))  # a copy: some loaders return read-only arrays
    if img.dtype == torch.bool:
        img = img.float()
    elif img.dtype == torch.uint8:
        img = img.float() / 255.0
    else:
        img = img.float()
    img = img.unsqueeze(0) if img.dim() == 2 else img.permute(2, 0, 1)[:3].contiguous()
    if channels is None or channels == img.shape[0]:
        return img
    if channels == 1:
        return torch.tensordot(torch.tensor(_LUMA), img, dims=1).unsqueeze(0)
    if channels == 3:
        return img.expand(3, -1, -1).contiguous()
    raise ValueError(f"channels must be None, 1 or 3, got {channels}")


def load_photo(name: str, *, channels: int | None = None) -> torch.Tensor:
    """One photograph as float32 [C, H, W] in [0, 1].

    ``channels``: None keeps the image's own (1 or 3), 1 converts colour to BT.709 luma, 3
    repeats grey. ``name`` is one of ``PHOTO_NAMES`` or another ``skimage.data`` image.
    """
    if name in SKLEARN_PHOTOS:
        datasets = require("sklearn.datasets", "gatelab.data.load_photo")
        return _to_chw(datasets.load_sample_image(f"{name}.jpg"), channels)
    data = require("skimage.data", "gatelab.data.load_photo")
    loader = getattr(data, name, None) if not name.startswith("_") else None
    if name not in SKIMAGE_PHOTOS and not callable(loader):
        raise ValueError(f"unknown photograph {name!r}; choose from {PHOTO_NAMES}")
    try:
        array = loader()
    except Exception as err:  # skimage asks for pooch and a download for some images
        raise FileNotFoundError(
            f"skimage.data.{name} is not shipped with scikit-image (it would be downloaded); "
            f"use one of {PHOTO_NAMES}"
        ) from err
    if getattr(array, "ndim", 0) not in (2, 3):
        raise ValueError(f"skimage.data.{name} is not a 2-D image (shape {array.shape})")
    return _to_chw(array, channels)


def load_photos(
    names: tuple[str, ...] | list[str] | None = None, *, channels: int | None = None
) -> dict[str, torch.Tensor]:
    """``{name: [C, H, W]}`` for ``names`` (default ``PHOTO_NAMES``), in that order."""
    return {n: load_photo(n, channels=channels) for n in (names or PHOTO_NAMES)}


def extract_patches(images: torch.Tensor, size: int, stride: int | None = None) -> torch.Tensor:
    """Square patches [P, C, size, size] of [C, H, W] or [N, C, H, W] images.

    Patches start every ``stride`` pixels (default ``size``: no overlap) and lie wholly inside
    the image; P = N * ((H - size) // stride + 1) * ((W - size) // stride + 1), ordered by
    image, then row, then column.
    """
    stride = size if stride is None else stride
    if size < 1 or stride < 1:
        raise ValueError(f"size and stride must be >= 1, got {size}, {stride}")
    x = images.unsqueeze(0) if images.dim() == 3 else images
    if x.dim() != 4:
        raise ValueError(f"images must be [C, H, W] or [N, C, H, W], got {tuple(images.shape)}")
    n, c, h, w = x.shape
    if size > h or size > w:
        raise ValueError(f"patch size {size} is larger than the image ({h}x{w})")
    p = x.unfold(2, size, stride).unfold(3, size, stride)  # [N, C, nh, nw, size, size]
    return p.permute(0, 2, 3, 1, 4, 5).reshape(-1, c, size, size).contiguous()


def photo_patches(
    size: int = 32,
    stride: int | None = None,
    *,
    names: tuple[str, ...] | list[str] | None = None,
    channels: int = 3,
) -> torch.Tensor:
    """Patches [P, channels, size, size] of every photograph in ``names``, in order."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    photos = load_photos(names, channels=channels)
    return torch.cat([extract_patches(img, size, stride) for img in photos.values()])
