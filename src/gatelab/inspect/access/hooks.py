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
- The residual stream entering a block (EASY-EP compares it with the stream plus the routed
  output) is found by identity, not by names: the block's input is the output of a sibling
  normalisation module (any child of the block's parent whose class name contains "norm":
  ``ffn_norm``, ``post_attention_layernorm``, ...), and that module's input is the stream;
  or the block's input is its parent's own input, and then that is the stream.
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
        self.stream_recorders: dict[int, Callable[[Tensor], None]] = {}
        self.handles: list[Any] = []
        self._stream_hooked = self._installed = False

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
        # the stream hooks first: they refuse a block without a residual stream, and a
        # refusal must leave nothing installed
        if kind == "stream_recorders" and not self._stream_hooked:
            self.handles += _stream_hooks(self)
            self._stream_hooked = True
        key = next(_ids)
        getattr(self, kind)[key] = fn
        if not self._installed:
            self.handles += self.block.adapter.install(self.block, self)
            self.handles.append(
                self.block.module.register_forward_hook(self._io_hook, with_kwargs=True)
            )
            self._installed = True
        return key

    def discard(self, kind: str, key: int) -> None:
        getattr(self, kind).pop(key, None)
        if not (self.edits or self.recorders or self.io_recorders or self.stream_recorders):
            for handle in self.handles:
                handle.remove()
            self.handles, self._stream_hooked, self._installed = [], False, False
            _HOOKS.pop(self.block.module, None)

    def _io_hook(self, module, args, kwargs, output) -> None:
        if not self.io_recorders:
            return
        x = args[0] if args else next(iter(kwargs.values()))
        y = output[0] if isinstance(output, tuple) else output
        self.record_io(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]))


def _first_tensor(args: tuple, kwargs: dict) -> Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return value
    return None


def _stream_hooks(hooks: BlockHooks) -> list[Any]:
    """Hooks that hand the residual stream entering the block to ``hooks.stream_recorders``
    (see the module doc). A block whose input is neither a sibling norm's output nor its
    parent's input raises: there is no residual stream that can be named without guessing."""
    block = hooks.block
    if block.parent is None:
        raise ValueError(f"layer {block.layer}: the block has no enclosing module (no stream)")
    fed: list[tuple[Tensor, Tensor]] = []  # (output, input) seen in this layer's forward

    def layer_input(module, args, kwargs):
        fed.clear()
        x = _first_tensor(args, kwargs)
        if x is not None:
            fed.append((x, x))

    def norm_output(module, args, kwargs, output):
        x = _first_tensor(args, kwargs)
        if isinstance(output, Tensor) and x is not None:
            fed.append((output, x))

    def block_input(module, args, kwargs):
        if not hooks.stream_recorders:
            return
        x = _first_tensor(args, kwargs)
        stream = next((inp for out, inp in reversed(fed) if out is x), None)
        fed.clear()
        if stream is None:
            raise ValueError(
                f"cannot find the residual stream entering the MoE block {block.name!r}: its "
                f"input is neither the output of a norm module in {type(block.parent).__name__} "
                "nor that module's own input"
            )
        for record in list(hooks.stream_recorders.values()):
            record(stream.detach().reshape(-1, stream.shape[-1]))

    norms = [
        child
        for child in block.parent.children()
        if child is not block.module and "norm" in type(child).__name__.lower()
    ]
    return [
        block.parent.register_forward_pre_hook(layer_input, with_kwargs=True),
        *(n.register_forward_hook(norm_output, with_kwargs=True) for n in norms),
        block.module.register_forward_pre_hook(block_input, with_kwargs=True),
    ]


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
