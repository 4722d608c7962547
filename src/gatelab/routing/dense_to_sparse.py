"""EvoMoE's Dense-To-Sparse gate: a Gumbel-softmax gate whose temperature falls over training."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .routers import ROUTERS, Router, top_k
from .routing import EMPTY, Routing
from .schedules import Exponential, Linear, Schedule, build_schedule

DECAYS = {"linear": Linear, "exponential": Exponential}
EVAL_MODES = ("top1", "dense")


@ROUTERS.register("dense_to_sparse")
class DenseToSparseRouter(Router):
    """Dense-To-Sparse gate (DTS-Gate).

    "EvoMoE: An Evolutional Mixture-of-Experts Training Framework via Dense-To-Sparse Gate"
    (Nie et al., arXiv 2112.14397), following the released fairseq code
    (``codecaution/EvoMoE``, ``topkgate.py``). In training, for logits l = W x (no bias):

    - g = softmax((l + Gumbel noise) / tau), a Gumbel-softmax sample;
    - an expert takes part when g_e > ``threshold`` (the reference's 0.001), so a token
      gets a varying number of experts: all of them at a high tau, about one at a low tau;
    - its combine weight is softmax(l)_e (the reference default) or, with
      ``gumbel_weights=True`` (``--use-gumbel-gates``), g_e; weights are not renormalised.
    - from step ``hard_from`` on, the gate is hard: one expert per token, the argmax of
      the Gumbel sample (top-1 with noise), weighted as above.

    tau follows a schedule of the training step (:meth:`set_step`, called by the trainer):
    ``decay`` "linear" or "exponential" from ``tau_max`` to ``tau_min`` over
    ``decay_steps`` (EvoMoE's ``Linear`` / ``Exp`` schedulers), or any ``tau`` schedule
    (a number, a dict with ``kind``, or a :class:`~gatelab.routing.schedules.Schedule`),
    which replaces them. The defaults (tau 2.0 -> 0.5 linearly over 5000 steps) are the
    released WMT14 script's; it also switches to hard routing at update 6000, which here is
    ``hard_from=6000`` (the default, None, never switches). In eval mode the gate is ``eval_mode``: "top1" (the reference's
    ``top1gating``: argmax of l, weight softmax(l)) or "dense" (``dense_validate``: every
    expert at softmax(l)).

    ``scores`` are softmax(l), so the switch balance loss on this Routing is the
    reference's l_aux = E^2 mean_e(me_e ce_e); ``aux["tau"]`` holds the temperature used.

    Slots, K = ``top_k``: the Routing has K slots per token, holding the K experts with the
    largest g in descending order, those with g <= threshold emptied (EMPTY = -1). The
    default, K = ``num_experts``, is the reference gate, where any number of experts may
    pass. **Departure:** a smaller K caps the experts per token (a compute bound the
    reference does not have). In the hard phase and in "top1" evaluation the Routing has one
    slot, since only one can be filled.

    Noise: the Gumbel noise of each training forward is drawn from its own generator,
    seeded by (``noise_seed``, step, forward count within the step). ``noise_seed`` is a
    persistent buffer drawn from torch's global generator when the router is built, so
    checkpoints keep it. Hence the noise is a function of the model's state and the step:
    a resumed run draws what an uninterrupted one would, two copies of a model (one per
    dispatcher, say) route alike, and gradient accumulation's micro-batches still get
    different noise. Reading the seed at forward time would cost a host sync on
    accelerators, so a Python copy is kept and refreshed after ``load_state_dict``.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int | None = None,
        tau_max: float = 2.0,
        tau_min: float = 0.5,
        decay_steps: int = 5000,
        decay: str = "linear",
        tau: float | Mapping[str, Any] | Schedule | None = None,
        threshold: float = 1e-3,
        gumbel_weights: bool = False,
        hard_from: int | None = None,
        eval_mode: str = "top1",
        nan_policy: str = "raise",
    ):
        super().__init__(dim, num_experts, num_experts if top_k is None else top_k, nan_policy)
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {threshold}; EvoMoE uses 0.001")
        if hard_from is not None and (
            isinstance(hard_from, bool) or not isinstance(hard_from, int) or hard_from < 0
        ):
            raise ValueError(f"hard_from must be an int >= 0 or None (never), got {hard_from!r}")
        if eval_mode not in EVAL_MODES:
            raise ValueError(f"eval_mode must be one of {EVAL_MODES}, got {eval_mode!r}")
        self.schedule = _tau_schedule(tau, tau_max, tau_min, decay_steps, decay)
        self.threshold, self.gumbel_weights = float(threshold), bool(gumbel_weights)
        self.hard_from, self.eval_mode = hard_from, eval_mode
        self.step = 0
        self._calls = 0  # training forwards since the last set_step
        seed = int(torch.randint(0, 2**62, ()))
        self.register_buffer("noise_seed", torch.tensor(seed, dtype=torch.int64))
        self._seed = seed
        self.register_load_state_dict_post_hook(_refresh_seed)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, tau={self.schedule!r}, threshold={self.threshold}, "
            f"hard_from={self.hard_from}, step={self.step}"
        )

    def set_step(self, step: int) -> None:
        """Move to optimizer step ``step`` (steps taken so far); the trainer calls this."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        self.step, self._calls = step, 0

    @property
    def tau(self) -> float:
        """The temperature at the current step."""
        value = self.schedule(self.step)
        if not value > 0:
            raise ValueError(
                f"the tau schedule {self.schedule!r} gives tau={value} at step {self.step}; "
                "tau must stay > 0"
            )
        return value

    @property
    def hard(self) -> bool:
        """True once the gate has switched to hard top-1 (step >= hard_from)."""
        return self.hard_from is not None and self.step >= self.hard_from

    def route(self, logits: Tensor) -> Routing:
        probs = logits.softmax(dim=-1)
        if not self.training:
            return self._evaluate(logits, probs)
        tau = self.tau
        noisy = logits + self._gumbel(logits)
        sample = (noisy / tau).softmax(dim=-1)
        combine = sample if self.gumbel_weights else probs
        if self.hard:
            experts = noisy.argmax(dim=-1, keepdim=True)
            weights = combine.gather(1, experts)
        else:
            top, experts = top_k(sample, self.top_k)
            keep = top > self.threshold
            weights = torch.where(keep, combine.gather(1, experts), torch.zeros_like(top))
            experts = experts.masked_fill(~keep, EMPTY)
        aux = {"tau": torch.tensor(tau, device=logits.device)}
        return Routing(logits, probs, experts, weights, aux)

    def _gumbel(self, like: Tensor) -> Tensor:
        """Gumbel(0, 1) noise shaped like ``like``: -log(Exp(1)), seeded per forward."""
        seed = (self._seed * 1_000_003 + self.step) * 1_000_003 + self._calls
        self._calls += 1
        generator = torch.Generator(device=like.device).manual_seed(seed % 2**63)
        return -torch.empty_like(like).exponential_(generator=generator).log()

    def _evaluate(self, logits: Tensor, probs: Tensor) -> Routing:
        if self.eval_mode == "dense":
            ids = torch.arange(self.num_experts, device=logits.device)
            return Routing(logits, probs, ids.expand_as(logits).contiguous(), probs)
        experts = logits.argmax(dim=-1, keepdim=True)
        return Routing(logits, probs, experts, probs.gather(1, experts))


def _refresh_seed(module: DenseToSparseRouter, incompatible_keys) -> None:
    module._seed = int(module.noise_seed)


def _tau_schedule(tau, tau_max, tau_min, decay_steps, decay) -> Schedule:
    if tau is not None:
        schedule = build_schedule(tau)
    else:
        if not (tau_max > 0 and tau_min > 0):
            raise ValueError(f"tau_max and tau_min must be > 0, got {tau_max}, {tau_min}")
        if tau_min > tau_max:
            raise ValueError(
                f"tau_min={tau_min} exceeds tau_max={tau_max}; the gate goes from dense "
                "(high tau) to sparse (low tau), so use tau_min <= tau_max"
            )
        if isinstance(decay_steps, bool) or not isinstance(decay_steps, int) or decay_steps < 1:
            raise ValueError(f"decay_steps must be an int >= 1, got {decay_steps!r}")
        if decay not in DECAYS:
            raise ValueError(f"decay must be one of {tuple(DECAYS)}, got {decay!r}")
        schedule = DECAYS[decay](tau_max, tau_min, decay_steps)
    # The steps where the built-in kinds reach their extremes: start and (far) end.
    for step in (0, 2**62):
        if not schedule(step) > 0:
            raise ValueError(
                f"the tau schedule {schedule!r} gives tau={schedule(step)} at step {step}; "
                "tau must stay > 0"
            )
    return schedule
