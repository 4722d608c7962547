"""JSON-lines logs (``metrics.jsonl``, ``routing.jsonl``) and a minimal progress bar.

Logs are append-only, one JSON object per line, each with a ``step``. Floats are written with
Python's shortest round-trip repr, so a resumed run's log can be compared bitwise with an
uninterrupted one. On resume, :func:`truncate_jsonl` drops the lines written after the
checkpoint (and a half-written last line from a kill), so the log reads as one run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from ..io import atomic_write

__all__ = ["JsonlLog", "Progress", "read_jsonl", "truncate_jsonl"]


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


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _rate(value: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


class Progress:
    """One status line on stderr: step, bar, live loss, tokens/s and ETA.

    Written here rather than taken from tqdm to keep the dependencies few. Off when the stream
    is not a terminal (logs and CI stay clean) unless ``enabled=True`` forces it; redraws at
    most every ``min_interval`` seconds.
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
        self.total, self.initial, self.width = total, initial, width
        self.min_interval = min_interval
        self._start = time.perf_counter()
        self._last_draw = -math.inf
        self._last_len = 0
        self._line = ""

    def update(self, step: int, loss: float | None = None, tokens_per_s: float | None = None):
        now = time.perf_counter()
        done = step - self.initial
        eta = (self.total - step) * (now - self._start) / done if done > 0 else math.inf
        filled = int(self.width * step / self.total) if self.total else self.width
        parts = [f"{step}/{self.total} |{'#' * filled}{'.' * (self.width - filled)}|"]
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if tokens_per_s is not None:
            parts.append(f"{_rate(tokens_per_s)} tok/s")
        parts.append(f"ETA {_duration(eta)}")
        self._line = " ".join(parts)
        if now - self._last_draw >= self.min_interval or step >= self.total:
            self._draw()
            self._last_draw = now

    def _draw(self) -> None:
        if not self.enabled:
            return
        pad = max(0, self._last_len - len(self._line))
        self.stream.write("\r" + self._line + " " * pad)
        self.stream.flush()
        self._last_len = len(self._line)

    def write(self, message: str) -> None:
        """Print a message above the bar (or plainly when the bar is off)."""
        if self.enabled and self._last_len:
            self.stream.write("\r" + " " * self._last_len + "\r")
        self.stream.write(message + "\n")
        if self.enabled and self._last_len:
            self._last_len = 0
            self._draw()
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._last_len:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
            self._last_len = 0
