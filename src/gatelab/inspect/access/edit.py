"""Routing edits on a live model: :class:`EditHandle`, :func:`edit_routing`, :func:`compose`.

An edit is a function ``Routing -> Routing`` (switch experts off, force them on, skip
low-score slots, restrict to kept experts). It acts on the Routing the block's router
produced, between the router and the experts; nothing on the router module is reassigned,
and removing the handle restores the block exactly. Edits that re-run the router's rule on
changed logits (the adapters' ``restrict``) call ``router.route_restricted(logits, allowed)``,
the seam every :class:`~gatelab.routing.Router` offers between ``compute_logits`` and
``route``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from ...routing import Routing
from .blocks import select_blocks
from .hooks import HookHandle

Edit = Callable[[Routing], Routing]
"""A routing edit: a function Routing -> Routing (switch experts off, force them on, skip...)."""


class EditHandle(HookHandle):
    """Routing edits installed on a model; ``remove()`` (or leaving the ``with``) undoes them.

    Several handles stack: edits run in the order their handles were created. Removing one
    leaves the others in place.
    """

    def __init__(
        self, model, edits: Edit | Mapping[int, Edit], layers: Iterable[int] | None = None
    ):
        super().__init__()
        if isinstance(edits, Mapping):
            if layers is not None:
                raise ValueError("give layers either as the keys of edits or as layers=, not both")
            blocks = select_blocks(model, list(edits))
            per_layer = {b.layer: edits[b.layer] for b in blocks}
        else:
            if not callable(edits):
                raise TypeError(
                    "edits must be a function Routing -> Routing or a {layer: function} dict"
                )
            blocks = select_blocks(model, layers)
            per_layer = {b.layer: edits for b in blocks}
        for block in blocks:
            edit = per_layer[block.layer]
            if not callable(edit):
                raise TypeError(f"the edit for layer {block.layer} is not callable")
            self._add(block, "edits", edit)
        self.layers = [b.layer for b in blocks]


def edit_routing(
    model, edits: Edit | Mapping[int, Edit], layers: Iterable[int] | None = None
) -> EditHandle:
    """Apply routing edits to ``model`` until the returned handle is removed.

    ``edits`` is one function for every selected layer (``layers``; all MoE layers by
    default), or a dict {layer: function}.
    """
    return EditHandle(model, edits, layers)


def compose(*edits: Edit) -> Edit:
    """One edit that applies ``edits`` left to right."""

    def composed(routing: Routing) -> Routing:
        for edit in edits:
            routing = edit(routing)
        return routing

    return composed
