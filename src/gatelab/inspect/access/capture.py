"""Recording what the experts ran with: :class:`RoutingCapture` and :func:`capture_routing`."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from ...routing import Routing
from .blocks import select_blocks
from .hooks import HookHandle


class RoutingCapture(HookHandle):
    """Records, per MoE layer, the Routing of every forward (and optionally the block's
    input and output hidden states, flattened to [T, D]).

    ``routings[layer]`` is a list with one Routing per forward call; :meth:`routing` joins
    them along the token axis. With ``hidden=True``, ``inputs[layer]`` / ``outputs[layer]``
    hold the block's input and output (the output includes any shared expert). With
    ``stream=True``, ``streams[layer]`` holds the residual stream entering the block: in a
    pre-norm layer the input of the norm that feeds the block, not the normalised block
    input (see :mod:`.hooks` for how it is found). Everything is detached; ``to_cpu``
    moves it to the CPU as it is recorded.
    """

    def __init__(
        self,
        model,
        layers: Iterable[int] | None = None,
        hidden: bool = False,
        to_cpu: bool = False,
        stream: bool = False,
    ):
        super().__init__()
        self.blocks = select_blocks(model, layers)
        self.to_cpu = to_cpu
        self.routings: dict[int, list[Routing]] = {b.layer: [] for b in self.blocks}
        self.inputs: dict[int, list[Tensor]] = {b.layer: [] for b in self.blocks}
        self.outputs: dict[int, list[Tensor]] = {b.layer: [] for b in self.blocks}
        self.streams: dict[int, list[Tensor]] = {b.layer: [] for b in self.blocks}
        if stream:
            _check_streams(self.blocks)
        for block in self.blocks:
            self._add(block, "recorders", self._routing_recorder(block.layer))
            if hidden:
                self._add(block, "io_recorders", self._io_recorder(block.layer))
            if stream:
                self._add(block, "stream_recorders", self._stream_recorder(block.layer))

    def _move(self, t: Tensor) -> Tensor:
        return t.detach().cpu() if self.to_cpu else t.detach()

    def _routing_recorder(self, layer: int):
        def record(routing: Routing) -> None:
            r = routing.detach()
            if self.to_cpu:
                r = Routing(
                    r.logits.cpu(),
                    r.scores.cpu(),
                    r.experts.cpu(),
                    r.weights.cpu(),
                    {k: v.cpu() for k, v in r.aux.items() if isinstance(v, Tensor)},
                    check=False,
                )
            self.routings[layer].append(r)

        return record

    def _io_recorder(self, layer: int):
        def record(x: Tensor, y: Tensor) -> None:
            self.inputs[layer].append(self._move(x))
            self.outputs[layer].append(self._move(y))

        return record

    def _stream_recorder(self, layer: int):
        def record(h: Tensor) -> None:
            self.streams[layer].append(self._move(h))

        return record

    @property
    def layers(self) -> list[int]:
        return [b.layer for b in self.blocks]

    def routing(self, layer: int) -> Routing:
        """The Routing of all recorded tokens of ``layer`` (forward calls concatenated)."""
        got = self._get(self.routings, layer, "routing")
        if len(got) == 1:
            return got[0]
        width = max(r.num_slots for r in got)
        return Routing(
            torch.cat([r.logits for r in got]),
            torch.cat([r.scores for r in got]),
            torch.cat([_pad(r.experts, width, -1) for r in got]),
            torch.cat([_pad(r.weights, width, 0.0) for r in got]),
            check=False,
        )

    def input(self, layer: int) -> Tensor:
        """The block's recorded inputs [T, D] (needs ``hidden=True``)."""
        return torch.cat(self._get(self.inputs, layer, "input (capture with hidden=True)"))

    def output(self, layer: int) -> Tensor:
        """The block's recorded outputs [T, D] (needs ``hidden=True``)."""
        return torch.cat(self._get(self.outputs, layer, "output (capture with hidden=True)"))

    def stream(self, layer: int) -> Tensor:
        """The residual stream entering the block [T, D] (needs ``stream=True``)."""
        return torch.cat(
            self._get(self.streams, layer, "residual stream (capture with stream=True)")
        )

    def clear(self) -> None:
        """Forget what was recorded; keep recording."""
        for store in (self.routings, self.inputs, self.outputs, self.streams):
            for values in store.values():
                values.clear()

    def _get(self, store: dict[int, list], layer: int, what: str) -> list:
        if layer not in store:
            raise KeyError(f"layer {layer} was not captured; captured layers: {self.layers}")
        if not store[layer]:
            raise ValueError(f"no {what} recorded for layer {layer}: run a forward first")
        return store[layer]


def _check_streams(blocks) -> None:
    whole = [b.layer for b in blocks if b.parent is None]
    if whole:
        raise ValueError(
            f"the MoE block of layer {whole[0]} is the whole model: there is no residual "
            "stream around it to capture (stream=True); capture its input with hidden=True"
        )


def _pad(t: Tensor, width: int, value) -> Tensor:
    if t.shape[1] == width:
        return t
    return torch.cat([t, t.new_full((t.shape[0], width - t.shape[1]), value)], dim=1)


def capture_routing(
    model,
    layers: Iterable[int] | None = None,
    hidden: bool = False,
    to_cpu: bool = False,
    stream: bool = False,
) -> RoutingCapture:
    """Start recording every MoE layer's Routing (see :class:`RoutingCapture`).

    Use as a context manager, or call ``remove()`` when done.
    """
    return RoutingCapture(model, layers, hidden=hidden, to_cpu=to_cpu, stream=stream)
