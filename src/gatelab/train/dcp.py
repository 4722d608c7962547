"""Distributed checkpoints: every rank writes its own shards (``torch.distributed.checkpoint``).

A run on a device mesh (``parallelize(model, mesh=...)``) holds each parameter and AdamW
moment in pieces; gathering them on rank 0, as the whole-file checkpoints do, would need
the whole model in one host. Here every rank writes its pieces through DCP, in
safetensors files (``HuggingFaceStorageWriter``: no pickle on disk or on load; DCP's
default ``FileSystemWriter`` would ``torch.save`` each tensor), and loading reads each
rank's pieces of the *global* tensors, whatever mesh wrote them: 2 -> 4 ranks, 4 -> 2,
EP 2 -> EP 1 and one process all read the same files.

What is stored, as global tensors (their single-process shapes):

- ``model/<name>``: the model's state dict; FSDP2's DTensors as they are, each expert bank
  as one DTensor sharded over the EP group (every EP rank owns its ``E/ep`` experts: the
  bank's FSDP shards are gathered over ``dp_shard`` first, one EP slice at a time);
- ``optim/<name>/<key>``: the optimizer state by parameter name (DCP's ``get_state_dict``),
  expert moments like expert banks;
- ``extra/...``: the tensors of the RNG state (rank 0's; every rank draws the same).

Everything else (step, config and its fingerprint, data position, scheduler, optimizer
hyperparameters, ``extra``) is JSON in ``gatelab.json``, written by rank 0 after every rank
has written its files: a checkpoint is complete when that file exists, so a crash while
saving leaves an incomplete directory that loading skips and the next save replaces.

Layout: ``DIR/step_00000042.dcp/{gatelab.json, shard-*.safetensors}``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..io import write_json
from .checkpoint import Checkpoint, _same_config
from .state import (
    CheckpointError,
    _canonical,
    _join,
    _split,
    config_diff,
    config_fingerprint,
    get_rng_state,
    set_rng_state,
    upgrade_config,
)

__all__ = [
    "DCP_FORMAT",
    "find_dcp_checkpoints",
    "is_dcp_checkpoint",
    "latest_dcp_checkpoint",
    "load_dcp",
    "prune_dcp_checkpoints",
    "read_dcp_tensors",
    "resume_point",
    "save_dcp",
]

DCP_FORMAT = "gatelab-dcp"
META = "gatelab.json"
_NAME = re.compile(r"^step_(\d{8})\.dcp$")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier(parallel) -> None:
    if parallel is not None:
        parallel.barrier()


def is_dcp_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / META).is_file()


def find_dcp_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The complete DCP checkpoints in ``directory`` (those with ``gatelab.json``), by step."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name) and is_dcp_checkpoint(p)]
    return sorted(found, key=lambda p: p.name)


def latest_dcp_checkpoint(directory: str | os.PathLike) -> Path | None:
    found = find_dcp_checkpoints(directory)
    return found[-1] if found else None


def resume_point(directory: str | os.PathLike, sharded: bool) -> Path | None:
    """The checkpoint a run resumes from: the latest DCP one for a mesh run (``sharded``),
    else the latest single-file one. A run dir holding only the other format is refused
    (resuming would silently start over at step 0)."""
    from .checkpoint import latest_checkpoint

    mine, other = (latest_dcp_checkpoint, latest_checkpoint)
    if not sharded:
        mine, other = other, mine
    found = mine(directory)
    if found is None and other(directory) is not None:
        fix = (
            f"convert it first: gatelab convert {other(directory)} {directory}"
            if sharded
            else f"resume under --mesh, or convert it first: gatelab convert {directory}"
        )
        kind = "single-file" if sharded else "distributed (DCP)"
        raise CheckpointError(f"{directory} holds only {kind} checkpoints; {fix}")
    return found


def prune_dcp_checkpoints(directory: str | os.PathLike, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints (0: all); remove the rest."""
    found = find_dcp_checkpoints(directory)
    for path in found[: max(len(found) - keep, 0)] if keep > 0 else []:
        (path / META).unlink()  # incomplete first, so a crash here leaves no half checkpoint
        shutil.rmtree(path, ignore_errors=True)


