"""Training checkpoints: one safetensors file of tensors + one JSON file that describes it.

Why this shape:

- No pickle anywhere. Every tensor (model, optimizer state, torch/numpy RNG states) goes into
  safetensors; everything else (step, config, data position, scheduler, optimizer
  hyperparameters, Python's ``random`` state as a list of ints) goes into JSON. Loading a
  checkpoint someone sent you can therefore not run code.
- A checkpoint is complete when its JSON exists. Each file is written to a temporary file in the
  same directory, flushed, fsynced, renamed over its final name and the directory fsynced; the
  tensors file is written first and the JSON last, so a crash or a full disk at any point leaves
  either the new checkpoint complete or no new checkpoint at all, and never touches the previous
  one. The tensors file carries a short content hash in its name, so re-saving the same step
  never overwrites the file an existing JSON points to.
- The JSON records the SHA-256 of the tensors file and a fingerprint of the run's config; loading
  checks both, and checks parameter names and shapes, before it changes anything.

Layout: ``DIR/step_00000042.json`` and ``DIR/step_00000042-<hash12>.safetensors``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from ..io import TMP_SUFFIX, atomic_write
from ..legacy import upgrade_state_dict
from .checkpoint_meta import (
    FORMAT,
    JSON_NAME,
    TENSORS_NAME,
    VERSION,
    check_sha256,
    describe_directory,
    read_header,
    read_meta,
)
from .state import (
    CheckpointError,
    _canonical,
    _join,
    _split,
    _storable,
    config_diff,
    config_fingerprint,
    get_rng_state,
    set_rng_state,
    upgrade_config,
)

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "config_diff",
    "config_fingerprint",
    "find_checkpoints",
    "get_rng_state",
    "latest_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "check_model_fits",
    "read_checkpoint",
    "read_checkpoint_header",
    "remove_stale_temporaries",
    "save_checkpoint",
    "set_rng_state",
]

_JSON_NAME, _TENSORS_NAME = JSON_NAME, TENSORS_NAME


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` found besides the states it applied."""

    path: Path
    step: int
    config: Any
    data_state: Any
    extra: dict = field(default_factory=dict)


# -- file writing ----------------------------------------------------------------------------


def remove_stale_temporaries(directory: str | os.PathLike) -> int:
    """Delete temporary files a killed save left behind in ``directory``; returns how many."""
    removed = 0
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    for path in directory.iterdir():
        if path.name.startswith(".step_") and path.name.endswith(TMP_SUFFIX):
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
    return removed


# -- save --------------------------------------------------------------------------------------


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """Per optimizer group, the model's name for each parameter: what ties optimizer state
    (stored by position) to parameters, checked on load."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [
        [names.get(id(p), f"<not in model: {i}>") for i, p in enumerate(group["params"])]
        for group in optimizer.param_groups
    ]


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    data_state: Any = None,
    config: Any = None,
    extra: dict | None = None,
    rng: bool = True,
    model_state: dict[str, Tensor] | None = None,
    optimizer_state: dict | None = None,
) -> Path:
    """Write the checkpoint of ``step`` into ``directory``; returns the JSON path.

    ``scheduler`` is anything with ``state_dict()``; ``data_state`` the data iterator's
    ``state_dict()``; ``config`` a JSON-able dict whose fingerprint a later load compares;
    ``extra`` a JSON-able dict returned as is by :func:`load_checkpoint`. Raises
    :class:`CheckpointError` when a write fails (the previous checkpoints are untouched).
    ``model_state`` / ``optimizer_state`` replace ``model.state_dict()`` /
    ``optimizer.state_dict()`` (a distributed run passes the gathered, unsharded ones, from
    :func:`gatelab.train.sharded.gather_expert_banks`).
    """
    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    if model_state is None:
        model_state = model.state_dict()
    _store_model(model_state, tensors, seen)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(step),
        "config": _canonical(config),
        "config_fingerprint": config_fingerprint(config),
        "model_keys": list(model_state.keys()),
        "data_state": _split(copy.deepcopy(data_state), "data", tensors, seen),
        "scheduler": None
        if scheduler is None
        else _split(scheduler.state_dict(), "sched", tensors, seen),
        "optimizer": None,
        "rng": _split(get_rng_state(), "rng", tensors, seen) if rng else None,
        "extra": _canonical(extra or {}),
        "torch_version": torch.__version__,
    }
    if optimizer is not None:
        state = optimizer.state_dict() if optimizer_state is None else optimizer_state
        meta["optimizer"] = {
            "class": type(optimizer).__name__,
            "param_names": _param_names(model, optimizer),
            "state_dict": _split(state, "optim", tensors, seen),
        }
    return _write_checkpoint(Path(directory), step, meta, tensors)


def _store_model(state: dict[str, Tensor], tensors: dict[str, Tensor], seen: set[int]) -> None:
    """Add the model's state to ``tensors`` under ``model/<name>``."""
    for name, value in state.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(f"model state {name!r} is not a tensor; it cannot be stored")
        tensors[f"model/{name}"] = _storable(value, seen)


