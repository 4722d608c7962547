"""The run directory's bookkeeping: checking it before a run, and the logs written into it.

``run_dir/`` holds ``metrics.jsonl``, ``routing.jsonl``, TensorBoard event files (when the
``tensorboard`` package is installed and ``TrainConfig.tensorboard`` is on) and
``checkpoints/``. In a distributed run rank 0 writes the logs; the other ranks' logs write
nothing.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from ..io import ensure_writable_dir
from .checkpoint import latest_checkpoint, remove_stale_temporaries
from .config import TrainError
from .dcp import latest_dcp_checkpoint
from .metrics import JsonlLog, TensorBoardLog, truncate_jsonl

__all__ = ["RunLogs", "prepare_run_dir", "truncate_logs"]

LOG_NAMES = ("metrics.jsonl", "routing.jsonl")


def prepare_run_dir(run_dir: Path, resume: bool) -> Path:
    """Fail before any training when ``run_dir`` cannot be written, (without ``resume``)
    already holds a run, or holds a run's files that no checkpoint JSON accounts for (a
    resume would start from step 0 and overwrite them); remove what a killed save left
    behind. Returns the checkpoint directory."""
    checkpoint_dir = run_dir / "checkpoints"
    fix = "choose another run_dir or fix its permissions"
    ensure_writable_dir(checkpoint_dir, "run directory", fix, error=TrainError)
    existing = latest_checkpoint(checkpoint_dir) or latest_dcp_checkpoint(checkpoint_dir)
    leftovers = _run_files(run_dir, checkpoint_dir)
    if existing is None and leftovers:
        raise TrainError(
            f"run directory {run_dir} holds {' and '.join(leftovers)} but no checkpoint JSON "
            f"(checkpoints/step_*.json), so there is nothing to resume from and a new run would "
            "overwrite them; restore the checkpoint JSON files to resume, or move these files "
            "away (or choose another run_dir) to start afresh"
        )
    if not resume and existing is not None:
        raise TrainError(
            f"run directory {run_dir} already holds a run (checkpoint {existing.name}); "
            "continue it with --resume (resume=True from Python), or choose another run_dir"
        )
    remove_stale_temporaries(checkpoint_dir)
    return checkpoint_dir


def _run_files(run_dir: Path, checkpoint_dir: Path) -> list[str]:
    """What an earlier run left: tensors files and non-empty logs, described for a message."""
    tensors = list(checkpoint_dir.glob("*.safetensors"))
    found = [f"{len(tensors)} .safetensors file{'s' * (len(tensors) != 1)}"] if tensors else []
    for name in LOG_NAMES:
        with contextlib.suppress(OSError):
            if (run_dir / name).stat().st_size > 0:
                found.append(name)
    return found


def truncate_logs(run_dir: Path, step: int) -> None:
    """Drop the JSONL lines a stopped run wrote after the checkpoint of ``step``."""
    for name in LOG_NAMES:
        truncate_jsonl(run_dir / name, step)


class RunLogs:
    """The logs of one ``Trainer.fit`` call: metrics, routing telemetry, TensorBoard.

    ``main`` False (a distributed rank other than 0) writes nothing. ``start_step`` > 0 (a
    resumed run) makes TensorBoard drop events an earlier invocation wrote after it.
    """

    def __init__(
        self, run_dir: Path, main: bool, routing: bool, tensorboard: bool, start_step: int = 0
    ):
        self.metrics = JsonlLog(run_dir / LOG_NAMES[0]) if main else None
        self.routing = JsonlLog(run_dir / LOG_NAMES[1]) if main and routing else None
        self.board = None
        if main and tensorboard:
            purge = start_step + 1 if start_step > 0 else None
            self.board = TensorBoardLog.create(run_dir, purge_step=purge)

    def write(self, record: dict[str, Any]) -> None:
        """A metrics record (``kind`` "train" or "eval")."""
        if self.metrics is not None:
            self.metrics.write(record)
        if self.board is not None:
            self.board.write(record)

    def write_routing(self, record: dict[str, Any]) -> None:
        if self.routing is not None:
            self.routing.write(record)
        if self.board is not None:
            self.board.write_routing(record)

    def sync(self) -> None:
        """Everything logged so far on disk (before a checkpoint: logs never lag it)."""
        for log in (self.metrics, self.routing, self.board):
            if log is not None:
                log.sync()

    def close(self) -> None:
        for log in (self.metrics, self.routing, self.board):
            if log is not None:
                log.close()