# -- the global view of a model and its optimizer -----------------------------------------


def _ep_mesh(parallel):
    """A 1-D mesh over this rank's EP group (the mesh's, or one made from the DDP path's
    EP group)."""
    layout = getattr(parallel, "layout", None)
    if layout is not None:
        return layout.mesh["ep"]
    from torch.distributed.device_mesh import DeviceMesh

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return DeviceMesh.from_group(parallel.ep_group, device)


def _to_global(value: Tensor, parallel, ep_mesh) -> Tensor:
    """An expert tensor [E/ep, ...] of this EP rank (FSDP-sharded or not) -> a DTensor of
    the whole bank [E, ...] sharded over the EP group."""
    from torch.distributed.tensor import DTensor, Shard

    if isinstance(value, DTensor):
        value = value.full_tensor()
    return DTensor.from_local(value.contiguous(), ep_mesh, [Shard(0)], run_check=False)


def _to_local(loaded: Tensor, like: Tensor) -> Tensor:
    """The inverse of :func:`_to_global` for a tensor laid out like ``like``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    local = loaded.to_local()
    if isinstance(like, DTensor):
        return distribute_tensor(local, like.device_mesh, like.placements, src_data_rank=None)
    return local


def _is_expert(parallel, name: str, value: Tensor) -> bool:
    return (
        parallel is not None
        and parallel.ep > 1
        and name in parallel.expert_params
        and isinstance(value, Tensor)
        and value.dim() >= 1
    )


def _state(model: nn.Module, optimizer, parallel) -> tuple[dict, dict | None, dict[str, Tensor]]:
    """(model state dict, optimizer state dict by name, the flat global view to save/load).

    ``get_state_dict`` creates the optimizer state when there is none yet (a zero step), so
    a fresh optimizer has the moments a checkpoint's are loaded into."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        msd, osd = get_model_state_dict(model), None
    else:
        msd, osd = get_state_dict(model, optimizer)
    ep_mesh = _ep_mesh(parallel) if parallel is not None and parallel.ep > 1 else None
    flat: dict[str, Tensor] = {}
    for name, value in msd.items():
        expert = _is_expert(parallel, name, value)
        flat[f"model/{name}"] = _to_global(value, parallel, ep_mesh) if expert else value
    for name, entry in (osd or {}).get("state", {}).items():
        for key, value in entry.items():
            if not isinstance(value, Tensor):
                raise CheckpointError(f"optimizer state {name}/{key} is not a tensor")
            expert = _is_expert(parallel, name, value)
            flat[f"optim/{name}/{key}"] = _to_global(value, parallel, ep_mesh) if expert else value
    return msd, osd, flat


def _apply(model, optimizer, parallel, msd, osd, flat, groups) -> None:
    """Put the loaded global view back into the model and optimizer."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    for name, value in msd.items():
        if _is_expert(parallel, name, value):
            msd[name] = _to_local(flat[f"model/{name}"], value)
    if osd is None:
        set_model_state_dict(model, msd)
        return
    for name, entry in osd["state"].items():
        for key, value in entry.items():
            if _is_expert(parallel, name, value):
                entry[key] = _to_local(flat[f"optim/{name}/{key}"], value)
    for group, saved in zip(osd["param_groups"], groups, strict=True):
        group.update({k: v for k, v in saved.items() if k in ("lr", "initial_lr")})
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)


# -- save and load ----------------------------------------------------------------------------


def save_dcp(
    directory: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    data_state: Any = None,
    config: Any = None,
    extra: dict | None = None,
    parallel=None,
    keep: int = 0,
) -> Path:
    """Write the DCP checkpoint of ``step`` into ``directory``; every rank calls it (a
    collective). ``parallel``: the model's ParallelState (None in one process). ``keep``:
    how many checkpoints to keep (0: all). Returns the checkpoint's directory."""
    import torch.distributed.checkpoint as dcp

    path = Path(directory) / f"step_{int(step):08d}.dcp"
    if _rank() == 0 and path.exists():  # an incomplete or earlier save of this step
        (path / META).unlink(missing_ok=True)
        shutil.rmtree(path)
    _barrier(parallel)
    msd, osd, flat = _state(model, optimizer, parallel)
    small: dict[str, Tensor] = {}
    rng = _split(get_rng_state(), "extra/rng", small, set())
    flat.update(small)
    try:
        dcp.save(
            flat, storage_writer=dcp.HuggingFaceStorageWriter(str(path), save_distributed=True)
        )
    except OSError as error:
        raise CheckpointError(f"cannot write checkpoint {path}: {error}") from None
    _barrier(parallel)
    if _rank() == 0:
        meta = {
            "format": DCP_FORMAT,
            "step": int(step),
            "config": _canonical(config),
            "config_fingerprint": config_fingerprint(config),
            "mesh": parallel.spec.text() if hasattr(parallel, "spec") else None,
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "keys": sorted(flat),
            "data_state": _canonical(data_state),
            "scheduler": None if scheduler is None else _canonical(scheduler.state_dict()),
            "param_groups": None if osd is None else _canonical(_groups(osd)),
            "rng": rng,
            "extra": _canonical(extra or {}),
            "torch_version": torch.__version__,
        }
        write_json(path / META, meta)
        prune_dcp_checkpoints(directory, keep)
    _barrier(parallel)
    return path