def _write_checkpoint(directory: Path, step: int, meta: dict, tensors: dict[str, Tensor]) -> Path:
    """The tensors file (named by its hash) first, then the JSON that makes it a checkpoint."""
    blob = st_save(tensors, metadata={"format": FORMAT})
    digest = hashlib.sha256(blob).hexdigest()
    tensors_path = directory / f"step_{step:08d}-{digest[:12]}.safetensors"
    json_path = directory / f"step_{step:08d}.json"
    meta["tensors_file"] = tensors_path.name
    meta["tensors_sha256"] = digest
    text = json.dumps(meta, indent=1, allow_nan=True) + "\n"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(tensors_path, blob)
        atomic_write(json_path, text.encode())
    except OSError as e:
        raise CheckpointError(
            f"could not write checkpoint {json_path}: {e.strerror or e}; earlier checkpoints "
            "are untouched"
        ) from e
    return json_path


# -- find / prune --------------------------------------------------------------------------------


def find_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The JSON files of the checkpoints in ``directory``, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _JSON_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The JSON of the highest step in ``directory`` (or ``directory/checkpoints``), or None."""
    directory = Path(directory)
    found = find_checkpoints(directory) or find_checkpoints(directory / "checkpoints")
    return found[-1] if found else None


def prune_checkpoints(directory: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints, each JSON and then the tensors file it
    names; and tensors files of a step whose JSON names another one (an earlier save of the
    same step, superseded).

    Only files a JSON accounts for are deleted: a tensors file of a step that has no
    readable JSON is never touched (it may be all that is left of a run whose JSON files
    were lost). The JSON goes first, so an interrupted prune leaves an orphan tensors file,
    never a JSON without its tensors.
    """
    directory = Path(directory)
    jsons = find_checkpoints(directory)
    for path in jsons[: max(0, len(jsons) - max(1, keep))]:
        name = _named_tensors(path)
        with contextlib.suppress(OSError):
            path.unlink()
            if name is not None:
                (directory / name).unlink()
    named = {}  # step -> the tensors file its JSON names
    for path in find_checkpoints(directory):
        name = _named_tensors(path)
        if name is not None:
            named[_step_of(path)] = name
    for path in directory.iterdir():
        m = _TENSORS_NAME.match(path.name)
        step = int(m.group(1)) if m else None
        if step in named and path.name != named[step]:
            with contextlib.suppress(OSError):
                path.unlink()


def _step_of(json_path: Path) -> int:
    return int(_JSON_NAME.match(json_path.name).group(1))


