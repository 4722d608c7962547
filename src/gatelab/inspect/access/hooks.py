"""The per-block hook owner: every Routing a block produces goes through its edits, then to
its recorders.

Each block gets at most one hook set, owned by a :class:`BlockHooks` that holds an ordered
list of edits and of recorders. Edits run in the order they were added, then every recorder
sees the result, so a capture always sees what the experts ran with, whatever order capture
and edits were opened in. When the last edit and recorder of a block are removed, its hooks
are removed too, and the block is exactly as it was.

- gatelab ``MoE``: a forward pre-hook passes ``routing_edit`` (composed with one the caller
  passed) so the Routing is taken after capacity, exactly as the experts see it.
- HF blocks: a forward hook on the router converts its ``(router_logits, top_k_weights,
  top_k_index)`` to a Routing and, when edits are active, back (see ``gatelab.hf.access``).
  The Routing is the router's own output, never recomputed (DeepSeek's bias and groups).
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from ...routing import Routing
from .blocks import MoEBlock

_HOOKS: weakref.WeakKeyDictionary[nn.Module, BlockHooks] = weakref.WeakKeyDictionary()
_ids = itertools.count()


class BlockHooks:
    """The edits and recorders of one block, and the hooks that serve them."""

    def __init__(self, block: MoEBlock):
        self.block = block
        self.edits: dict[int, Callable[[Routing], Routing]] = {}
        self.recorders: dict[int, Callable[[Routing], None]] = {}
        self.io_recorders: dict[int, Callable[[Tensor, Tensor], None]] = {}
        self.handles: list[Any] = []

    @property
    def editing(self) -> bool:
        return bool(self.edits)

    def apply(self, routing: Routing) -> Routing:
        """Edits in order, then every recorder sees the result."""
        for edit in list(self.edits.values()):
            routing = edit(routing)
            if not isinstance(routing, Routing):
                raise TypeError(
                    f"a routing edit on layer {self.block.layer} returned "
                    f"{type(routing).__name__}; an edit must return a Routing"
                )
        for record in list(self.recorders.values()):
            record(routing)
        return routing

    def record_io(self, x: Tensor, y: Tensor) -> None:
        for record in list(self.io_recorders.values()):
            record(x, y)

    def add(self, kind: str, fn) -> int:
        key = next(_ids)
        getattr(self, kind)[key] = fn
        if not self.handles:
            self.handles = self.block.adapter.install(self.block, self)
            self.handles.append(
                self.block.module.register_forward_hook(self._io_hook, with_kwargs=True)
            )
        return key

    def discard(self, kind: str, key: int) -> None:
        getattr(self, kind).pop(key, None)
        if not (self.edits or self.recorders or self.io_recorders):
            for handle in self.handles:
                handle.remove()
            self.handles = []
            _HOOKS.pop(self.block.module, None)

    def _io_hook(self, module, args, kwargs, output) -> None:
        if not self.io_recorders:
            return
        x = args[0] if args else next(iter(kwargs.values()))
        y = output[0] if isinstance(output, tuple) else output
        self.record_io(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]))


def has_hooks(block: MoEBlock) -> bool:
    """True while a capture or an edit of the access layer is installed on the block."""
    return block.module in _HOOKS


def hooks_for(block: MoEBlock) -> BlockHooks:
    """The block's hook owner, created on first use."""
    hooks = _HOOKS.get(block.module)
    if hooks is None:
        hooks = _HOOKS[block.module] = BlockHooks(block)
    return hooks


class HookHandle:
    """Undo for a set of registrations; a context manager; ``remove()`` is idempotent."""

    def __init__(self):
        self._registered: list[tuple[BlockHooks, str, int]] = []

    def _add(self, block: MoEBlock, kind: str, fn) -> None:
        hooks = hooks_for(block)
        self._registered.append((hooks, kind, hooks.add(kind, fn)))

    def remove(self) -> None:
        while self._registered:
            hooks, kind, key = self._registered.pop()
            hooks.discard(kind, key)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
