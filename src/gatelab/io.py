"""Files written so that a reader sees the old content or the new, never a mix."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"


def _write_all(file, data: bytes) -> None:
    """Write ``data`` to an open file (a seam where tests simulate a full disk)."""
    file.write(data)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable; best effort where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``path`` so that it holds either its old content or all of ``data``, never a mix:
    a temporary file in the same directory, flushed and fsynced, renamed over ``path``, and
    the directory fsynced so the rename survives a crash."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as file:
            if hasattr(os, "fchmod"):  # mkstemp makes 0600 files; checkpoints are shareable
                os.fchmod(file.fileno(), 0o644)
            _write_all(file, data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 2) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (see :func:`atomic_write`), creating the
    parent directories. NaN and infinity are refused (strict JSON readers reject them): store
    ``None`` for a value that does not exist. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(data, indent=indent, allow_nan=False) + "\n").encode())
    return path


def ensure_writable_dir(
    directory: str | os.PathLike, what: str, fix: str, error: type[Exception] = ValueError
) -> Path:
    """Create ``directory`` (and its parents) and prove a file can be written in it, before any
    work that would write there; otherwise raise ``error`` saying ``what`` is not writable and
    how to ``fix`` it (e.g. ``what="--run-dir"``, ``fix="pass another --run-dir"``)."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise error(f"{what} {directory} is not writable ({e.strerror or e}); {fix}") from e
    return directory
