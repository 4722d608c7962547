"""Skip routed experts whose globally-modulated score is small (MoDES).

Implements the training-free expert skipping of MoDES, "Accelerating Mixture-of-Experts
Multimodal Large Language Models via Dynamic Expert Skipping" (Huang et al., arXiv
2511.15690), over gatelab's access layer, so it works on gatelab models and on HF MoE models:

1. **Layer importance** (GMLG, offline): for each MoE layer l,
   ``alpha_l = mean_j KL(p_j || p_j^(l))`` where ``p_j`` is the model's next-token
   distribution at calibration token j and ``p_j^(l)`` the same with *all of layer l's
   routed experts skipped* (every slot emptied; a shared expert still runs, as in the
   paper, which skips routed experts only). Normalised: ``alpha~_l = alpha_l / sum alpha``.
2. **Globally-modulated score** (online): ``s_i = alpha~_l * pi_i`` for every selected slot
   i. By default (``score="topk"``) ``pi_i`` is the slot's **renormalised top-k weight**: the
   router's scores (``Routing.scores``: softmax for most routers, DeepSeek-V3's sigmoid) of
   the token's chosen experts divided by their sum, as the reference does (``ModelTC/MoDES``
   ``models/qwen3.py``: softmax, top-k, divide by the top-k sum, scatter, then scale by the
   layer importance). ``score="router"`` takes the router's full score of the expert
   instead (the softmax over all experts, not renormalised): the reading of the paper's
   "router probability" this module followed before (issue 15).
3. **Dual-modality thresholding** (DMT): a slot is skipped (emptied: no compute, weight 0)
   when ``s_i < tau_kind`` for its token's kind; one kind -> one threshold. The remaining
   weights are left as the router gave them (``renormalize=False``), which is what skipping
   an expert's computation means (the reference zeroes the skipped weights and leaves the
   rest); ``renormalize=True`` rescales them to the old sum. Threshold 0 skips nothing
   (``s >= 0``) and the Routing passes through untouched.
4. **Frontier search** for a target skip ratio rho: on a D x D grid of thresholds, walk the
   staircase where the skip ratio g crosses rho (both g and f = KL to the full model are
   non-decreasing in each threshold), then take the argmin of f on it: O(D) evaluations
   instead of D^2 (the reference's ``minimize_g_subject_to_f``). With one kind the frontier
   is one point: the smallest threshold reaching rho (bisection).

**The grid** (:func:`threshold_grid`), as the reference's ``grid_search_tau_ddp.py`` builds
it: D points x_j evenly spaced over [tau_min, tau_max], used as they are
(``mapping="linear"``) or mapped by tau = 2 / (1 + exp(-(x - 1) * c)) (``mapping="exp"``,
c = ``exp_coeff``), which packs the thresholds densely near 0, where most scores lie.
Defaults are the reference's: D = 100, ``mapping="exp"``, c = 10, tau_min = 0. Departure:
tau_max defaults to 1.0, which maps to tau = 1 and so covers every possible score
(s = alpha~ * pi <= 1); the reference's defaults (0.71 for text, 0.6 for vision tokens,
thresholds up to 0.104 and 0.037) are tuned to its VLMs' score ranges. ``mapping="quantile"``
(thresholds at quantiles of calibration scores, ``scores=`` required) is the grid this
module used before; it is kept as an option.

Departures: the paper's two kinds are text and vision tokens; here a token's kind is
whatever integer label the caller gives per token (:class:`SkipHandle.set_kinds`; the
experiment uses the prompt's domain, prose or code). The reference computes alpha per layer
*and per modality* (``get_layer_importance_ddp.py`` skips a layer's experts for one
modality's tokens at a time and normalises over layers within each modality); here alpha
is one value per layer, from skipping the layer for every token. The skip ratio is measured during the
edited forwards (slots emptied / slots the router chose), not predicted from the unedited
routing, since skipping in one layer changes the routing of later ones (the reference
counts during the edited forwards too). The reference's search minimises KL at
temperature 1 on answer tokens; here KL is over every token of the calibration windows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..inspect.access import EditHandle, capture_routing, edit_routing, find_moe_blocks
from ..inspect.prompts import forward_ids, prompt_batches
from ..routing import Routing

SCORES = ("topk", "router")
MAPPINGS = ("exp", "linear", "quantile")


def slot_pi(routing: Routing, score: str = "topk") -> Tensor:
    """pi per slot [T, K] float32: the renormalised top-k weight (``"topk"``, the
    reference's) or the router's own score of the slot's expert (``"router"``); 0 in empty
    slots."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    valid = routing.valid
    pi = routing.scores.gather(1, routing.experts.clamp_min(0)).to(torch.float32) * valid
    if score == "topk":
        pi = pi / pi.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return pi


def skip_all(routing: Routing) -> Routing:
    """The routing edit that skips every routed expert of a layer (all slots EMPTY)."""
    return routing.keep_slots(torch.zeros_like(routing.valid))


def _log_probs(model, batches: list[Tensor]) -> list[Tensor]:
    return [forward_ids(model, ids).logits.float().log_softmax(-1).cpu() for ids in batches]


def _kl(reference: list[Tensor], model, batches: list[Tensor]) -> tuple[float, float]:
    """(mean KL(reference || model) per token, mean next-token loss) over ``batches``."""
    kl_sum, loss_sum, tokens, targets = 0.0, 0.0, 0, 0
    for ref, ids in zip(reference, batches, strict=True):
        logp = forward_ids(model, ids).logits.float().log_softmax(-1).cpu()
        kl_sum += float(F.kl_div(logp, ref, log_target=True, reduction="sum"))
        tokens += ids.numel()
        if ids.shape[1] > 1:
            loss_sum += float(
                F.nll_loss(logp[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
            )
            targets += ids[:, 1:].numel()
    return kl_sum / tokens, loss_sum / max(targets, 1)


def layer_importance(model, prompts, normalize: bool = True) -> dict[int, float]:
    """MoDES's alpha per MoE layer: mean KL of the next-token distribution when the layer's
    routed experts are all skipped, on the calibration ``prompts`` (normalised to sum 1)."""
    blocks = find_moe_blocks(model)
    batches = prompt_batches(model, prompts, "calibration prompts")
    reference = _log_probs(model, batches)
    alpha = {}
    for block in blocks:
        with edit_routing(model, {block.layer: skip_all}):
            alpha[block.layer] = _kl(reference, model, batches)[0]
    if normalize:
        total = sum(alpha.values())
        if total <= 0:
            raise ValueError(
                "skipping any single layer changes nothing on these prompts (every KL is 0); "
                "give calibration prompts the experts act on"
            )
        alpha = {layer: a / total for layer, a in alpha.items()}
    return alpha


@dataclass
class SkipHandle:
    """The installed skip edits with their counters; ``remove()`` undoes them."""

    handle: EditHandle
    thresholds: Tensor
    kinds: Tensor | None = None
    skipped: int = 0
    chosen: int = 0
    per_layer: dict[int, list[int]] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """Skipped slots / slots the routers chose, since the last :meth:`reset`."""
        return self.skipped / self.chosen if self.chosen else 0.0

    def reset(self) -> None:
        self.skipped, self.chosen, self.per_layer = 0, 0, {}

    def set_kinds(self, kinds: Tensor | None) -> None:
        """Per-token kinds ([B, S] or [T] ints in 0..len(thresholds)-1) for the next
        forwards; None = every token is kind 0."""
        if kinds is not None:
            kinds = torch.as_tensor(kinds)
            if kinds.is_floating_point() or kinds.is_complex() or kinds.dtype == torch.bool:
                raise ValueError(f"kinds must be integer labels, got dtype {kinds.dtype}")
            kinds = kinds.reshape(-1).long()
            if kinds.numel() and (kinds.min() < 0 or kinds.max() >= len(self.thresholds)):
                raise ValueError(
                    f"kinds must lie in 0..{len(self.thresholds) - 1} (one per threshold), "
                    f"got values {sorted(set(kinds.tolist()))}"
                )
        self.kinds = kinds

    def remove(self) -> None:
        self.handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _skip_edit(state: SkipHandle, layer: int, importance: float, renormalize: bool, score: str):
    def edit(routing: Routing) -> Routing:
        valid = routing.valid
        pi = slot_pi(routing, score)
        tau = state.thresholds.to(pi.device)
        if state.kinds is None:
            limit = tau[0].expand(routing.num_tokens)
        elif state.kinds.numel() != routing.num_tokens:
            raise ValueError(
                f"set_kinds gave {state.kinds.numel()} token kinds but layer {layer} routes "
                f"{routing.num_tokens} tokens; give one kind per token of the batch"
            )
        else:
            limit = tau[state.kinds.to(pi.device)]
        skip = valid & (importance * pi < limit[:, None])
        n_skip, n_valid = int(skip.sum()), int(valid.sum())
        state.skipped += n_skip
        state.chosen += n_valid
        counts = state.per_layer.setdefault(layer, [0, 0])
        counts[0], counts[1] = counts[0] + n_skip, counts[1] + n_valid
        if n_skip == 0:
            return routing  # threshold 0 (or nothing under it): untouched
        return routing.keep_slots(~skip, renormalize=renormalize)

    return edit


def skip_experts(
    model,
    importance: Mapping[int, float],
    thresholds: float | Sequence[float],
    renormalize: bool = False,
    score: str = "topk",
) -> SkipHandle:
    """Skip every routed slot whose score ``importance[layer] * pi`` is under the threshold
    of its token's kind (one threshold, or one per kind with :meth:`SkipHandle.set_kinds`);
    ``pi`` as :func:`slot_pi` computes it for ``score``.

    Returns a :class:`SkipHandle` counting skipped and chosen slots.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    tau = torch.as_tensor(thresholds, dtype=torch.float32).reshape(-1)
    if tau.numel() == 0 or bool((tau < 0).any()) or not bool(torch.isfinite(tau).all()):
        raise ValueError(f"thresholds must be one or more finite values >= 0, got {tau.tolist()}")
    blocks = find_moe_blocks(model)
    missing = [b.layer for b in blocks if b.layer not in importance]
    if missing:
        raise ValueError(
            f"importance has no value for MoE layers {missing}; compute it with "
            "layer_importance(model, prompts)"
        )
    bad = {b.layer: importance[b.layer] for b in blocks if not float(importance[b.layer]) >= 0}
    if bad or any(math.isinf(float(importance[b.layer])) for b in blocks):
        raise ValueError(  # a NaN alpha would never skip and a negative one always, silently
            f"importance must be finite and >= 0 for every MoE layer, got {bad or dict(importance)}"
        )
    state = SkipHandle(handle=None, thresholds=tau)  # type: ignore[arg-type]
    edits = {
        b.layer: _skip_edit(state, b.layer, float(importance[b.layer]), renormalize, score)
        for b in blocks
    }
    state.handle = edit_routing(model, edits)
    return state


def slot_scores(
    model, prompts, importance: Mapping[int, float], kinds=None, score: str = "topk"
) -> list[Tensor]:
    """The calibration scores s = alpha~ * pi of every chosen slot, one tensor per kind."""
    batches = prompt_batches(model, prompts, "calibration prompts")
    kind_list = _kind_batches(batches, kinds)
    per_kind: dict[int, list[Tensor]] = {}
    for ids, kind in zip(batches, kind_list, strict=True):
        with capture_routing(model, to_cpu=True) as cap:
            forward_ids(model, ids)
        flat = kind.reshape(-1)
        for layer in cap.layers:
            r = cap.routing(layer)
            s = float(importance[layer]) * slot_pi(r, score)
            for k in flat.unique().tolist():
                chosen = r.valid & (flat == k)[:, None]
                per_kind.setdefault(int(k), []).append(s[chosen])
    return [torch.cat(per_kind[k]) for k in sorted(per_kind)]


def _kind_batches(batches: list[Tensor], kinds) -> list[Tensor]:
    if kinds is None:
        return [torch.zeros_like(b) for b in batches]
    kinds = [kinds] if isinstance(kinds, Tensor) else list(kinds)
    if len(kinds) != len(batches):
        raise ValueError(f"kinds has {len(kinds)} entries for {len(batches)} prompt batches")
    out = []
    for k, b in zip(kinds, batches, strict=True):
        k = torch.as_tensor(k).long()
        if k.dim() == 0:  # one kind for the whole batch
            k = k.expand(b.shape)
        elif k.dim() == 1 and k.shape[0] == b.shape[0]:  # one kind per prompt
            k = k[:, None].expand(b.shape)
        if tuple(k.shape) != tuple(b.shape):
            raise ValueError(
                f"kinds must give one kind per batch, per prompt or per token: batch shape "
                f"{tuple(b.shape)}, got kinds of shape {tuple(k.shape)}"
            )
        out.append(k)
    return out


@dataclass
class SkipPoint:
    thresholds: list[float]
    ratio: float
    kl: float
    loss: float


class SkipEvaluator:
    """Evaluates (skip ratio, KL to the full model, loss) at given thresholds on a fixed
    calibration set; caches every point it evaluated."""

    def __init__(
        self,
        model,
        prompts,
        importance: Mapping[int, float],
        kinds=None,
        renormalize: bool = False,
        score: str = "topk",
    ):
        self.model, self.importance, self.renormalize = model, dict(importance), renormalize
        self.score = score
        self.batches = prompt_batches(model, prompts, "calibration prompts")
        self.kinds = _kind_batches(self.batches, kinds)
        self.reference = _log_probs(model, self.batches)
        self.points: dict[tuple[float, ...], SkipPoint] = {}

    def __call__(self, thresholds: Sequence[float]) -> SkipPoint:
        key = tuple(float(t) for t in thresholds)
        if key not in self.points:
            handle = skip_experts(self.model, self.importance, key, self.renormalize, self.score)
            kl_sum = loss_sum = 0.0
            try:
                for ids, kind, ref in zip(self.batches, self.kinds, self.reference, strict=True):
                    handle.set_kinds(kind if len(key) > 1 else None)
                    kl, loss = _kl([ref], self.model, [ids])
                    kl_sum, loss_sum = kl_sum + kl * ids.numel(), loss_sum + loss * ids.numel()
            finally:
                handle.remove()
            n = sum(b.numel() for b in self.batches)
            self.points[key] = SkipPoint(list(key), handle.ratio, kl_sum / n, loss_sum / n)
        return self.points[key]


def threshold_grid(
    scores: Tensor | None = None,
    size: int = 100,
    tau_min: float = 0.0,
    tau_max: float = 1.0,
    mapping: str = "exp",
    exp_coeff: float = 10.0,
) -> list[float]:
    """``size`` increasing thresholds (see the module doc): x evenly spaced over
    [tau_min, tau_max], used as they are (``"linear"``) or mapped by
    2 / (1 + exp(-(x - 1) * exp_coeff)) (``"exp"``, the reference's default); or, with
    ``"quantile"``, 0, the quantiles of the calibration ``scores`` and just above the
    largest. ``scores`` is read by ``"quantile"`` only (the reference's grids do not depend
    on the scores)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 2:
        raise ValueError(f"grid size must be an int >= 2, got {size!r}")
    if mapping not in MAPPINGS:
        raise ValueError(f"mapping must be one of {MAPPINGS}, got {mapping!r}")
    if mapping == "quantile":
        if scores is None or scores.numel() == 0:
            raise ValueError("mapping='quantile' needs the calibration scores (scores=...)")
        if not bool(torch.isfinite(scores).all()):
            raise ValueError("scores for mapping='quantile' must be finite")
        q = torch.quantile(scores.double(), torch.linspace(0, 1, size - 1, dtype=torch.float64))
        top = float(scores.max()) * (1 + 1e-6) + 1e-12
        return [0.0] + [float(v) for v in q[1:]] + [top]
    bounds = (tau_min, tau_max, exp_coeff)
    if not all(math.isfinite(v) for v in bounds) or not 0.0 <= tau_min < tau_max:
        raise ValueError(
            f"need finite 0 <= tau_min < tau_max (and a finite exp_coeff), got {bounds}"
        )
    xs = [tau_min + (tau_max - tau_min) * j / (size - 1) for j in range(size)]
    if mapping == "linear":
        return xs
    if exp_coeff <= 0:
        raise ValueError(f"exp_coeff must be > 0 (the grid must increase), got {exp_coeff}")
    return [2.0 / (1.0 + math.exp(-(x - 1.0) * exp_coeff)) for x in xs]


def search_thresholds(
    evaluate: SkipEvaluator, grids: Sequence[Sequence[float]], target: float
) -> tuple[SkipPoint | None, list[SkipPoint]]:
    """MoDES's frontier search for skip ratio >= ``target``; returns (best point or None if
    even the largest thresholds skip less, the frontier points evaluated)."""
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target skip ratio must lie in [0, 1], got {target}")
    if len(grids) == 1:
        grid = grids[0]
        lo, hi = 0, len(grid) - 1
        if evaluate([grid[hi]]).ratio < target:
            return None, [evaluate([grid[hi]])]
        while lo < hi:  # smallest index with ratio >= target (g is non-decreasing)
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if evaluate([grid[mid]]).ratio < target else (lo, mid)
        point = evaluate([grid[lo]])
        return point, [point]
    if len(grids) != 2:
        raise ValueError(f"the frontier search takes one or two threshold grids, got {len(grids)}")
    first, second = grids
    frontier, p = [], len(second) - 1
    for q in range(len(first)):
        while p >= 0 and evaluate([first[q], second[p]]).ratio >= target:
            p -= 1
        if p + 1 < len(second):
            frontier.append(evaluate([first[q], second[p + 1]]))
        if p < 0:  # every further q reaches the target at p = 0 with a larger KL
            break
    best = min(frontier, key=lambda point: point.kl) if frontier else None
    return best, frontier


__all__ = [
    "MAPPINGS",
    "SCORES",
    "SkipEvaluator",
    "SkipHandle",
    "SkipPoint",
    "layer_importance",
    "search_thresholds",
    "skip_all",
    "skip_experts",
    "slot_pi",
    "slot_scores",
    "threshold_grid",
]
