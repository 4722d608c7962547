"""Routing telemetry: how a Routing spreads tokens over experts, as plain Python numbers.

:func:`routing_stats` summarises one Routing; :class:`RoutingMonitor` adds the same counts
up over many forwards, per layer, by hooking every module that exposes ``last_routing``
(gatelab's :class:`~gatelab.layers.MoE`, and any wrapper that follows the same contract).
Everything returned is JSON-serialisable (ints, floats, lists, dicts).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..routing import Routing

__all__ = ["RoutingMonitor", "routing_stats"]

# Additive counts: summing them over calls and then summarising gives the same numbers as
# summarising the concatenated calls (for the same layer).
_ADDITIVE = ("num_tokens", "empty_slots", "dropped_slots", "unrouted_tokens", "entropy_sum")


def routing_stats(routing: Routing, token_mask: Tensor | None = None) -> dict[str, Any]:
    """Load and entropy statistics of one Routing; padding (``token_mask`` False) excluded.

    Returns a dict with:

    - ``num_tokens``, ``num_experts``, ``top_k`` (the Routing's slot count K);
    - ``tokens_per_expert``: [E] list, the load histogram (slots each expert received);
    - ``load_share``: [E] list, tokens_per_expert / its sum (zeros when nothing is routed);
    - ``dead_experts`` and ``num_dead_experts``: experts that received no token;
    - ``routing_entropy``: mean over tokens of the entropy (nats) of ``scores``, each row
      normalised to sum to 1 first (a no-op for softmax scores; sigmoid scores need it);
    - ``load_entropy``: entropy of ``load_share`` divided by log E (1 = perfectly even;
      1 when E = 1, 0 when nothing is routed);
    - ``empty_slots``: empty slots of real tokens;
    - ``dropped_slots``: ``routing.aux["dropped"]`` when the Routing went through a capacity
      limit, else 0 (counted over all tokens: capacity does not know the mask);
    - ``unrouted_tokens``: real tokens with no expert at all;
    - ``max_load_ratio``: max / mean of tokens_per_expert (1 = balanced; 0 when nothing
      is routed).
    """
    return _summarise(_counts(routing, token_mask))


def _counts(routing: Routing, token_mask: Tensor | None) -> dict[str, Any]:
    """The additive counts of one Routing, from which :func:`_summarise` derives the rest."""
    num_tokens = routing.num_tokens
    if token_mask is None:
        mask = torch.ones(num_tokens, dtype=torch.bool, device=routing.experts.device)
    else:
        if token_mask.numel() != num_tokens:
            raise ValueError(
                f"token_mask has {token_mask.numel()} elements for {num_tokens} tokens; "
                "pass one entry per token (True for real tokens, False for padding)"
            )
        mask = token_mask.reshape(-1).to(routing.experts.device).bool()
    valid = routing.valid[mask]  # [T_real, K]
    scores = routing.scores.detach().double()[mask]
    probs = scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-300)
    entropy = -torch.special.xlogy(probs, probs).sum(dim=-1)
    dropped = routing.aux.get("dropped")
    return {
        "num_tokens": int(mask.sum()),
        "num_experts": routing.num_experts,
        "top_k": routing.num_slots,
        "tokens_per_expert": routing.tokens_per_expert(mask).tolist(),
        "entropy_sum": float(entropy.sum()),
        "empty_slots": int((~valid).sum()),
        "dropped_slots": int(dropped) if dropped is not None else 0,
        "unrouted_tokens": int((~valid.any(dim=1)).sum()),
    }


def _summarise(counts: dict[str, Any]) -> dict[str, Any]:
    load = counts["tokens_per_expert"]
    num_experts, total = len(load), sum(load)
    share = [n / total if total else 0.0 for n in load]
    dead = [e for e, n in enumerate(load) if n == 0]
    if total == 0:
        load_entropy = 0.0
    elif num_experts == 1:
        load_entropy = 1.0
    else:
        load_entropy = -sum(p * math.log(p) for p in share if p > 0) / math.log(num_experts)
    num_tokens = counts["num_tokens"]
    return {
        "num_tokens": num_tokens,
        "num_experts": counts["num_experts"],
        "top_k": counts["top_k"],
        "tokens_per_expert": list(load),
        "load_share": share,
        "dead_experts": dead,
        "num_dead_experts": len(dead),
        "routing_entropy": counts["entropy_sum"] / num_tokens if num_tokens else 0.0,
        "load_entropy": load_entropy,
        "empty_slots": counts["empty_slots"],
        "dropped_slots": counts["dropped_slots"],
        "unrouted_tokens": counts["unrouted_tokens"],
        "max_load_ratio": max(load) * num_experts / total if total else 0.0,
    }


class RoutingMonitor:
    """Accumulate routing statistics per layer over many forwards.

    Use it on a model (every module with a ``last_routing`` attribute is hooked; the
    ``token_mask`` forward argument, when given, excludes padding)::

        monitor = RoutingMonitor().attach(model)
        for batch in batches:
            model(batch)
        print(json.dumps(monitor.summary()))
        monitor.remove()

    or feed it Routings directly with :meth:`record`. ``summary()`` gives, per layer name,
    the :func:`routing_stats` of all recorded calls taken together, plus ``calls``.
    """

    def __init__(self):
        self._totals: dict[str, dict[str, Any]] = {}
        self._handles: list[Any] = []

    def attach(self, model: nn.Module) -> RoutingMonitor:
        """Hook every submodule of ``model`` (itself included) that has ``last_routing``."""
        for name, module in model.named_modules():
            if hasattr(module, "last_routing"):
                hook = self._make_hook(name or type(module).__name__)
                self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
        return self

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            routing = module.last_routing
            if routing is None:
                return
            token_mask = kwargs.get("token_mask")
            if token_mask is None and len(args) > 2:  # MoE.forward(x, token_ids, token_mask)
                token_mask = args[2]
            self.record(name, routing, token_mask)

        return hook

    def record(self, name: str, routing: Routing, token_mask: Tensor | None = None) -> None:
        """Add one Routing to the totals of layer ``name``."""
        counts = _counts(routing, token_mask)
        totals = self._totals.get(name)
        if totals is None:
            self._totals[name] = {**counts, "calls": 1}
            return
        if totals["num_experts"] != counts["num_experts"]:
            raise ValueError(
                f"layer {name!r} was recorded with num_experts={totals['num_experts']}, "
                f"now {counts['num_experts']}; use one name per layer"
            )
        for key in _ADDITIVE:
            totals[key] += counts[key]
        totals["tokens_per_expert"] = [
            a + b
            for a, b in zip(totals["tokens_per_expert"], counts["tokens_per_expert"], strict=True)
        ]
        totals["top_k"] = max(totals["top_k"], counts["top_k"])
        totals["calls"] += 1

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per-layer statistics over everything recorded since the last :meth:`reset`."""
        return {
            name: {**_summarise(totals), "calls": totals["calls"]}
            for name, totals in self._totals.items()
        }

    def reduce(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Replace the additive counts of every layer by ``fn`` of them, e.g. a sum over the
        processes of a distributed run (``fn`` an all-reduce), so a summary counts every
        process's tokens.

        Per layer, in sorted name order (so every process passes its layers in the same
        order), ``fn`` receives one float64 vector ``[tokens_per_expert..., num_tokens,
        empty_slots, dropped_slots, unrouted_tokens, entropy_sum]`` and returns the reduced
        vector of the same shape (it may reduce in place and return its argument). ``calls``
        is not reduced: it stays this process's count.
        """
        for name in sorted(self._totals):
            layer = self._totals[name]
            num_experts = len(layer["tokens_per_expert"])
            flat = torch.tensor(
                [*layer["tokens_per_expert"], *(layer[k] for k in _ADDITIVE)], dtype=torch.float64
            )
            flat = fn(flat)
            layer["tokens_per_expert"] = [round(v) for v in flat[:num_experts].tolist()]
            for key, value in zip(_ADDITIVE, flat[num_experts:].tolist(), strict=True):
                layer[key] = value if key == "entropy_sum" else round(value)

    def reset(self) -> None:
        """Forget what was recorded (the hooks stay)."""
        self._totals.clear()

    def remove(self) -> None:
        """Remove the hooks this monitor attached."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> RoutingMonitor:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
