"""The one rule of every command that writes (see :func:`check_output`): the output is
checked before any work, an existing output is replaced only with ``--force`` (and only an
earlier output of the same command), an input is never written over, and output folders are
written whole (:func:`gatelab.io.atomic_dir`). The ``--force`` flag itself is defined once in
``_common.add_force_argument``."""

from __future__ import annotations

import argparse
import fnmatch
from pathlib import Path

from ..io import ensure_writable_dir, is_empty_dir, probe_atomic_dir
from ._common import command_name

NAMED_INPUTS = ("sets", "eval_sets", "demos", "target", "other")  # NAME=FILE arguments
PLAIN_INPUTS = ("model", "checkpoint", "clamp")  # paths as given


def input_paths(args: argparse.Namespace) -> list[Path]:
    """What a command reads: its model or checkpoint, its NAME=FILE prompt sets, --clamp."""
    paths = []
    for key in (*PLAIN_INPUTS, *NAMED_INPUTS):
        value = getattr(args, key, None)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and item:
                named = key in NAMED_INPUTS and "=" in item
                paths.append(Path(item.split("=", 1)[1] if named else item))
    return paths


def check_output(
    args: argparse.Namespace, writes: tuple[str, ...], marker: str | None = None
) -> Path:
    """Check the output folder ``args.out`` before any work; return it resolved.

    Refused always: a file at ``--out`` or above it, an ``--out`` that is or holds an input
    (replacing it would destroy the input), an unwritable parent. Refused without
    ``--force``: a non-empty ``--out``, or one inside an input folder. Even with ``--force``
    only an earlier output of the same command is replaced: every entry must match one of
    ``writes`` (glob patterns) and ``marker``, when given, must be there."""
    check_inputs(args)
    where, flag, cmd = args.out, "--out", command_name(args)
    if not str(where).strip():
        raise ValueError(f"{flag} is empty; give the folder to write")
    out = _resolved(where, flag)
    _check_no_file_above(out, where, flag)
    if out.exists() and not out.is_dir():
        raise ValueError(
            f"{flag} {where} is a file; gatelab {cmd} writes a folder there: choose a folder path"
        )
    for source in input_paths(args):
        _check_apart(out, source, args.force, flag, where)
    if out.is_dir() and not is_empty_dir(out):
        _check_replaceable(out, args.force, writes, marker, f"{flag} {where}", cmd)
    try:
        probe_atomic_dir(out)
    except OSError as error:
        raise ValueError(
            f"{flag} {where} cannot be written ({error.strerror or error}); choose another {flag}"
        ) from None
    return out


def check_inputs(args: argparse.Namespace) -> None:
    """The inputs named on the command line exist and have the right kind, checked before
    any work: the model, NAME=FILE prompt sets (a name and an existing file), --clamp."""
    model = getattr(args, "model", None)
    if isinstance(model, str) and not Path(model).exists():
        raise FileNotFoundError(
            f"{model} does not exist; give an HF model directory or a gatelab run directory "
            "/ checkpoint"
        )
    for key in NAMED_INPUTS:
        value = getattr(args, key, None)
        for spec in value if isinstance(value, list) else [value]:
            if not isinstance(spec, str):  # skip's --target is a number
                continue
            name, _, file = spec.partition("=")
            if not name or not file:
                raise ValueError(f"a prompt set is NAME=FILE, got {spec!r}")
            if not Path(file).is_file():
                kind = "a folder" if Path(file).is_dir() else "missing"
                raise FileNotFoundError(f"prompt set {name!r}: {file} is {kind}, not a file")
    clamp = getattr(args, "clamp", None)
    if clamp and not Path(clamp).is_file():
        raise FileNotFoundError(f"--clamp {clamp} is not a file; give neurons.json of localize")


def check_output_file(where: str | Path, force: bool, flag: str) -> Path:
    """:func:`check_output` for a command that writes one file (``bench --json``)."""
    path = _resolved(where, flag)
    _check_no_file_above(path, where, flag)
    if path.is_dir():
        raise ValueError(f"{flag} {where} is a folder; give the path of a file to write")
    if path.exists() and not force:
        raise ValueError(
            f"{flag} {where} already exists; pass --force to replace it, or choose another {flag}"
        )
    ensure_writable_dir(path.parent, f"the folder of {flag}", f"choose another {flag}")
    return path


def _resolved(where, flag: str) -> Path:
    """The absolute path with every symlink followed (so an output reached through a link
    is compared with the inputs by what it really is)."""
    try:
        return Path(where).expanduser().resolve()
    except (OSError, RuntimeError) as error:  # a symlink loop
        raise ValueError(f"{flag} {where} cannot be resolved ({error})") from None


def _check_no_file_above(path: Path, where, flag: str) -> None:
    """The nearest existing ancestor of ``path`` must be a folder."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(
                    f"{flag} {where}: {parent} is a file, not a folder; choose another {flag}"
                )
            return


def _check_apart(out: Path, source: Path, force: bool, flag: str, where) -> None:
    """``out`` must not be or hold ``source``; inside a source folder only with --force."""
    source = source.expanduser().resolve()
    if source == out or out in source.parents:
        raise ValueError(
            f"{flag} {where} is or holds the input {source}; writing there would replace "
            f"it (even with --force): choose an {flag} outside it"
        )
    if source in out.parents and not force:
        raise ValueError(
            f"{flag} {where} is inside the input {source}; pass --force to write there "
            f"anyway, or choose an {flag} outside it"
        )


def _check_replaceable(out: Path, force: bool, writes, marker, what: str, cmd: str) -> None:
    """A non-empty output folder: replaced only with --force, and only if it holds nothing
    but an earlier output of ``cmd`` (so ``--out . --force`` cannot wipe a folder)."""
    names = sorted(p.name for p in out.iterdir())
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    foreign = [n for n in names if not any(fnmatch.fnmatch(n, w) for w in writes)]
    if foreign or (marker and marker not in names):
        raise ValueError(
            f"{what} already holds {shown}, which is not an earlier `gatelab {cmd}` output "
            "(the only thing --force replaces); choose another folder"
        )
    if not force:
        raise ValueError(
            f"{what} already holds an earlier `gatelab {cmd}` output ({shown}); pass --force "
            "to replace it, or choose another folder"
        )
