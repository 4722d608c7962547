"""Data that ships with Python and the data extras, synthetic tasks, and file readers.

Nothing here touches the network. scikit-learn, scikit-image and statsmodels are imported
inside the functions that need them (``pip install 'gatelab[data]'``).

- :mod:`~gatelab.data.text`: the two-domain (prose / code) byte-level corpus, resumable LM
  batches and per-domain evaluation batches.
- :mod:`~gatelab.data.images`: digits with rotations, photographs and patches.
- :mod:`~gatelab.data.transforms`: named digit transformations (rotations, flips, inversion,
  noise, shift) that make a family of tasks from one image set.
- :mod:`~gatelab.data.distort`: simulated users' handwriting (slant, stroke width, elastic).
- :mod:`~gatelab.data.series`: statsmodels series as forecasting windows split by time.
- :mod:`~gatelab.data.synthetic`: MQAR, Gaussian mixture-of-experts regression, MMoE tasks.
- :mod:`~gatelab.data.bios`: synthetic biographies (bioS of Physics of LMs 3.3) and the
  bits-of-knowledge measure.
- :mod:`~gatelab.data.ctr`: synthetic click logs with known pairwise interactions; Criteo
  and Avazu readers for files the user has.
- :mod:`~gatelab.data.graphs`: stochastic block model graphs with Gaussian node features,
  Zachary's karate club (networkx).
- :mod:`~gatelab.data.loaders`: MNIST / Fashion-MNIST / EMNIST (IDX) and CIFAR-10 (binary).
"""

from .batches import TensorBatches
from .bios import Bios, BioSpec, bios, knowledge_bits
from .ctr import ClickModel, CTRData, load_avazu, load_criteo, synthetic_ctr
from .distort import HandwritingStyle, distort, random_style
from .graphs import GraphData, block_densities, karate_club, sbm_graph
from .images import (
    PHOTO_NAMES,
    ImageSet,
    extract_patches,
    load_digits,
    load_photo,
    load_photos,
    photo_patches,
    rotate,
)
from .loaders import (
    CIFAR10_CLASSES,
    EMNIST_CLASSES,
    load_cifar10,
    load_emnist,
    load_fashion_mnist,
    load_mnist,
    read_idx,
)
from .series import SERIES_NAMES, ForecastData, ForecastSet, forecast_windows, load_series
from .shard import ShardedBatches, shard_data, shard_rows
from .synthetic import (
    GaussianMoEData,
    GaussianMoEParams,
    MMoEData,
    MQARData,
    gaussian_moe,
    mmoe_synthetic,
    mqar,
)
from .text import (
    DOMAINS,
    EOS,
    IGNORE_INDEX,
    ByteTokenizer,
    Document,
    EvalBatches,
    LMBatch,
    LMBatches,
    TextCorpus,
    code_documents,
    load_corpus,
    prose_documents,
)
from .transforms import DIGIT_TRANSFORMS, transform_images

__all__ = [
    "GraphData",
    "block_densities",
    "karate_club",
    "sbm_graph",
    "BioSpec",
    "Bios",
    "bios",
    "knowledge_bits",
    "ClickModel",
    "CTRData",
    "load_avazu",
    "load_criteo",
    "synthetic_ctr",
    "TensorBatches",
    "ShardedBatches",
    "shard_data",
    "shard_rows",
    "CIFAR10_CLASSES",
    "DIGIT_TRANSFORMS",
    "HandwritingStyle",
    "distort",
    "random_style",
    "DOMAINS",
    "EMNIST_CLASSES",
    "EOS",
    "IGNORE_INDEX",
    "PHOTO_NAMES",
    "SERIES_NAMES",
    "ByteTokenizer",
    "Document",
    "EvalBatches",
    "ForecastData",
    "ForecastSet",
    "GaussianMoEData",
    "GaussianMoEParams",
    "ImageSet",
    "LMBatch",
    "LMBatches",
    "MMoEData",
    "MQARData",
    "TextCorpus",
    "code_documents",
    "extract_patches",
    "forecast_windows",
    "gaussian_moe",
    "load_cifar10",
    "load_corpus",
    "load_digits",
    "load_emnist",
    "load_fashion_mnist",
    "load_mnist",
    "load_photo",
    "load_photos",
    "load_series",
    "mmoe_synthetic",
    "mqar",
    "photo_patches",
    "prose_documents",
    "read_idx",
    "rotate",
    "transform_images",
]
