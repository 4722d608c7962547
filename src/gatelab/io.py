"""Files written so that a reader sees the old content or the new, never a mix."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"
PARTIAL_SUFFIX = ".partial"  # a folder being written by atomic_dir
OLD_SUFFIX = ".replaced"  # an output atomic_dir is about to remove


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
        blocker = next((p for p in (directory, *directory.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise error(f"{what} {directory} is not writable: {blocker} is a file; {fix}") from e
        raise error(f"{what} {directory} is not writable ({e.strerror or e}); {fix}") from e
    return directory


def _umask() -> int:
    """The process's file-creation mask (read by setting it, then restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def is_empty_dir(path: Path) -> bool:
    """``path`` is a directory with nothing in it."""
    return path.is_dir() and next(path.iterdir(), None) is None


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Write a whole output folder at once: yields a temporary sibling of ``path`` (same
    parent, so the final rename stays on one filesystem) to write into, and renames it to
    ``path`` only when the ``with`` body ends without error. A failure removes the temporary
    and leaves whatever was at ``path`` untouched. An existing non-empty ``path`` is replaced
    only with ``overwrite``: it is moved aside, the new folder renamed into place, and only
    then the old one removed (a crash in between leaves both, never neither). Callers check
    the destination first (``commands._common.check_output``); the FileExistsError here
    only guards a folder that appeared meanwhile."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial_dir(path)
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders; outputs are shareable
        yield tmp
        _move_into_place(tmp, path, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


def _partial_dir(path: Path) -> Path:
    """A new empty temporary sibling of ``path`` (``.NAME.XXXXXXXX.partial``)."""
    return Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX))


def probe_atomic_dir(path: str | os.PathLike) -> None:
    """Raise the OSError :func:`atomic_dir` would meet making its temporary (an unwritable
    parent, a name too long for the filesystem), before any work; creates the parents."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.rmdir(_partial_dir(path))


def _move_into_place(tmp: Path, path: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``path`` (see :func:`atomic_dir`)."""
    if not path.exists() and not path.is_symlink() or is_empty_dir(path):
        os.replace(tmp, path)  # POSIX replaces an empty directory in one step
        return
    if not overwrite:
        raise FileExistsError(f"{path} appeared while the output was written; nothing replaced")
    aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=OLD_SUFFIX))
    os.replace(path, aside / path.name)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(aside / path.name, path)  # put the old output back (kept aside if not)
        os.rmdir(aside)
        raise
    try:
        shutil.rmtree(aside)
    except OSError as error:  # the new output is in place: a leftover is not a failure
        warnings.warn(f"could not remove the replaced output {aside} ({error})", stacklevel=3)
