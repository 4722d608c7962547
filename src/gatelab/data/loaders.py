"""Readers for image datasets a user already has on disk; nothing is downloaded, ever.

- MNIST, Fashion-MNIST and EMNIST in the IDX format (``read_idx``), plain or gzipped.
- CIFAR-10, binary version only (``data_batch_1.bin`` ... ``data_batch_5.bin``,
  ``test_batch.bin``: records of 1 label byte + 3,072 pixel bytes, R then G then B planes
  of 32x32, row-major). The "python version" is a pickle, and gatelab never unpickles files
  it did not write, so it is not read.

Every loader returns an :class:`~gatelab.data.images.ImageSet` of uint8 images
[N, C, H, W] and int64 labels [N]. A missing file raises FileNotFoundError naming every
missing file, the directory to put it in and where to get it; a file with a wrong magic
number, a wrong size or out-of-range labels raises ValueError naming the file.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
import torch

from .images import ImageSet

# IDX type byte -> big-endian numpy dtype
_IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/ (mirror of yann.lecun.com/exdb/mnist)"
FASHION_MNIST_URL = "https://github.com/zalandoresearch/fashion-mnist (folder data/fashion)"
EMNIST_URL = (
    "https://www.nist.gov/itl/products-and-services/emnist-dataset "
    "('Binary format as the original MNIST dataset': gzip.zip, whose gzip/ folder holds them)"
)
CIFAR10_URL = (
    "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz "
    "(the 'binary version'; extracting it makes cifar-10-batches-bin/)"
)
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
EMNIST_CLASSES = {
    "byclass": 62,
    "bymerge": 47,
    "balanced": 47,
    "letters": 26,
    "digits": 10,
    "mnist": 10,
}
_CIFAR_RECORD = 1 + 3 * 32 * 32


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"{path} is not a valid gzip file ({err}); download it again") from err
    return data


def read_idx(path: str | Path) -> torch.Tensor:
    """The array in an IDX file (``.gz`` is decompressed), in native byte order.

    Format: two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, one big-endian uint32 per
    dimension, then the data, big-endian, row-major.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ValueError(
            f"{path} is not an IDX file: bad magic number {data[:4].hex() or '(empty file)'} "
            f"(expected 0000 then a type byte in {[hex(t) for t in _IDX_TYPES]})"
        )
    dtype, ndim = _IDX_TYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path} is truncated: {len(data)} bytes, header alone needs {header}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(
            f"{path} is corrupt or truncated: header says shape {shape} ({expected} bytes) "
            f"but the file holds {len(data)} bytes"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def _locate(root: Path, names: list[str]) -> tuple[list[Path], list[str]]:
    found, missing = [], []
    for name in names:
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                found.append(candidate)
                break
        else:
            missing.append(name)
    return found, missing


def _missing(dataset: str, root: Path, missing: list[str], url: str) -> None:
    listing = "\n".join(f"  {root / name}  (or {name}.gz)" for name in missing)
    raise FileNotFoundError(
        f"{dataset} files not found. Put these files in {root}:\n{listing}\n"
        f"Get them from {url}. gatelab never downloads data."
    )


def _idx_dataset(
    root: str | Path,
    dataset: str,
    prefix: str,
    split: str,
    url: str,
    num_classes: int,
    first_label: int = 0,
    transpose: bool = False,
) -> ImageSet:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    names = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    found, missing = _locate(root, names)
    if missing:
        _missing(f"{dataset} ({split})", root, missing, url)
    images, labels = (read_idx(p) for p in found)
    if images.dim() != 3 or images.dtype != torch.uint8:
        raise ValueError(
            f"{found[0]} must hold uint8 images [N, H, W], got {images.dtype} {tuple(images.shape)}"
        )
    if labels.dim() != 1 or labels.dtype != torch.uint8:
        raise ValueError(
            f"{found[1]} must hold uint8 labels [N], got {labels.dtype} {tuple(labels.shape)}"
        )
    if len(images) != len(labels):
        raise ValueError(
            f"{found[0]} has {len(images)} images but {found[1]} has {len(labels)} labels"
        )
    labels = labels.long()
    if len(labels) and (labels.min() < first_label or labels.max() >= first_label + num_classes):
        raise ValueError(
            f"{found[1]} has labels outside [{first_label}, {first_label + num_classes - 1}]: "
            f"min {int(labels.min())}, max {int(labels.max())}"
        )
    if transpose:
        images = images.transpose(1, 2)
    return ImageSet(images.unsqueeze(1).contiguous(), labels)


def load_mnist(root: str | Path, split: str = "train") -> ImageSet:
    """MNIST from ``root``: uint8 [N, 1, 28, 28] images, labels 0..9.

    Files: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
    ``t10k-labels-idx1-ubyte``, each optionally gzipped (``.gz``).
    """
    prefix = "train" if split == "train" else "t10k"
    return _idx_dataset(root, "MNIST", prefix, split, MNIST_URL, 10)


def load_fashion_mnist(root: str | Path, split: str = "train") -> ImageSet:
    """Fashion-MNIST from ``root``; the same file names and layout as MNIST."""
    prefix = "train" if split == "train" else "t10k"
    return _idx_dataset(root, "Fashion-MNIST", prefix, split, FASHION_MNIST_URL, 10)


def load_emnist(
    root: str | Path, subset: str = "balanced", split: str = "train", *, transpose: bool = True
) -> ImageSet:
    """EMNIST ``subset`` (``EMNIST_CLASSES``) from ``root``: ``emnist-{subset}-{split}-...``.

    The files store each image transposed; ``transpose=True`` turns them upright. Labels
    are 0-based except ``letters``, whose labels are 1..26 as in the files.
    """
    if subset not in EMNIST_CLASSES:
        raise ValueError(f"unknown EMNIST subset {subset!r}; choose from {tuple(EMNIST_CLASSES)}")
    first = 1 if subset == "letters" else 0
    return _idx_dataset(
        root,
        f"EMNIST {subset}",
        f"emnist-{subset}-{split}",
        split,
        EMNIST_URL,
        EMNIST_CLASSES[subset],
        first,
        transpose,
    )


def _read_cifar_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    data = path.read_bytes()
    if not data or len(data) % _CIFAR_RECORD:
        raise ValueError(
            f"{path} is corrupt or truncated: {len(data)} bytes is not a positive multiple of "
            f"the {_CIFAR_RECORD}-byte record (1 label byte + 3072 pixel bytes)"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0]
    if labels.max() >= 10:
        raise ValueError(f"{path} has label {int(labels.max())} > 9: not a CIFAR-10 binary file")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def load_cifar10(root: str | Path, split: str = "train") -> ImageSet:
    """CIFAR-10 binary version from ``root`` or ``root/cifar-10-batches-bin``.

    train: ``data_batch_1.bin`` ... ``data_batch_5.bin`` (50,000 images); test:
    ``test_batch.bin`` (10,000). uint8 [N, 3, 32, 32], labels 0..9 (``CIFAR10_CLASSES``).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else ["test_batch.bin"]
    folder = root / "cifar-10-batches-bin"
    if not (root / names[0]).is_file() and folder.is_dir():
        root = folder
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        listing = "\n".join(f"  {root / n}" for n in missing)
        pickled = any((root / n.removesuffix(".bin")).exists() for n in names)
        hint = (
            " The files there without .bin are the pickled 'python version', which gatelab "
            "does not read."
            if pickled
            else ""
        )
        raise FileNotFoundError(
            f"CIFAR-10 ({split}) files not found. Put these files in {root}:\n{listing}\n"
            f"Get them from {CIFAR10_URL}.{hint} gatelab never downloads data."
        )
    parts = [_read_cifar_file(root / n) for n in names]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]).astype(np.int64))
    return ImageSet(images, labels)
