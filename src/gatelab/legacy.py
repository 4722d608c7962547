"""Old spellings that keep working: state-dict keys and import paths.

Two tools, used where a name changed:

- :func:`rename_on_load` registers a load-state-dict pre-hook on a module that maps the keys
  an earlier gatelab wrote (``fc1.weight``) to today's (``up_proj.weight``), so
  ``load_state_dict`` reads both. Fused or split tensors get a hook of their own (see
  ``GatedAttention`` and ``SharedExpert``); :func:`upgrade_state_dict` runs every hook of a
  model on a copy of a state dict, so a checkpoint reader can check names and shapes
  against the model before it loads anything.
- :func:`moved` builds a module ``__getattr__`` that still imports a name from its old
  module and warns (``DeprecationWarning``) with the new place.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

__all__ = ["moved", "rename_on_load", "upgrade_state_dict"]


def rename_on_load(module: nn.Module, renames: Mapping[str, str]) -> None:
    """Load ``prefix + old`` keys as ``prefix + new`` (old -> new in ``renames``).

    A key already present under its new name wins (the old one is left for ``strict`` to
    report), so a state dict in today's layout passes through unchanged.
    """
    renames = dict(renames)

    def hook(state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
        for old, new in renames.items():
            key, target = prefix + old, prefix + new
            if key in state_dict and target not in state_dict:
                state_dict[target] = state_dict.pop(key)

    module._register_load_state_dict_pre_hook(hook)


def upgrade_state_dict(model: nn.Module, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with every key map of ``model``'s modules applied (a new dict; tensors shared).

    The hooks run in the order ``load_state_dict`` runs them (parents before children), each
    with its module's prefix, so the result has the keys ``model.state_dict()`` has when the
    state dict was written by an earlier gatelab.
    """
    upgraded = dict(state)
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for hook in module._load_state_dict_pre_hooks.values():
            hook(upgraded, prefix, {}, True, [], [], [])
    return upgraded


def moved(old_module: str, names: Mapping[str, str] | str) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``old_module``: ``names`` maps each moved name to the
    module that holds it now (``"gatelab.convert"``), or to ``"module:new_name"`` when it
    was renamed too; reading one warns and returns the object from there. A module that
    moved whole gives the new module's name instead of a mapping: every public name of it
    is then found there."""

    def __getattr__(name: str) -> Any:
        target = _target(names, name)
        if target is None:
            raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
        new_module, _, new_name = target.partition(":")
        new_name = new_name or name
        warnings.warn(
            f"{old_module}.{name} moved to {new_module}.{new_name}; import it from there",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(new_module), new_name)

    return __getattr__


def _target(names: Mapping[str, str] | str, name: str) -> str | None:
    """Where ``name`` lives now, or None when it did not move here."""
    if not isinstance(names, str):
        return names.get(name)
    if name.startswith("_"):
        return None
    return names if hasattr(importlib.import_module(names), name) else None
