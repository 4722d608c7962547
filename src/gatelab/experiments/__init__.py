"""Experiments: the runs that test a paper's claim on embedded or synthetic data.

Each experiment is one module in this package. It defines

- ``NAME``: the command-line name, kebab-case (``gating-theory``);
- ``DESCRIPTION``: one line saying what it compares;
- ``run(scale, seed, out_dir) -> dict``. ``scale`` is ``"smoke"`` (seconds, run by the
  tests so the code cannot rot) or ``"full"`` (the run whose numbers ``docs/results.md``
  quotes). The result must hold ``"table"``, a markdown table of what was measured, and
  may hold raw numbers and the paths of files (plots) it wrote under ``out_dir``.

``gatelab experiment NAME`` runs one at full scale, prints the table and writes
``out_dir/result.json``. Modules are found by name, so adding an experiment means adding a
module: no list to edit.
"""

from __future__ import annotations

import importlib
import pkgutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

SCALES = ("smoke", "full")


@dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    module: ModuleType

    def run(self, scale: str = "full", seed: int = 0, out_dir: str | Path | None = None) -> dict:
        """Run at ``scale`` and return the result with its timing added."""
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
        out = Path(out_dir if out_dir is not None else f"runs/experiments/{self.name}")
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        result = self.module.run(scale=scale, seed=seed, out_dir=out)
        if not isinstance(result, dict) or not isinstance(result.get("table"), str):
            raise TypeError(f"experiment {self.name!r} must return a dict with a 'table' string")
        return {
            "experiment": self.name,
            "scale": scale,
            "seed": seed,
            "seconds": round(time.perf_counter() - start, 1),
            **result,
        }


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def names() -> list[str]:
    """The registered experiment names."""
    return [get_module_name(m) for m in _modules()]


def get_module_name(module_name: str) -> str:
    return module_name.replace("_", "-")


def get(name: str) -> Experiment:
    """The experiment called ``name``; a ValueError listing the valid names otherwise."""
    module_name = name.replace("-", "_")
    if module_name not in _modules():
        raise ValueError(f"unknown experiment {name!r}; valid names are: {', '.join(names())}")
    module = importlib.import_module(f"{__name__}.{module_name}")
    return Experiment(module.NAME, module.DESCRIPTION, module)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (0 for a single value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std


def mean_pm_std(values: list[float], digits: int = 3) -> str:
    """ "mean ± std" for a table cell."""
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


__all__ = ["SCALES", "Experiment", "get", "mean_pm_std", "mean_std", "names"]
