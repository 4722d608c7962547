"""One access layer over the MoE blocks of any model: find them, capture their Routing, edit it.

A *block* is one MoE layer: a router that decides, experts that run. gatelab's own
:class:`~gatelab.layers.MoE` is one; so is every Hugging Face v5 MoE block (Mixtral,
Qwen2/Qwen3-MoE, OLMoE, DeepSeek-V3, GPT-OSS, ...), which ``gatelab.hf.access`` teaches
this layer to read. The same three calls work on both::

    blocks = find_moe_blocks(model)                  # [MoEBlock], one per MoE layer
    with capture_routing(model, hidden=True) as cap: # the exact Routing of every forward
        model(ids)
    cap.routing(layer)                               # Routing over all recorded tokens
    with edit_routing(model, {layer: fn}):           # fn: Routing -> Routing
        model(ids)                                   # runs with the edited routing

The package, each module importing only those above it:

- :mod:`.adapters`: ``BlockAdapter`` (how a model family exposes its blocks), the registry
  (``register_adapter``, ``adapters``) and ``GatelabAdapter``;
- :mod:`.blocks`: ``MoEBlock``, ``find_moe_blocks``, ``select_blocks``;
- :mod:`.hooks`: the per-block hook owner through which every Routing passes;
- :mod:`.capture`: ``RoutingCapture``, ``capture_routing``;
- :mod:`.edit`: ``Edit``, ``EditHandle``, ``edit_routing``, ``compose``.

The prompt helpers (``context_length``, ``prompt_batches``, ``forward_ids``,
``next_token_loss``) live in :mod:`gatelab.inspect.prompts` and are re-exported here.

The layer sits in ``inspect/`` so that both the inspection tools (profile, localise) and
the edits in ``edit/`` (which may import ``inspect``) build on it; ``gatelab.edit``
re-exports it.
"""

from ..prompts import context_length, forward_ids, next_token_loss, prompt_batches
from .adapters import BlockAdapter, GatelabAdapter, adapters, register_adapter
from .blocks import MoEBlock, NoMoEBlocksError, find_moe_blocks, select_blocks
from .capture import RoutingCapture, capture_routing
from .edit import Edit, EditHandle, compose, edit_routing
from .hooks import has_hooks

__all__ = [
    # adapters
    "BlockAdapter",
    "GatelabAdapter",
    "adapters",
    "register_adapter",
    # blocks
    "MoEBlock",
    "NoMoEBlocksError",
    "find_moe_blocks",
    "select_blocks",
    # hooks, capture, edit
    "has_hooks",
    "RoutingCapture",
    "capture_routing",
    "Edit",
    "EditHandle",
    "compose",
    "edit_routing",
    # prompts (gatelab.inspect.prompts)
    "context_length",
    "forward_ids",
    "next_token_loss",
    "prompt_batches",
]