def _named_tensors(json_path: Path) -> str | None:
    """The tensors file a checkpoint JSON names, when it is readable and names a file of its
    own step (a JSON edited to name another step's file accounts for nothing)."""
    try:
        name = json.loads(json_path.read_text())["tensors_file"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    m = _TENSORS_NAME.match(name) if isinstance(name, str) else None
    return name if m and int(m.group(1)) == _step_of(json_path) else None


# -- load --------------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, Tensor]]:
    """The checkpoint's JSON and its tensors, checked (format, fields, hash) but applied to
    nothing.

    ``path`` is a checkpoint JSON, or a directory whose latest checkpoint is read. Safe on
    untrusted files: JSON and safetensors only.
    """
    meta, tensors_path = read_meta(_checkpoint_json(Path(path)))
    path = Path(meta["_path"])
    try:
        blob = tensors_path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} needs {tensors_path}, which is missing") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {tensors_path}: {e.strerror or e}") from e
    if hashlib.sha256(blob).hexdigest() != meta["tensors_sha256"]:
        raise CheckpointError(
            f"{tensors_path} does not match the SHA-256 recorded in {path}: the file is corrupt "
            "(truncated or changed)"
        )
    try:
        tensors = st_load(blob)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{tensors_path} is not a readable safetensors file: {e}") from e
    return meta, tensors


def read_checkpoint_header(path: str | os.PathLike) -> tuple[dict, dict[str, Tensor]]:
    """Like :func:`read_checkpoint`, with the tensors as meta tensors read from the file's
    header (names, shapes, dtypes; the hash is checked in chunks): nothing is loaded, so a
    checkpoint can be checked against a model built on the meta device before either is
    allocated."""
    meta, tensors_path = read_meta(_checkpoint_json(Path(path)))
    check_sha256(tensors_path, meta, Path(meta["_path"]))
    return meta, read_header(tensors_path)


def check_model_fits(meta: dict, tensors: dict[str, Tensor], model: nn.Module) -> None:
    """CheckpointError naming the parameters whose names or shapes differ between the
    checkpoint and ``model`` (either may be on the meta device)."""
    _check_model(Path(meta["_path"]), meta, tensors, model)


def _checkpoint_json(path: Path) -> Path:
    """``path``, or the latest checkpoint JSON of the directory ``path``."""
    if not path.is_dir():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(describe_directory(path))
    return found


