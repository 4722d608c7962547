"""Run logs: JSON lines (``metrics.jsonl``, ``routing.jsonl``), TensorBoard scalars, and a
tqdm progress bar.

JSONL logs are append-only, one JSON object per line, each with a ``step``. Floats are
written with Python's shortest round-trip repr, so a resumed run's log can be compared
bitwise with an uninterrupted one. On resume, :func:`truncate_jsonl` drops the lines written
after the checkpoint (and a half-written last line from a kill), so the log reads as one
run. :class:`TensorBoardLog` writes the same records as scalars (the ``tensorboard`` extra);
:class:`Progress` draws the bar on stderr and never into a log.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from numbers import Real
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from ..io import atomic_write

__all__ = ["JsonlLog", "Progress", "TensorBoardLog", "read_jsonl", "truncate_jsonl"]


def read_jsonl(path: str | os.PathLike, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a JSONL file (only those with ``kind`` when given); bad lines skipped."""
    records = []
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and (kind is None or record.get("kind") == kind):
                records.append(record)
    return records


def truncate_jsonl(path: str | os.PathLike, max_step: int) -> None:
    """Keep only the complete lines with ``step <= max_step`` (atomic rewrite)."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            if record["step"] <= max_step:
                kept.append(line + "\n")
    atomic_write(path, "".join(kept).encode())


class JsonlLog:
    """Append records to a JSONL file; each line is flushed, :meth:`sync` also fsyncs (called
    before a checkpoint, so the log on disk is never behind the checkpoint it goes with)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = open(self.path, "a")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _scalars(values: dict[str, Any], prefix: str) -> dict[str, float]:
    """The real-number entries of ``values`` as ``prefix/key`` tags (lists, strings and
    booleans are not scalars)."""
    return {
        f"{prefix}/{key}": float(value)
        for key, value in values.items()
        if isinstance(value, Real) and not isinstance(value, bool)
    }


class TensorBoardLog:
    """The run's records as TensorBoard scalars, in event files in ``directory``.

    Train records become ``train/<key>`` (loss, aux, lr, grad_norm, tokens, tokens_per_s,
    elapsed_s), eval records ``eval/<metric>``, routing records ``routing/<layer>/<stat>``
    for each scalar of a layer's summary; every value at the record's ``step``.
    ``purge_step`` (a resumed run's checkpoint step) makes TensorBoard drop the events an
    interrupted run wrote after it, as :func:`truncate_jsonl` does for the JSONL logs.

    :meth:`create` returns None when the ``tensorboard`` package (an optional extra) is not
    installed: the run then logs to JSONL only, silently.
    """

    def __init__(self, directory: str | os.PathLike, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(directory)
        self._writer = SummaryWriter(str(self.path), purge_step=purge_step or None)

    @classmethod
    def create(
        cls, directory: str | os.PathLike, purge_step: int | None = None
    ) -> TensorBoardLog | None:
        """A log in ``directory``, or None without the ``tensorboard`` package."""
        try:
            return cls(directory, purge_step)
        except ImportError:
            return None

    def write(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record (``kind`` "train" or "eval")."""
        values = {k: v for k, v in record.items() if k not in ("kind", "step")}
        self._add(_scalars(values, str(record.get("kind", "train"))), record["step"])

    def write_routing(self, record: dict[str, Any]) -> None:
        """One routing.jsonl record (``layers``: per layer name, its summary)."""
        for name, summary in record["layers"].items():
            self._add(_scalars(summary, f"routing/{name}"), record["step"])

    def _add(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, global_step=step)

    def sync(self) -> None:
        """Flush the events to disk (at save points, as :meth:`JsonlLog.sync`)."""
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _rate(value: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


class Progress:
    """A tqdm bar over the training steps: step/total, ETA, live loss and tokens/s.

    On ``stream`` (stderr by default), never on stdout or in a log. Off when the stream is
    not a terminal (logs and CI stay clean) unless ``enabled=True`` forces it (and
    ``enabled=False`` turns it off); redraws at most every ``min_interval`` seconds.
    """

    def __init__(
        self,
        total: int,
        initial: int = 0,
        enabled: bool | None = None,
        stream: TextIO | None = None,
        min_interval: float = 0.1,
        width: int = 20,
    ):
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.enabled = isatty() if enabled is None else enabled
        self._step = initial
        self._bar = tqdm(
            total=total,
            initial=initial,
            file=self.stream,
            disable=not self.enabled,
            mininterval=min_interval,
            unit="step",
            dynamic_ncols=True,
            bar_format=f"{{n_fmt}}/{{total_fmt}} |{{bar:{width}}}| ETA {{remaining}}{{postfix}}",
        )

    def update(self, step: int, loss: float | None = None, tokens_per_s: float | None = None):
        parts = []
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if tokens_per_s is not None:
            parts.append(f"{_rate(tokens_per_s)} tok/s")
        self._bar.set_postfix_str(", ".join(parts), refresh=False)
        self._bar.update(step - self._step)
        self._step = step

    def write(self, message: str) -> None:
        """Print a message above the bar (or plainly when the bar is off)."""
        self._bar.write(message, file=self.stream)

    def close(self) -> None:
        self._bar.close()
