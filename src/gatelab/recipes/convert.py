"""Conversion between a run's two checkpoint formats (``gatelab convert``).

A run on a device mesh writes distributed checkpoints (:mod:`gatelab.train.dcp`: a
directory of per-rank safetensors shards); every other command reads gatelab's single-file
checkpoints (:mod:`gatelab.train.checkpoint`). Both hold the same state (model, AdamW
moments, scheduler, data position, RNG, step), so each converts into the other in one
process: the run's recipe (stored in the checkpoint) builds the model, optimizer and
scheduler, one format loads into them and the other is written from them. A converted
checkpoint resumes the run (a single-file one in one process or under ``--ep``; a DCP one
under any ``--mesh``), and ``gatelab eval``, ``info`` and ``prune`` read a single-file one.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..train.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from ..train.dcp import is_dcp_checkpoint, latest_dcp_checkpoint, load_dcp, read_dcp_meta, save_dcp
from .run import build_run

__all__ = ["checkpoint_to_dcp", "dcp_to_checkpoint", "find_source"]


def _trainer(config: dict, where: Path):
    """The run's model, data and trainer, rebuilt from a checkpoint's stored config."""
    if not isinstance(config, dict) or not isinstance(config.get("run"), dict):
        raise CheckpointError(f"{where} holds no run config; it cannot be converted")
    recipe = {**config["run"], "train": dict(config.get("train") or {})}
    run = build_run(recipe)
    return run, run.trainer(evaluate=False)


def dcp_to_checkpoint(source: str | os.PathLike, directory: str | os.PathLike) -> Path:
    """A DCP checkpoint -> a single-file checkpoint in ``directory``; returns its JSON path."""
    source = Path(source)
    meta = read_dcp_meta(source)
    run, trainer = _trainer(meta.get("config"), source)
    ckpt = load_dcp(
        source, run.model, trainer.optimizer, trainer.scheduler, trainer.config, run.data
    )
    return save_checkpoint(
        directory,
        ckpt.step,
        run.model,
        trainer.optimizer,
        trainer.scheduler,
        data_state=run.data.state_dict(),
        config=trainer.config,
        extra=ckpt.extra,
    )


def checkpoint_to_dcp(source: str | os.PathLike, directory: str | os.PathLike) -> Path:
    """A single-file checkpoint (its JSON) -> a DCP checkpoint in ``directory``."""
    meta, _ = read_checkpoint(source)
    run, trainer = _trainer(meta.get("config"), Path(source))
    ckpt = load_checkpoint(
        source, run.model, trainer.optimizer, trainer.scheduler, trainer.config, run.data
    )
    return save_dcp(
        directory,
        ckpt.step,
        run.model,
        trainer.optimizer,
        trainer.scheduler,
        run.data.state_dict(),
        trainer.config,
        ckpt.extra,
    )


def find_source(where: str | os.PathLike) -> tuple[str, Path]:
    """("dcp" | "file", path) of what ``gatelab convert`` was given: a DCP checkpoint
    directory, a single-file checkpoint's JSON, or a run directory (its latest DCP
    checkpoint)."""
    path = Path(where)
    if is_dcp_checkpoint(path):
        return "dcp", path
    if path.is_file() and path.suffix == ".json":
        return "file", path
    for directory in (path / "checkpoints", path):
        found = latest_dcp_checkpoint(directory)
        if found is not None:
            return "dcp", found
    raise ValueError(
        f"{where}: no DCP checkpoint found; give a run directory of a --mesh run, a "
        "step_*.dcp directory, or a single-file checkpoint's .json to convert to DCP"
    )
