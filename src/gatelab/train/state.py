"""What a checkpoint stores besides the parameters, as tensors + JSON: the split of nested
states into a JSON tree and a flat dict of tensors (no pickle), the global RNG states, and
the config's fingerprint and diff. :mod:`gatelab.train.checkpoint` writes and reads them.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CheckpointError",
    "config_diff",
    "config_fingerprint",
    "upgrade_config",
    "get_rng_state",
    "set_rng_state",
]


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, read or applied; the message names the file and why."""


# -- tensors <-> JSON ------------------------------------------------------------------------


def _split(obj: Any, prefix: str, tensors: dict[str, Tensor], seen: set[int]) -> Any:
    """A JSON-able copy of ``obj`` whose tensors are moved into ``tensors``.

    A tensor becomes ``{"__tensor__": key}``; a dict with int keys (optimizer state) becomes
    ``{"__int_keys__": {...}}``; tuples become lists (callers that need tuples restore them).
    """
    if isinstance(obj, Tensor):
        key = f"{prefix}#{len(tensors)}" if not prefix.startswith("model/") else prefix
        tensors[key] = _storable(obj, seen)
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return _split(torch.from_numpy(np.ascontiguousarray(obj)), prefix, tensors, seen)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if obj and all(isinstance(k, int) and not isinstance(k, bool) for k in obj):
            inner = {str(k): _split(v, f"{prefix}/{k}", tensors, seen) for k, v in obj.items()}
            return {"__int_keys__": inner}
        bad = [k for k in obj if not isinstance(k, str)]
        if bad:
            raise CheckpointError(
                f"cannot store {prefix}: dict keys must be str or all int, got {bad[0]!r}"
            )
        return {k: _split(v, f"{prefix}/{k}", tensors, seen) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_split(v, f"{prefix}/{i}", tensors, seen) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise CheckpointError(
        f"cannot store {prefix} ({type(obj).__name__}) in a checkpoint: only tensors, numbers, "
        "strings, None, lists and dicts are stored (no pickle)"
    )


def _storable(tensor: Tensor, seen: set[int]) -> Tensor:
    """A CPU, contiguous tensor that shares memory with no other stored tensor (safetensors
    refuses shared storage, e.g. tied embedding and output weights)."""
    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.numel():
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:
            tensor = tensor.clone()
            ptr = tensor.untyped_storage().data_ptr()
        seen.add(ptr)
    return tensor


def _join(obj: Any, tensors: dict[str, Tensor], where: str) -> Any:
    """The inverse of :func:`_split`."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            key = obj["__tensor__"]
            if key not in tensors:
                raise CheckpointError(f"{where}: the tensors file has no tensor {key!r}")
            return tensors[key]
        if set(obj) == {"__int_keys__"}:
            return {int(k): _join(v, tensors, where) for k, v in obj["__int_keys__"].items()}
        return {k: _join(v, tensors, where) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors, where) for v in obj]
    return obj


# -- RNG ---------------------------------------------------------------------------------------


def get_rng_state() -> dict[str, Any]:
    """The global RNG states the training loop may draw from: torch (CPU, and CUDA when it is
    in use), numpy's legacy global generator and Python's ``random`` (as plain ints)."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {
            "version": version,
            "internal": torch.tensor(internal, dtype=torch.int64),  # 625 ints, kept out of JSON
            "gauss_next": gauss_next,
        },
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned (also after a JSON/safetensors round trip)."""
    try:
        torch.set_rng_state(state["torch"].to(torch.uint8))
        py = state["python"]
        internal = py["internal"]
        internal = tuple(
            int(v) for v in (internal.tolist() if torch.is_tensor(internal) else internal)
        )
        gauss = None if py["gauss_next"] is None else float(py["gauss_next"])
        random.setstate((int(py["version"]), internal, gauss))
        npy = state["numpy"]
        keys = np.asarray(npy["keys"].numpy(), dtype=np.uint32)
        np.random.set_state(
            (
                str(npy["name"]),
                keys,
                int(npy["pos"]),
                int(npy["has_gauss"]),
                float(npy["cached_gaussian"]),
            )
        )
        cuda = state.get("cuda")
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in cuda])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"invalid RNG state: {e}") from e


# -- config ------------------------------------------------------------------------------------


def _canonical(config: Any) -> Any:
    """The config as JSON will give it back (tuples -> lists), so comparisons are fair."""
    try:
        return json.loads(json.dumps(config, sort_keys=True))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the config must be JSON-serialisable: {e}") from e


def config_fingerprint(config: Any) -> str:
    """SHA-256 of the config's canonical JSON: equal configs, equal fingerprints."""
    text = json.dumps(_canonical(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def upgrade_config(config: Any) -> Any:
    """A run config as stored by an earlier version, in today's layout: a recipe's flat MoE
    keys (``model.num_experts``) move into ``model.moe``, so a run started before the nested
    MoE config resumes under today's code. Anything else comes back unchanged."""
    if not (isinstance(config, dict) and isinstance(config.get("run"), dict)):
        return config
    model = config["run"].get("model")
    if not isinstance(model, dict):
        return config
    from ..models import upgrade_model_table  # models sit above train; imported on use

    return {**config, "run": {**config["run"], "model": upgrade_model_table(model)}}


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix or "<config>": obj}


def config_diff(saved: Any, current: Any) -> list[str]:
    """``key: checkpoint X, now Y`` for every dotted key whose value differs."""
    a, b = _flatten(_canonical(saved)), _flatten(_canonical(current))
    lines = []
    for key in sorted(set(a) | set(b)):
        if key not in a:
            lines.append(f"{key}: absent in the checkpoint, now {b[key]!r}")
        elif key not in b:
            lines.append(f"{key}: checkpoint {a[key]!r}, absent now")
        elif a[key] != b[key]:
            lines.append(f"{key}: checkpoint {a[key]!r}, now {b[key]!r}")
    return lines
