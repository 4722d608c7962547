"""Reading a checkpoint without its tensors: the JSON, checked field by field, the tensors
file's hash and header, and what a file is when it is not a checkpoint.

Everything here runs before a model is built, so a JSON edited to describe a model of
another size fails on the header's shapes (nothing allocated), a malformed field ends in a
:class:`CheckpointError` naming it (never a KeyError, TypeError or RecursionError), and a
healthy file of another kind (an HF model's weights, a metrics log) is named as what it is.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .state import CheckpointError

FORMAT = "gatelab.train.checkpoint"
VERSION = 1
JSON_NAME = re.compile(r"^step_(\d+)\.json$")
TENSORS_NAME = re.compile(r"^step_(\d+)-[0-9a-f]{12}\.safetensors$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20

# field -> (allowed types, what the message calls them); None allowed where listed.
_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "step": ((int,), "an int >= 0"),
    "tensors_file": ((str,), "a tensors file name step_N-HASH.safetensors"),
    "tensors_sha256": ((str,), "64 hex digits"),
    "config_fingerprint": ((str,), "a string"),
    "config": ((dict, type(None)), "a table"),
    "model_keys": ((list, type(None)), "a list"),
    "optimizer": ((dict, type(None)), "a table"),
    "scheduler": ((dict, type(None)), "a table"),
    "rng": ((dict, type(None)), "a table"),
    "extra": ((dict, type(None)), "a table"),
}
_REQUIRED = ("step", "tensors_file", "tensors_sha256", "config_fingerprint")


def read_meta(path: Path) -> tuple[dict[str, Any], Path]:
    """A checkpoint JSON's fields, each checked, and its tensors file's path."""
    other = identify(path) if path.is_file() else None
    if other is not None:  # a healthy file of another kind: say what it is, never "corrupt"
        raise CheckpointError(f"{path} is {other}")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(describe_directory(path)) from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from e
    try:
        meta = json.loads(raw.decode())
    except RecursionError:
        raise CheckpointError(f"checkpoint {path} is corrupt: JSON nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: not valid JSON ({e}); delete it (and its "
            ".safetensors) to fall back to an earlier checkpoint"
        ) from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a JSON file but not a gatelab training checkpoint (no format "
            f"{FORMAT!r}); give a checkpoint step_*.json or a run directory"
        )
    if meta.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {meta.get('version')!r}; this gatelab reads "
            f"version {VERSION} (a newer gatelab wrote it? upgrade gatelab)"
        )
    _check_fields(path, meta)
    meta["_path"] = str(path)
    return meta, path.parent / meta["tensors_file"]  # a bare file name: no path traversal


def _check_fields(path: Path, meta: dict[str, Any]) -> None:
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {path} is corrupt: missing fields {missing}")
    for key, (types, what) in _FIELDS.items():
        value = meta.get(key)
        ok = isinstance(value, types) and not isinstance(value, bool)
        if ok and key == "step":
            ok = value >= 0
        elif ok and key == "tensors_file":
            ok = TENSORS_NAME.match(value) is not None
        elif ok and key == "tensors_sha256":
            ok = _SHA256.match(value) is not None
        if not ok:
            shown = repr(value)[:60]
            raise CheckpointError(
                f"checkpoint {path} is corrupt: field {key!r} should be {what}, got {shown}"
            )
    config = meta.get("config") or {}
    for key in ("run", "train"):
        if not isinstance(config.get(key, {}), dict):
            raise CheckpointError(
                f"checkpoint {path} is corrupt: field 'config.{key}' should be a table, "
                f"got {repr(config[key])[:60]}"
            )


def check_sha256(tensors_path: Path, meta: dict[str, Any], path: Path) -> None:
    """The tensors file hashes to what the JSON records (read in chunks: no copy in memory)."""
    digest = hashlib.sha256()
    try:
        with open(tensors_path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} needs {tensors_path}, which is missing") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {tensors_path}: {e.strerror or e}") from e
    if digest.hexdigest() != meta["tensors_sha256"]:
        raise CheckpointError(
            f"{tensors_path} does not match the SHA-256 recorded in {path}: the file is corrupt "
            "(truncated or changed)"
        )


def read_header(tensors_path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file as meta tensors (names, shapes, dtypes): only the
    header is read."""
    from safetensors import safe_open

    try:
        with safe_open(str(tensors_path), framework="pt") as f:
            out = {}
            for name in f.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                part = f.get_slice(name)
                dtype = getattr(torch, _DTYPES.get(part.get_dtype(), "uint8"))
                out[name] = torch.empty(part.get_shape(), dtype=dtype, device="meta")
            return out
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{tensors_path} is not a readable safetensors file: {e}") from e


_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def identify(path: Path) -> str | None:
    """What ``path`` is when it is a healthy file of a kind other than a checkpoint JSON,
    with what to give instead (for a message), or None when it may be a checkpoint."""
    kind = _kind(path)
    if kind is None:
        return None
    what, fix = kind
    return f"{what}, not a gatelab training checkpoint (a step_*.json or a run directory); {fix}"


_HF_FIX = "give the folder to the commands that open HF models (profile, prune, skip, steer, ...)"


def _kind(path: Path) -> tuple[str, str] | None:
    name = path.name
    if TENSORS_NAME.match(name):
        return (
            "the tensors file of a gatelab checkpoint",
            "give its step_*.json or the run directory",
        )
    if name.endswith(".safetensors"):
        if (path.parent / "config.json").is_file():
            return f"an HF model folder's weights ({name})", _HF_FIX
        return "a safetensors file with no checkpoint JSON", "give a gatelab run directory"
    if name.endswith(".jsonl"):
        return f"a JSONL log ({name}, a run's metrics or routing)", "give the run directory"
    if name == "config.json" and any(path.parent.glob("*.safetensors")):
        return "an HF model folder's config.json", _HF_FIX
    return None


def describe_directory(path: Path) -> str:
    """Why a directory holds no checkpoint, and what it does hold, for a message."""
    if (path / "config.json").is_file():
        return (
            f"{path} is an HF model folder (config.json), not a gatelab run: give it to the "
            "commands that open HF models (profile, prune, skip, steer, ...)"
        )
    tensors = list(path.glob("*.safetensors")) + list(path.glob("checkpoints/*.safetensors"))
    if tensors:
        return (
            f"{path} holds {len(tensors)} .safetensors file(s) but no checkpoint JSON "
            "(step_*.json); restore the JSON files or give another run directory"
        )
    return f"{path} holds no gatelab checkpoint (checkpoints/step_*.json)"
