"""Click logs: a synthetic log with known pairwise interactions, and Criteo / Avazu readers.

No CTR dataset ships with any package gatelab may depend on, so the experiments use
:func:`synthetic_ctr`; :func:`load_criteo` and :func:`load_avazu` read the public logs from
a file the user already has (nothing is downloaded). All three return :class:`CTRData`:
x int64 [N, F] with field i's ids in [0, field_dims[i]), y float32 [N] in {0, 1}.
"""

from __future__ import annotations

import csv
import datetime
import gzip
import io
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

OOV, MISSING = 0, 1
"""Reserved ids of every field a reader encodes: rare or unseen values, and empty values."""

CRITEO_FIELDS = [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
AVAZU_DROP = ("id", "click", "hour")


@dataclass
class CTRData:
    """x int64 [N, F]; y float32 [N]; ``field_dims`` ids per field; ``field_names``.

    ``logits`` holds the true log-odds of a synthetic log (None for a real one);
    ``vocabularies`` maps, per field, raw value -> id for a log read from a file, so a
    second split can be encoded with the first one's ids (``vocabularies=``).
    """

    x: torch.Tensor
    y: torch.Tensor
    field_dims: list[int]
    field_names: list[str]
    logits: torch.Tensor | None = None
    vocabularies: list[dict[str, int]] | None = None

    def __len__(self) -> int:
        return self.x.shape[0]

    def split(self, fractions: Sequence[float], seed: int = 0) -> list[CTRData]:
        """Random disjoint splits of the given fractions (summing to at most 1)."""
        if any(f <= 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
            raise ValueError(f"fractions must be > 0 and sum to at most 1, got {fractions}")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        out, start = [], 0
        for f in fractions:
            stop = start + int(round(f * len(self)))
            idx = order[start:stop]
            logits = None if self.logits is None else self.logits[idx]
            names, vocab = self.field_names, self.vocabularies
            out.append(CTRData(self.x[idx], self.y[idx], self.field_dims, names, logits, vocab))
            start = stop
        return out


# -- synthetic log --------------------------------------------------------------------------


DEFAULT_FIELD_DIMS = (500, 200, 100, 50, 40, 20, 10, 5)


@dataclass
class ClickModel:
    """The ground truth of :func:`synthetic_ctr`.

    logit(x) = bias + sum_f w[f, x_f] + scale * sum_{(f, g) in pairs} <u[f, x_f], u[g, x_g]>
    / sqrt(rank), and a click is Bernoulli(sigmoid(logit)). Field values are drawn
    independently, value v of field f with probability proportional to (v + 1)^-zipf (a long
    tail, as real categorical logs have).
    """

    field_dims: list[int]
    main: list[torch.Tensor]  # per field [dim_f]: w
    factors: list[torch.Tensor]  # per field [dim_f, rank]: u
    pairs: list[tuple[int, int]]  # interacting field pairs
    bias: float
    scale: float
    zipf: float

    @classmethod
    def random(
        cls,
        field_dims: Sequence[int] = DEFAULT_FIELD_DIMS,
        *,
        num_pairs: int = 6,
        rank: int = 4,
        main_std: float = 0.5,
        scale: float = 0.6,
        bias: float = -1.5,
        zipf: float = 1.1,
        seed: int = 0,
    ) -> ClickModel:
        """w ~ N(0, main_std^2), u ~ N(0, 1), ``num_pairs`` distinct field pairs at random."""
        dims = list(field_dims)
        if len(dims) < 2 or any(d < 1 for d in dims):
            raise ValueError(f"field_dims needs >= 2 fields of >= 1 value, got {dims}")
        all_pairs = [(f, g) for f in range(len(dims)) for g in range(f + 1, len(dims))]
        if not 0 <= num_pairs <= len(all_pairs):
            raise ValueError(f"num_pairs must be in [0, {len(all_pairs)}], got {num_pairs}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        gen = torch.Generator().manual_seed(seed)
        main = [main_std * torch.randn(d, generator=gen) for d in dims]
        factors = [torch.randn(d, rank, generator=gen) for d in dims]
        chosen = torch.randperm(len(all_pairs), generator=gen)[:num_pairs].sort().values
        pairs = [all_pairs[i] for i in chosen.tolist()]
        return cls(dims, main, factors, pairs, bias, scale, zipf)

    def interactions(self, x: torch.Tensor) -> torch.Tensor:
        """The pairwise (multiplicative) part of the logit, [N]."""
        out = torch.zeros(x.shape[0])
        rank = self.factors[0].shape[1]
        for f, g in self.pairs:
            out += (self.factors[f][x[:, f]] * self.factors[g][x[:, g]]).sum(1)
        return self.scale * out / math.sqrt(rank)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """True log-odds of a click, [N]."""
        main = sum(w[x[:, f]] for f, w in enumerate(self.main))
        return self.bias + main + self.interactions(x)

    def sample(self, num_samples: int, seed: int) -> CTRData:
        gen = torch.Generator().manual_seed(seed)
        cols = []
        for d in self.field_dims:
            p = torch.arange(1, d + 1, dtype=torch.float64) ** -self.zipf
            cols.append(torch.multinomial(p / p.sum(), num_samples, True, generator=gen))
        x = torch.stack(cols, dim=1) if num_samples else torch.zeros(0, len(cols), dtype=torch.long)
        logits = self.logits(x)
        y = (torch.rand(num_samples, generator=gen) < torch.sigmoid(logits)).float()
        names = [f"f{i}" for i in range(len(self.field_dims))]
        return CTRData(x, y, list(self.field_dims), names, logits)


def synthetic_ctr(
    num_samples: int, *, seed: int = 0, model: ClickModel | None = None, **model_kwargs
) -> CTRData:
    """A synthetic click log with known pairwise interactions (see :class:`ClickModel`).

    Without ``model`` the truth is ``ClickModel.random(seed=seed, **model_kwargs)``. To draw
    train and test logs of one truth, build the model once and vary ``seed``. Defaults: 8
    fields of 500..5 values, 6 interacting pairs of rank 4 and scale 0.6, main effects of
    std 0.5, bias -1.5. A logistic regression captures only the main effects; the
    pairwise products are what FinalMLP and DualMLP must learn.
    """
    if model is None:
        model = ClickModel.random(seed=seed, **model_kwargs)
    elif model_kwargs:
        raise ValueError(f"pass a model or its arguments, not both: {sorted(model_kwargs)}")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    return model.sample(num_samples, seed + 1)


# -- readers for the public logs --------------------------------------------------------------


def _open_text(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path} (gatelab reads logs you already have)")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _encode(
    labels: list[float],
    rows: list[list[str]],
    names: list[str],
    min_count: int,
    vocabularies: list[dict[str, int]] | None,
) -> CTRData:
    """Strings -> ids: OOV (0) for rare or unseen values, MISSING (1) for empty ones, then
    the values seen at least ``min_count`` times, most frequent first."""
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    if vocabularies is None:
        vocabularies = []
        for f in range(len(names)):
            counts = Counter(row[f] for row in rows if row[f] != "")
            kept = [v for v, c in counts.items() if c >= min_count]
            kept.sort(key=lambda v, counts=counts: (-counts[v], v))
            vocabularies.append({v: i + 2 for i, v in enumerate(kept)})
    elif len(vocabularies) != len(names):
        raise ValueError(f"vocabularies has {len(vocabularies)} fields, the log {len(names)}")
    ids = [[_lookup(v, vocab) for v, vocab in zip(row, vocabularies, strict=True)] for row in rows]
    x = torch.tensor(ids, dtype=torch.int64).reshape(len(rows), len(names))
    dims = [len(v) + 2 for v in vocabularies]
    return CTRData(x, torch.tensor(labels, dtype=torch.float32), dims, names, None, vocabularies)


def _lookup(value: str, vocabulary: dict[str, int]) -> int:
    return MISSING if value == "" else vocabulary.get(value, OOV)


def _criteo_int(value: str) -> str:
    """The Criteo winners' transform of a count: v > 2 -> floor(log(v)^2), kept as a category."""
    if value == "":
        return value
    v = int(value)
    return str(int(math.log(v) ** 2)) if v > 2 else str(v)


def _label(value: str, where: str) -> float:
    if value not in ("0", "1"):
        raise ValueError(f"{where}: the label must be 0 or 1, got {value!r}")
    return float(value)


def load_criteo(
    path: str | Path,
    *,
    min_count: int = 1,
    max_rows: int | None = None,
    vocabularies: list[dict[str, int]] | None = None,
) -> CTRData:
    """Read a Criteo display-advertising log (Kaggle 2014 ``train.txt``, or ``.gz``).

    Each line: label, 13 integer fields I1..I13 and 26 hashed categorical fields C1..C26,
    tab-separated, empty when missing (40 columns). Every field becomes categorical: the
    integers through floor(log(v)^2) for v > 2 (the transform of the challenge winners
    that FuxiCTR also uses), the rest as their strings. Values seen fewer than
    ``min_count`` times map to OOV (FuxiCTR's Criteo setting uses 10). ``vocabularies``
    from an earlier load encode another split with the same ids.
    """
    labels, rows = [], []
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if max_rows is not None and len(rows) >= max_rows:
                break
            cols = line.rstrip("\r\n").split("\t")
            if len(cols) != 40:
                raise ValueError(
                    f"{path}:{lineno}: expected 40 tab-separated columns (label, I1..I13, "
                    f"C1..C26), got {len(cols)}; the unlabelled test.txt is not supported"
                )
            labels.append(_label(cols[0], f"{path}:{lineno}"))
            rows.append([_criteo_int(v) for v in cols[1:14]] + cols[14:])
    return _encode(labels, rows, list(CRITEO_FIELDS), min_count, vocabularies)


def _avazu_time(hour: str, where: str) -> list[str]:
    """YYMMDDHH -> [hour of day, weekday] (FuxiCTR's Avazu features)."""
    if len(hour) != 8 or not hour.isdigit():
        raise ValueError(f"{where}: hour must be YYMMDDHH, got {hour!r}")
    day = datetime.date(2000 + int(hour[:2]), int(hour[2:4]), int(hour[4:6]))
    return [hour[6:], str(day.weekday())]


def load_avazu(
    path: str | Path,
    *,
    min_count: int = 1,
    max_rows: int | None = None,
    vocabularies: list[dict[str, int]] | None = None,
) -> CTRData:
    """Read an Avazu click log (Kaggle 2014 ``train.csv``, or ``.gz``).

    CSV with a header: ``id, click, hour, C1, banner_pos, site_id, ..., C21``. ``click`` is
    the label, ``id`` is dropped, ``hour`` (YYMMDDHH) becomes two fields, hour of day and
    weekday; every other column is categorical. ``min_count`` and ``vocabularies`` as
    :func:`load_criteo` (FuxiCTR's Avazu setting uses min_count 2).
    """
    labels, rows = [], []
    with _open_text(path) as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or "click" not in header or "hour" not in header:
            raise ValueError(f"{path}: expected an Avazu CSV header with 'click' and 'hour'")
        keep = [i for i, name in enumerate(header) if name not in AVAZU_DROP]
        at_click, at_hour = header.index("click"), header.index("hour")
        for lineno, cols in enumerate(reader, 2):
            if max_rows is not None and len(rows) >= max_rows:
                break
            where = f"{path}:{lineno}"
            if len(cols) != len(header):
                raise ValueError(f"{where}: expected {len(header)} columns, got {len(cols)}")
            labels.append(_label(cols[at_click], where))
            rows.append(_avazu_time(cols[at_hour], where) + [cols[i] for i in keep])
    names = ["hour_of_day", "weekday"] + [header[i] for i in keep]
    return _encode(labels, rows, names, min_count, vocabularies)


def iterate_batches(data: CTRData, batch_size: int, seed: int) -> Iterable[tuple]:
    """One shuffled pass over (x, y) in batches of ``batch_size`` (the last may be short)."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(data), batch_size):
        idx = order[start : start + batch_size]
        yield data.x[idx], data.y[idx]