def _groups(osd: dict) -> list[dict]:
    return [{k: v for k, v in g.items() if k != "params"} for g in osd["param_groups"]]


def read_dcp_meta(path: str | os.PathLike) -> dict:
    """``gatelab.json`` of a DCP checkpoint, checked to be one."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} is not a complete DCP checkpoint: it has no {META} (an interrupted save?)"
        ) from None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {path / META}: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != DCP_FORMAT:
        raise CheckpointError(f"{path / META} is not a gatelab DCP checkpoint's metadata")
    return meta


def load_dcp(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    config: Any = None,
    data: Any = None,
    rng: bool = True,
    parallel=None,
) -> Checkpoint:
    """Restore a DCP checkpoint written under any mesh into this rank's pieces of ``model``
    (and ``optimizer``, ``scheduler``, ``data``, the RNG); every rank calls it. The config
    and the tensor names are checked before the model changes (a fresh optimizer gets its
    zero state first: DCP reads the moments into it)."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    meta = read_dcp_meta(path)
    if config is not None and not _same_config(meta, config):
        diff = config_diff(upgrade_config(meta.get("config")), config)
        raise CheckpointError(
            f"checkpoint {path} was written by a run with another config; differing keys: "
            + ("; ".join(diff) if diff else "(unknown)")
        )
    msd, osd, flat = _state(model, optimizer, parallel)
    missing = sorted(set(flat) - set(meta.get("keys", [])))
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks {len(missing)} tensors of this model, e.g. {missing[0]!r}"
        )
    small: dict[str, Tensor] = {}
    if rng and meta.get("rng") is not None:
        _split(get_rng_state(), "extra/rng", small, set())
    flat.update(small)
    dcp.load(flat, storage_reader=dcp.HuggingFaceStorageReader(str(path)))
    _apply(model, optimizer, parallel, msd, osd, flat, meta.get("param_groups") or [])
    if scheduler is not None:
        scheduler.load_state_dict(meta["scheduler"])
    if data is not None and meta.get("data_state") is not None:
        data.load_state_dict(meta["data_state"])
    if small:
        set_rng_state(_join(meta["rng"], small, str(path)))
    return Checkpoint(
        path, int(meta["step"]), meta.get("config"), meta.get("data_state"), meta.get("extra") or {}
    )


def read_dcp_tensors(path: str | os.PathLike) -> tuple[dict, dict[str, Tensor]]:
    """(metadata, every stored tensor whole), in one process: the reader that conversion to a
    whole-file checkpoint uses."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    meta = read_dcp_meta(path)
    reader = dcp.HuggingFaceStorageReader(str(path))
    shapes = reader.read_metadata().state_dict_metadata
    tensors = {
        key: torch.empty(tuple(md.size), dtype=md.properties.dtype) for key, md in shapes.items()
    }
    dcp.load(tensors, storage_reader=reader, no_dist=True)
    return meta, tensors
