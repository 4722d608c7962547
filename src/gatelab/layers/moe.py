"""The MoE layer: router -> (capacity) -> dispatch through an expert bank -> (+ shared)."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from ..dispatch import get_dispatcher
from ..experts import EXPERT_BANKS, ExpertBank
from ..routing import LOSSES, ROUTERS, Router, Routing, apply_capacity
from .mlp import SharedExpert


class MoE(nn.Module):
    """A mixture-of-experts layer on inputs [..., dim].

    Args:
        dim: model width D.
        hidden_dim: width F of each routed expert.
        num_experts: E.
        top_k: experts per token (for expert choice: the average).
        router: a registered router name (``gatelab.routing.ROUTERS``) or a Router module.
        experts: a registered bank name ("glu", "mlp") or an ExpertBank.
        act, bias: activation and biases of the routed experts (when built by name).
        dispatcher: "auto", "grouped" or "loop", or a dispatcher object: any callable with
            the dispatcher signature, such as ``gatelab.dispatch.ExpertParallel`` (which
            ``gatelab.parallelize`` installs from outside).
        shared_hidden_dim: hidden width of a shared expert every token also passes (0: none).
            (``shared_experts``, its old name, still works with a DeprecationWarning.)
        shared_gate: scale the shared expert by sigmoid(x w) (Qwen2-MoE).
        capacity_factor: None for dropless; otherwise each expert takes at most
            ceil(capacity_factor * T * k / E) slots and the rest are dropped.
        loss_weights: coefficients of the auxiliary losses to compute in training, e.g.
            ``{"balance": 0.01, "z": 0.001}``; names from ``gatelab.routing.LOSSES``.
        deterministic: combine without atomic adds (bitwise repeatable on GPUs).
        router_kwargs: extra arguments for a router built by name.

    After each forward, ``last_routing`` holds the Routing the experts ran with (detached) and
    ``aux_losses`` the weighted auxiliary losses (``aux_loss`` their sum) computed on the
    routing before capacity drops, with padding excluded through ``token_mask``.

    ``aux_loss_routing`` (None by default) may be set to a function ``(routing, token_mask)
    -> (routing, token_mask)`` that the aux losses are computed on instead: under data
    parallelism ``gatelab.parallelize`` sets it to gather every rank's routing, so the
    losses are those of the global batch. ``capacity_rule`` (``apply_capacity`` by default)
    empties the slots beyond capacity; ``gatelab.parallelize(global_routing=True)``
    replaces it by one that decides on the global batch.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        top_k: int = 2,
        router: str | Router = "topk",
        experts: str | ExpertBank = "glu",
        act: str = "silu",
        bias: bool = False,
        dispatcher: str = "auto",
        shared_hidden_dim: int = 0,
        shared_gate: bool = False,
        capacity_factor: float | None = None,
        loss_weights: dict[str, float] | None = None,
        deterministic: bool = True,
        router_kwargs: dict | None = None,
        *,
        shared_experts: int | None = None,
    ):
        super().__init__()
        if shared_experts is not None:
            shared_hidden_dim = _renamed_shared_experts(shared_experts, shared_hidden_dim)
        self.dim, self.hidden_dim = dim, hidden_dim
        self.num_experts, self.top_k = num_experts, top_k
        self.router = self._build_router(router, router_kwargs or {})
        self.experts = self._build_experts(experts, act, bias)
        # Routers that score tokens by the experts' own weights (MoE-X) read this bank.
        bind = getattr(self.router, "bind_experts", None)
        if callable(bind):
            bind(self.experts)
        if not callable(dispatcher):
            get_dispatcher(dispatcher)  # fail early on an unknown name
        self.dispatcher = dispatcher
        self.aux_loss_routing = None
        self.capacity_rule = apply_capacity  # gatelab.parallel may make it global
        self.shared_experts = (
            SharedExpert(dim, shared_hidden_dim, act=act, gated=shared_gate)
            if shared_hidden_dim
            else None
        )
        if capacity_factor is not None and not _positive_finite(capacity_factor):
            raise ValueError(
                "capacity_factor must be > 0 and a finite number, or None for dropless routing; "
                f"got {capacity_factor!r}"
            )
        self.capacity_factor = capacity_factor
        self.loss_weights = _check_loss_weights(loss_weights or {})
        self.deterministic = deterministic
        self.last_routing: Routing | None = None
        self.aux_losses: dict[str, Tensor] = {}

    def __getstate__(self):
        # The last forward's losses belong to its autograd graph, which cannot be copied
        # or pickled: copies (deepcopy for EMA, pickling) start without them.
        state = dict(super().__getstate__())
        state["last_routing"], state["aux_losses"] = None, {}
        return state

    def _build_router(self, router, kwargs) -> Router:
        if isinstance(router, nn.Module):
            if kwargs:
                raise ValueError("router_kwargs apply only to a router given by name")
            built = router
        else:
            built = ROUTERS.get(router)(self.dim, self.num_experts, self.top_k, **kwargs)
        # A given router's top_k is the one that routes: a layer reporting another is wrong.
        got = (built.dim, built.num_experts, getattr(built, "top_k", self.top_k))
        if got != (self.dim, self.num_experts, self.top_k):
            raise ValueError(
                f"router is for dim={got[0]}, num_experts={got[1]}, top_k={got[2]}; the layer "
                f"has dim={self.dim}, num_experts={self.num_experts}, top_k={self.top_k}"
            )
        return built

    def _build_experts(self, experts, act, bias) -> nn.Module:
        if isinstance(experts, nn.Module):
            built = experts
        else:
            built = EXPERT_BANKS.get(experts)(
                self.num_experts, self.dim, self.hidden_dim, act=act, bias=bias
            )
        w = built.weights().check()
        if (w.num_experts, w.dim, w.hidden_dim) != (self.num_experts, self.dim, self.hidden_dim):
            raise ValueError(
                f"expert bank has num_experts={w.num_experts}, dim={w.dim}, "
                f"hidden_dim={w.hidden_dim}; the layer has num_experts={self.num_experts}, "
                f"dim={self.dim}, hidden_dim={self.hidden_dim}"
            )
        return built

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, "
            f"top_k={self.top_k}, dispatcher={self.dispatcher!r}, "
            f"capacity_factor={self.capacity_factor}"
        )

    @property
    def aux_loss(self) -> Tensor:
        """The sum of the weighted auxiliary losses of the last forward (0 when none)."""
        if not self.aux_losses:
            return torch.zeros((), device=self.router_device)
        return sum(self.aux_losses.values())

    @property
    def router_device(self) -> torch.device:
        return next(self.experts.parameters()).device

    def forward(
        self,
        x: Tensor,
        token_ids: Tensor | None = None,
        token_mask: Tensor | None = None,
        routing_edit=None,
    ) -> Tensor:
        """x [..., dim] -> [..., dim].

        token_ids: [...] ids for hash routing. token_mask: [...] True for real tokens,
        excluded from the losses when False. routing_edit: an optional ``Routing -> Routing``
        function applied before dispatch (steer, skip, prune).
        """
        self._check_input(x)
        shape = x.shape
        flat = x.reshape(-1, self.dim)
        positions = None
        if x.dim() >= 2 and getattr(self.router, "uses_positions", True):
            positions = torch.arange(shape[-2], device=x.device).repeat(
                flat.shape[0] // max(shape[-2], 1)
            )
        routing = self.router(flat, token_ids=token_ids, positions=positions)
        if self.training and self.loss_weights:
            seen, seen_mask = routing, token_mask
            if self.aux_loss_routing is not None:
                seen, seen_mask = self.aux_loss_routing(routing, token_mask)
            self.aux_losses = {
                name: weight * LOSSES[name](seen, seen_mask)
                for name, weight in self.loss_weights.items()
            }
        else:
            self.aux_losses = {}
        if self.capacity_factor is not None:
            routing = self.capacity_rule(routing, self.capacity_factor)
        if routing_edit is not None:
            routing = routing_edit(routing)
        self.last_routing = routing.detach()
        dispatch = self.dispatcher
        if not callable(dispatch):
            dispatch = get_dispatcher(dispatch)
        out = dispatch(
            flat, routing.experts, routing.weights, self.experts.weights(), self.deterministic
        )
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.reshape(shape)

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"MoE expects a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(
                f"MoE input must be a real floating tensor, got {x.dtype}; "
                "embed token ids first, or cast with x.float()"
            )
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"MoE input must be [..., dim={self.dim}], got shape {tuple(x.shape)}")


def _renamed_shared_experts(shared_experts: int, shared_hidden_dim: int) -> int:
    """The shared expert's width from the old keyword ``shared_experts`` (a width, not a count)."""
    if shared_hidden_dim:
        raise ValueError(
            "MoE got both shared_experts and shared_hidden_dim; pass only shared_hidden_dim "
            "(the shared expert's hidden width)"
        )
    warnings.warn(
        f"MoE(shared_experts={shared_experts}) is deprecated: the argument is the shared "
        f"expert's hidden width, not a count; pass shared_hidden_dim={shared_experts}",
        DeprecationWarning,
        stacklevel=3,
    )
    return shared_experts


def _positive_finite(value) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and math.isfinite(value) and value > 0


def _check_loss_weights(weights: dict[str, float]) -> dict[str, float]:
    for name, value in weights.items():
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r}; valid names are: {', '.join(sorted(LOSSES))}")
        # NaN compared False with 0 and was dropped silently; inf crashed mid-run.
        if not (_positive_finite(value) or (value == 0 and not isinstance(value, (bool, str)))):
            raise ValueError(f"loss weight {name}={value!r} must be a finite number >= 0")
    return {name: float(value) for name, value in weights.items() if value > 0}
