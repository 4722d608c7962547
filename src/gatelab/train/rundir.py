"""The run directory's bookkeeping: checking it before a run, and the logs written into it.

``run_dir/`` holds ``metrics.jsonl``, ``routing.jsonl``, TensorBoard event files (when the
``tensorboard`` package is installed and ``TrainConfig.tensorboard`` is on) and
``checkpoints/``. In a distributed run rank 0 writes the logs; the other ranks' logs write
nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..io import ensure_writable_dir
from .checkpoint import latest_checkpoint, remove_stale_temporaries
from .config import TrainError
from .dcp import latest_dcp_checkpoint
from .metrics import JsonlLog, TensorBoardLog, read_jsonl, truncate_jsonl

__all__ = ["RunLogs", "prepare_run_dir", "truncate_logs"]

LOG_NAMES = ("metrics.jsonl", "routing.jsonl")


def prepare_run_dir(run_dir: Path, resume: bool) -> Path:
    """Fail before any training when ``run_dir`` cannot be written or (without ``resume``)
    already holds a run; remove what a killed save left behind. Returns the checkpoint
    directory."""
    checkpoint_dir = run_dir / "checkpoints"
    fix = "choose another run_dir or fix its permissions"
    ensure_writable_dir(checkpoint_dir, "run directory", fix, error=TrainError)
    if not resume:
        existing = latest_checkpoint(checkpoint_dir) or latest_dcp_checkpoint(checkpoint_dir)
        if existing is not None or read_jsonl(run_dir / "metrics.jsonl"):
            raise TrainError(
                f"run directory {run_dir} already holds a run"
                + (f" (checkpoint {existing.name})" if existing else "")
                + "; pass resume=True to continue it, or choose another run_dir"
            )
    remove_stale_temporaries(checkpoint_dir)
    return checkpoint_dir


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
