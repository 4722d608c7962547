"""Old spellings that keep working.

:func:`moved` builds a module ``__getattr__`` that still imports a name from its old
module and warns (``DeprecationWarning``) with the new place.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["moved"]


def moved(old_module: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``old_module``: ``names`` maps each moved name to the
    module that holds it now (``"gatelab.convert"``), or to ``"module:new_name"`` when it
    was renamed too; reading one warns and returns the object from there."""

    def __getattr__(name: str) -> Any:
        target = names.get(name)
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
