"""statsmodels' bundled time series as windowed forecasting datasets, split by time.

``SERIES_NAMES`` and what :func:`load_series` takes from each (``load_pandas().data``):

- ``co2``: weekly Mauna Loa CO2 (ppm), 1958-03-29 .. 2001-12-29, 2,284 weeks, 59 missing.
- ``sunspots``: yearly ``SUNACTIVITY``, 1700 .. 2008, 309 values.
- ``elnino``: monthly sea surface temperature, 1950 .. 2010; the year x month table is read
  row by row into one series of 732 months (column ``sst``).
- ``macrodata``: quarterly US macro data, 1959Q1 .. 2009Q3, 203 quarters, the 12 columns
  other than ``year`` and ``quarter`` (multivariate).
- ``nile``: yearly Nile flow volume at Aswan, 1871 .. 1970, 100 values.

:func:`forecast_windows` cuts the series at ``t1 = round(f_train T)`` and
``t2 = t1 + round(f_val T)`` into train [0, t1), val [t1, t2) and test [t2, T) and makes the
windows of each part from that part alone, so no window, input or target, crosses a boundary.
Missing values (only co2 has them) are filled after the cut, inside each part: linear
interpolation in time between the nearest observed values of the same part, the nearest
observed value at a part's ends; so filling never reads across a boundary either. The mean
and standard deviation used to normalise every part come from the filled train part only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ._optional import require

SERIES_NAMES = ("co2", "sunspots", "elnino", "macrodata", "nile")


def load_series(name: str) -> tuple[torch.Tensor, list[str]]:
    """(values float64 [T, F] with NaN where missing, column names) of a statsmodels series."""
    if name not in SERIES_NAMES:
        raise ValueError(f"unknown series {name!r}; choose from {SERIES_NAMES}")
    datasets = require("statsmodels.api", f"gatelab.data.load_series({name!r})").datasets
    frame = getattr(datasets, name).load_pandas().data
    if name == "co2":
        columns = ["co2"]
    elif name == "sunspots":
        columns = ["SUNACTIVITY"]
    elif name == "nile":
        columns = ["volume"]
    elif name == "macrodata":
        columns = [c for c in frame.columns if c not in ("year", "quarter")]
    else:  # elnino: one row per year, one column per month
        months = frame.drop(columns="YEAR").to_numpy(dtype=np.float64)
        return torch.from_numpy(months.reshape(-1, 1).copy()), ["sst"]
    return torch.from_numpy(frame[columns].to_numpy(dtype=np.float64).copy()), columns


def _fill_missing(values: np.ndarray, part: str) -> np.ndarray:
    """Linear interpolation over time per column; nearest observed value at the ends."""
    out = values.copy()
    t = np.arange(len(values))
    for j in range(values.shape[1]):
        seen = ~np.isnan(values[:, j])
        if not seen.any():
            raise ValueError(f"column {j} of the {part} part has no observed values")
        if not seen.all():
            out[:, j] = np.interp(t, t[seen], values[seen, j])
    return out


class ForecastSet(NamedTuple):
    """inputs [N, lookback, F], targets [N, horizon, F] (normalised float32), and
    starts int64 [N]: the time index of each window's first input step."""

    inputs: torch.Tensor
    targets: torch.Tensor
    starts: torch.Tensor


@dataclass
class ForecastData:
    """Windows of one series split by time, with the train-only normalisation."""

    name: str
    columns: list[str]
    train: ForecastSet
    val: ForecastSet
    test: ForecastSet
    mean: torch.Tensor  # [F], of the train part
    std: torch.Tensor  # [F], of the train part (1 where it is 0)
    bounds: tuple[int, int, int, int]  # 0, t1, t2, T
    values: torch.Tensor  # [T, F] float64, filled part by part, not normalised

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation of [..., F] values."""
        return x * self.std.to(x.dtype) + self.mean.to(x.dtype)


def _series_values(series: str | torch.Tensor, columns: list[str] | None):
    """(name, values [T, F] float64, column names) of a named series or a tensor."""
    if isinstance(series, str):
        values, names = load_series(series)
        if columns is not None:
            unknown = [c for c in columns if c not in names]
            if unknown:
                raise ValueError(f"{series} has no columns {unknown}; it has {names}")
            values = values[:, [names.index(c) for c in columns]]
            names = list(columns)
        return series, values, names
    values = torch.as_tensor(series, dtype=torch.float64)
    values = values.unsqueeze(1) if values.dim() == 1 else values
    if values.dim() != 2:
        raise ValueError(f"series must be [T] or [T, F], got {tuple(values.shape)}")
    names = [str(i) for i in range(values.shape[1])] if columns is None else list(columns)
    return "tensor", values, names


def _window_set(
    normalised: np.ndarray, lookback: int, horizon: int, stride: int, offset: int
) -> ForecastSet:
    """Windows every ``stride`` steps of one part [T_part, F]; starts shifted by ``offset``."""
    window = lookback + horizon
    norm = torch.from_numpy(normalised).float()
    starts = torch.arange(0, max(len(normalised) - window + 1, 0), stride)
    idx = starts[:, None] + torch.arange(window)
    win = norm[idx] if len(starts) else torch.empty(0, window, norm.shape[1])
    return ForecastSet(win[:, :lookback], win[:, lookback:], starts + offset)


def forecast_windows(
    series: str | torch.Tensor,
    lookback: int,
    horizon: int,
    *,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    stride: int = 1,
    columns: list[str] | None = None,
) -> ForecastData:
    """Forecasting windows (``lookback`` inputs -> next ``horizon`` values) of a series.

    ``series`` is a name from ``SERIES_NAMES`` or a [T] / [T, F] tensor (NaN = missing).
    ``columns`` picks columns of a named series (e.g. ``["realgdp", "cpi"]`` of macrodata).
    Windows start every ``stride`` steps inside each part; a part with a positive length
    shorter than ``lookback + horizon`` is an error (make the windows shorter).
    """
    if lookback < 1 or horizon < 1 or stride < 1:
        raise ValueError(f"lookback, horizon, stride must be >= 1, got {lookback, horizon, stride}")
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be 3 numbers >= 0 summing to 1, got {fractions}")
    name, values, names = _series_values(series, columns)
    total = values.shape[0]
    t1 = round(fractions[0] * total)
    t2 = t1 + round(fractions[1] * total)
    bounds = (0, t1, t2, total)
    raw = values.numpy()
    parts = {}
    for part, lo, hi in (("train", 0, t1), ("val", t1, t2), ("test", t2, total)):
        if hi > lo:
            parts[part] = _fill_missing(raw[lo:hi], part)
        else:
            parts[part] = raw[lo:hi]
    if t1 == 0:
        raise ValueError("the train part is empty: normalisation statistics come from it")
    mean = parts["train"].mean(0)
    std = parts["train"].std(0)
    std = np.where(std > 0, std, 1.0)
    window = lookback + horizon
    sets = {}
    for (part, data), lo in zip(parts.items(), bounds[:3], strict=True):
        if 0 < len(data) < window:
            raise ValueError(
                f"the {part} part of {name} has {len(data)} steps, fewer than lookback + "
                f"horizon = {window}; shorten the windows or change fractions={fractions}"
            )
        sets[part] = _window_set((data - mean) / std, lookback, horizon, stride, lo)
    filled = torch.from_numpy(np.concatenate(list(parts.values())))
    return ForecastData(
        name,
        names,
        sets["train"],
        sets["val"],
        sets["test"],
        torch.from_numpy(mean).float(),
        torch.from_numpy(std).float(),
        bounds,
        filled,
    )