def _check_model(path: Path, meta: dict, tensors: dict[str, Tensor], model: nn.Module) -> dict:
    saved = {k[len("model/") :]: t for k, t in tensors.items() if k.startswith("model/")}
    saved = upgrade_state_dict(
        model, saved
    )  # keys of earlier versions, as load_state_dict maps them
    current = model.state_dict()
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    shapes = [
        f"{k}: checkpoint {tuple(saved[k].shape)}, model {tuple(current[k].shape)}"
        for k in current
        if k in saved and saved[k].shape != current[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing in the checkpoint: {', '.join(missing[:10])}")
        if unexpected:
            parts.append(f"not in the model: {', '.join(unexpected[:10])}")
        if shapes:
            parts.append(f"shape mismatch: {'; '.join(shapes[:10])}")
        raise CheckpointError(f"checkpoint {path} does not fit the model: " + " | ".join(parts))
    return saved


def _optimizer_state(
    path: Path, meta: dict, tensors: dict, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict:
    saved = meta.get("optimizer")
    if saved is None:
        raise CheckpointError(f"checkpoint {path} holds no optimizer state")
    if saved.get("class") != type(optimizer).__name__:
        raise CheckpointError(
            f"checkpoint {path} holds {saved.get('class')} state; the optimizer is "
            f"{type(optimizer).__name__}"
        )
    now = _param_names(model, optimizer)
    if saved["param_names"] != now:
        saved = {**saved, "param_names": _renamed_params(model, saved["param_names"])}
    if saved["param_names"] != now:
        old = {n for group in saved["param_names"] for n in group}
        new = {n for group in now for n in group}
        differ = sorted(old ^ new) or ["(same names, different groups or order)"]
        raise CheckpointError(
            f"checkpoint {path}: the optimizer's parameters differ from the checkpoint's: "
            + ", ".join(differ[:10])
        )
    state = _join(saved["state_dict"], tensors, str(path))
    for group, live in zip(state["param_groups"], optimizer.param_groups, strict=True):
        for key, value in live.items():  # JSON turned tuples (betas) into lists
            if isinstance(value, tuple) and isinstance(group.get(key), list):
                group[key] = tuple(group[key])
    return state


def _renamed_params(model: nn.Module, groups: list[list[str]]) -> list[list[str]]:
    """The optimizer's parameter names of a checkpoint written by an earlier gatelab, renamed
    by the model's key maps (``legacy.rename_on_load``: ``qkv`` -> ``qkv_proj``, ...), so a
    run resumes across a rename. Only one-to-one renames map (each moment keeps its
    parameter); a fused or split parameter leaves the names as they were, and the caller's
    error names them."""
    probes = {name: torch.empty(0) for group in groups for name in group}
    try:
        upgraded = upgrade_state_dict(model, probes)
    except (RuntimeError, ValueError, IndexError):
        return groups
    new_name = {id(tensor): name for name, tensor in upgraded.items()}
    if len(new_name) != len(probes) or any(id(t) not in new_name for t in probes.values()):
        return groups
    return [[new_name[id(probes[name])] for name in group] for group in groups]


def _same_config(meta: dict[str, Any], config: Any) -> bool:
    """The checkpoint was written by this config, or by its earlier-layout spelling."""
    if meta["config_fingerprint"] == config_fingerprint(config):
        return True
    stored = meta.get("config")
    upgraded = upgrade_config(stored)
    return upgraded is not stored and config_fingerprint(upgraded) == config_fingerprint(config)


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    config: Any = None,
    data: Any = None,
    rng: bool = True,
    transform: Any = None,
) -> Checkpoint:
    """Check a checkpoint against the run, then restore it into the given objects.

    Everything is validated before anything is changed: a corrupt or missing file, a hash
    mismatch, a different config (when ``config`` is given; the message names the differing
    keys), different parameter names or shapes raise :class:`CheckpointError` and leave the
    model, optimizer and files as they were. ``data`` (optional) gets ``load_state_dict`` with
    the stored data position; it is also returned as ``Checkpoint.data_state``.
    ``transform(meta, tensors) -> (meta, tensors)``, when given, runs on the checkpoint as
    read, before any check (a distributed run cuts out its rank's expert shards).
    """
    meta, tensors = read_checkpoint(path)
    if transform is not None:
        meta, tensors = transform(meta, tensors)
    path = Path(meta["_path"])
    if config is not None and not _same_config(meta, config):
        diff = config_diff(upgrade_config(meta.get("config")), config)
        raise CheckpointError(
            f"checkpoint {path} was written by a run with another config; differing keys: "
            + ("; ".join(diff) if diff else "(unknown: the checkpoint holds no config)")
        )
    model_state = _check_model(path, meta, tensors, model)
    optim_state = None
    if optimizer is not None:
        optim_state = _optimizer_state(path, meta, tensors, model, optimizer)
    if scheduler is not None and meta.get("scheduler") is None:
        raise CheckpointError(f"checkpoint {path} holds no scheduler state")
    data_state = _join(meta.get("data_state"), tensors, str(path))
    rng_state = _join(meta["rng"], tensors, str(path)) if rng and meta.get("rng") else None

    # The RNG goes first: it is the one part not validated above, and if it fails nothing
    # has been changed yet.
    previous_rng = get_rng_state()
    if rng_state is not None:
        set_rng_state(rng_state)
    try:
        model.load_state_dict(model_state, strict=True)
        if optim_state is not None:
            optimizer.load_state_dict(optim_state)
        if scheduler is not None:
            scheduler.load_state_dict(_join(meta["scheduler"], tensors, str(path)))
        if data is not None:
            data.load_state_dict(data_state)
    except Exception:
        set_rng_state(previous_rng)
        raise
    return Checkpoint(
        path, int(meta["step"]), meta.get("config"), data_state, meta.get("extra") or {}
    )
