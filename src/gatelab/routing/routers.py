"""Routers: small nn.Modules that map tokens [T, D] to a `Routing`.

Every router is registered by name in ``ROUTERS`` so a recipe can say ``router = "sigmoid"``
and shares one constructor vocabulary: ``dim``, ``num_experts``, ``top_k``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import Registry
from .routing import EMPTY, Routing, _compiling

ROUTERS: Registry[type[Router]] = Registry("router")

NAN_POLICIES = ("raise", "ignore")


class Router(nn.Module):
    """Base class: validates the shared arguments and owns the [E, D] router weight.

    A router is two steps, kept apart so that tools can act between them:

    - ``compute_logits(x) -> Tensor``: x [T, D] -> logits [T, E] float32, exactly what the
      Routing's ``logits`` hold (the linear map by default; input noise, biases inside the
      softmax and temperatures belong here);
    - ``route(logits, **context) -> Routing``: the selection rule on those logits (softmax,
      top-k, thresholds, group limits, selection biases); it may update the router's
      running statistics in training, as the forward does.

    ``forward(x, token_ids=None, positions=None)`` is ``route(compute_logits(x))``. A rule
    that needs more than the logits takes it as keyword context, which its ``forward``
    passes: ``token_ids`` / ``positions`` (:class:`HashRouter`), ``dtype`` (the weights'
    dtype of :class:`~gatelab.routing.uoe.AllExpertsRouter`), ``z`` (the standardised
    means of :class:`~gatelab.routing.sparsity_aware.SparsityAwareRouter`).

    ``route_restricted(logits, allowed)`` is the rule with the experts outside ``allowed``
    [E] bool out of reach: the seam model edits use (``gatelab.edit.restrict_experts``), so
    an edit never reassigns anything on the module.

    ``uses_positions``: whether ``forward`` reads ``positions``; the MoE layer builds the
    [T] positions only for a router that does (a module without the attribute gets them).
    """

    uses_positions = False

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        nan_policy: str = "raise",
        learned: bool = True,
    ):
        super().__init__()
        _check_sizes(dim, num_experts, top_k)
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
        self.dim, self.num_experts, self.top_k = dim, num_experts, top_k
        self.nan_policy = nan_policy
        if learned:
            # HF layout: a bare [E, D] parameter, no bias (nn.Linear's default init).
            self.weight = nn.Parameter(torch.empty(num_experts, dim))
            bound = 1.0 / math.sqrt(dim)
            nn.init.uniform_(self.weight, -bound, bound)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, top_k={self.top_k}"

    def forward(self, x: Tensor, token_ids=None, positions=None) -> Routing:
        return self.route(self.compute_logits(x))

    def compute_logits(self, x: Tensor) -> Tensor:
        """[T, E] float32 logits (W x by default)."""
        return self.linear_logits(x)

    def route(self, logits: Tensor, **context) -> Routing:
        """The selection rule on logits [T, E]; every concrete router defines it."""
        raise NotImplementedError(f"{type(self).__name__} does not define route(logits)")

    def route_restricted(self, logits: Tensor, allowed: Tensor) -> Routing:
        """``route`` with the experts outside ``allowed`` [E] bool at -inf logits.

        Routers whose selection also reads a per-expert bias (:class:`SigmoidRouter`)
        override this to put the bias of those experts out of reach too.
        """
        return self.route(logits.masked_fill(~allowed, float("-inf")))

    def linear_logits(self, x: Tensor) -> Tensor:
        """W x as [T, E] float32, checked for NaN; the matmul runs in the weight's dtype."""
        logits = F.linear(x.to(self.weight.dtype), self.weight).float()
        self._check_logits(logits)
        return logits

    def _check_logits(self, logits: Tensor) -> None:
        self._check_finite(logits, "produced NaN or inf logits")

    def _check_finite(self, t: Tensor, what: str) -> None:
        """Under nan_policy "raise": FloatingPointError on CPU, a device-side assert elsewhere."""
        if self.nan_policy != "raise" or _compiling() or not t.numel():
            return
        message = (
            f"{type(self).__name__} {what}; check the layer input "
            "(and the learning rate), or pass nan_policy='ignore' to route them anyway"
        )
        if t.device.type != "cpu":
            torch._assert_async(torch.isfinite(t).all(), message)  # no host sync
        # A NaN or inf anywhere makes the sum non-finite; only then (or where finite
        # values overflow the sum) the exact check runs. isfinite(t).all() alone cost
        # 0.3-0.4 ms on [4096, 64] logits, the sum 0.02 ms.
        elif not math.isfinite(t.sum().item()) and not bool(torch.isfinite(t).all()):
            raise FloatingPointError(message)


def _check_sizes(dim: int, num_experts: int, top_k: int) -> None:
    for name, value in (("dim", dim), ("num_experts", num_experts), ("top_k", top_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if top_k > num_experts:
        raise ValueError(
            f"top_k={top_k} exceeds num_experts={num_experts}; use top_k <= num_experts"
        )


def top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, indices) [T, k] of each row's k largest ``scores`` [T, E], largest first:
    how every router here picks a token's experts.

    k = 1 takes ``torch.max``, which returns the first of tied maxima and runs a plain
    reduction: at [4096, 16] on 2 CPU threads 0.04 ms against 0.3 for ``torch.topk``,
    whose pick among ties is unspecified (on CPU it chose expert 10 of 16 on a row of
    equal scores). NaN counts as the largest score in both.
    """
    if k == 1:
        return scores.max(dim=-1, keepdim=True)
    return scores.topk(k, dim=-1)


def _normalize(weights: Tensor) -> Tensor:
    return weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)


@ROUTERS.register("topk")
class TopKRouter(Router):
    """Softmax over all experts, then the k best (Switch, GShard, Mixtral, Qwen, OLMoE).

    Args:
        normalize: divide the k weights by their sum (Mixtral and Qwen3 always do, Qwen2-MoE
            and OLMoE when ``norm_topk_prob``). Off by default: with k = 1 it would make every
            weight 1 and cut the router's gradient.
        jitter: multiplicative input noise U(1 - jitter, 1 + jitter) in training (Switch
            Transformer). Unlike Mixtral, which also jitters the experts' input, only the
            router sees the noise here.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 2,
        normalize: bool = False,
        jitter: float = 0.0,
        nan_policy: str = "raise",
    ):
        super().__init__(dim, num_experts, top_k, nan_policy)
        if jitter < 0:
            raise ValueError(f"jitter must be >= 0, got {jitter}")
        self.normalize, self.jitter = normalize, jitter

    def compute_logits(self, x: Tensor) -> Tensor:
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        return self.linear_logits(x)

    def route(self, logits: Tensor) -> Routing:
        scores = logits.softmax(dim=-1)
        weights, experts = top_k(scores, self.top_k)
        if self.normalize:
            weights = _normalize(weights)
        return Routing(logits, scores, experts, weights)


@ROUTERS.register("topk_softmax")
class TopKSoftmaxRouter(Router):
    """Softmax over the top-K logits only; every other expert gets exactly 0.

    "Statistical Perspective of Top-K Sparse Softmax Gating Mixture of Experts"
    (Nguyen, Akbarian, Yan, Ho; arXiv 2309.13850): Softmax(TopK(W x, K; b)), where the
    per-expert offset b is added before the ranking. FastMoE's ``NaiveGate`` is this gate
    with ``bias=False``. ``scores`` holds softmax(W x + b) over all experts, the
    probabilities the ranking follows, so the balance losses apply unchanged.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 2,
        bias: bool = True,
        nan_policy: str = "raise",
    ):
        super().__init__(dim, num_experts, top_k, nan_policy)
        self.bias = nn.Parameter(torch.zeros(num_experts)) if bias else None

    def route(self, logits: Tensor) -> Routing:
        shifted = logits if self.bias is None else logits + self.bias.float()
        top, experts = top_k(shifted, self.top_k)
        return Routing(logits, shifted.softmax(dim=-1), experts, top.softmax(dim=-1))


@ROUTERS.register("sigmoid")
class SigmoidRouter(Router):
    """DeepSeek-V3 routing: sigmoid scores, a selection-only bias, group-limited top-k.

    "DeepSeek-V3 Technical Report" (arXiv 2412.19437), matching HF's
    ``DeepseekV3TopkRouter``: experts are split into ``n_group`` groups, each group is
    scored by the sum of its two best biased scores, the ``topk_group`` best groups stay
    eligible, and the k best biased scores among them are chosen. The combine weights are
    the unbiased sigmoid scores, optionally normalised, times ``routed_scaling_factor``.

    ``expert_bias`` (HF: ``e_score_correction_bias``) is a buffer. With
    ``bias_update_rate > 0`` the router counts the tokens each expert receives in training,
    and :func:`gatelab.routing.update_expert_bias` (run from an optimizer hook, outside
    forward) moves the bias by the sign rule: overloaded experts down, idle ones up.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 2,
        n_group: int = 1,
        topk_group: int = 1,
        normalize: bool = True,
        routed_scaling_factor: float = 1.0,
        bias_update_rate: float = 0.0,
        nan_policy: str = "raise",
    ):
        super().__init__(dim, num_experts, top_k, nan_policy)
        _check_groups(num_experts, top_k, n_group, topk_group)
        if bias_update_rate < 0:
            raise ValueError(f"bias_update_rate must be >= 0, got {bias_update_rate}")
        self.n_group, self.topk_group = n_group, topk_group
        self.normalize, self.routed_scaling_factor = normalize, routed_scaling_factor
        self.bias_update_rate = bias_update_rate
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        self.register_buffer("tokens_seen", torch.zeros(num_experts), persistent=False)

    def route(self, logits: Tensor) -> Routing:
        return self._select(logits, self.expert_bias)

    def route_restricted(self, logits: Tensor, allowed: Tensor) -> Routing:
        """The rule with the experts outside ``allowed`` out of reach: their logits and
        their selection bias at -inf (``aux["expert_bias"]`` holds the masked bias)."""
        hidden = float("-inf")
        return self._select(
            logits.masked_fill(~allowed, hidden), self.expert_bias.masked_fill(~allowed, hidden)
        )

    def _select(self, logits: Tensor, expert_bias: Tensor) -> Routing:
        scores = logits.sigmoid()
        biased = scores + expert_bias.float()
        if self.n_group > 1:
            biased = self._mask_groups(biased)
        experts = top_k(biased, self.top_k)[1]
        weights = scores.gather(1, experts)
        if self.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.routed_scaling_factor
        if self.training and self.bias_update_rate > 0:
            with torch.no_grad():
                self.tokens_seen += torch.bincount(experts.reshape(-1), minlength=self.num_experts)
        return Routing(logits, scores, experts, weights, {"expert_bias": expert_bias})

    def _mask_groups(self, biased: Tensor) -> Tensor:
        grouped = biased.view(-1, self.n_group, self.num_experts // self.n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        best = group_scores.topk(self.topk_group, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        keep = keep.unsqueeze(-1).expand_as(grouped).reshape_as(biased)
        return biased.masked_fill(~keep, float("-inf"))

    @torch.no_grad()
    def update_bias(self) -> None:
        """The aux-loss-free sign rule; call outside forward, once per optimizer step."""
        if self.bias_update_rate == 0 or self.tokens_seen.sum() == 0:
            return
        load = self.tokens_seen
        delta = self.bias_update_rate * torch.sign(load.mean() - load)
        # Centre the step so the biases do not drift together (torchtitan does the same).
        self.expert_bias += delta - delta.mean()
        self.tokens_seen.zero_()


def _check_groups(num_experts: int, top_k: int, n_group: int, topk_group: int) -> None:
    if n_group < 1 or num_experts % n_group:
        raise ValueError(f"n_group={n_group} must divide num_experts={num_experts}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group={topk_group} must lie in 1..n_group={n_group}")
    per_group = num_experts // n_group
    if n_group > 1 and per_group < 2:
        raise ValueError("group-limited routing needs at least 2 experts per group")
    if n_group > 1 and top_k > topk_group * per_group:
        raise ValueError(
            f"top_k={top_k} exceeds the {topk_group * per_group} experts in the "
            f"topk_group={topk_group} groups kept; raise topk_group or lower top_k"
        )


@ROUTERS.register("expert_choice")
class ExpertChoiceRouter(Router):
    """Each expert takes its top-C tokens, so a token gets 0..E experts.

    "Mixture-of-Experts with Expert Choice Routing" (Zhou et al., arXiv 2202.09368):
    S = softmax(W x) over experts, each expert keeps the C tokens with the highest S[:, e],
    and the combine weight is that S. C = ceil(T * top_k * capacity_factor / E), capped at T,
    so ``top_k`` is the average number of experts per token (the paper's c). The Routing has
    E slots per token (slot e holds expert e or EMPTY), the bound the contract allows.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 2,
        capacity_factor: float = 1.0,
        nan_policy: str = "raise",
    ):
        super().__init__(dim, num_experts, top_k, nan_policy)
        if not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
        self.capacity_factor = capacity_factor

    def capacity(self, num_tokens: int) -> int:
        wanted = math.ceil(num_tokens * self.top_k * self.capacity_factor / self.num_experts)
        return min(num_tokens, wanted)

    def route(self, logits: Tensor) -> Routing:
        scores = logits.softmax(dim=-1)
        capacity = self.capacity(scores.shape[0])
        chosen = scores.topk(capacity, dim=0).indices  # [C, E] token ids per expert
        taken = torch.zeros_like(scores, dtype=torch.bool)
        taken.scatter_(0, chosen, True)
        ids = torch.arange(self.num_experts, device=logits.device).expand_as(scores)
        experts = torch.where(taken, ids, torch.full_like(ids, EMPTY))
        weights = torch.where(taken, scores, torch.zeros_like(scores))
        aux = {"capacity": torch.tensor(capacity)}
        return Routing(logits, scores, experts, weights, aux)


@ROUTERS.register("hash")
class HashRouter(Router):
    """A fixed hash of the token id or of the position picks the experts (a baseline).

    "Hash Layers For Large Sparse Models" (Roller et al., arXiv 2106.04426). The paper
    uses a random fixed table over the vocabulary; here a multiplicative integer hash needs
    no vocabulary size. With k > 1 the experts are h, h+1, ..., h+k-1 (mod E), each with
    weight 1/k. There is nothing to learn: logits are zeros and scores uniform.
    """

    uses_positions = True

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 1,
        key: str = "token",
        nan_policy: str = "raise",
    ):
        super().__init__(dim, num_experts, top_k, nan_policy, learned=False)
        if key not in ("token", "position"):
            raise ValueError(f"key must be 'token' or 'position', got {key!r}")
        self.key = key

    def forward(self, x: Tensor, token_ids=None, positions=None) -> Routing:
        return self.route(self.compute_logits(x), token_ids=token_ids, positions=positions)

    def compute_logits(self, x: Tensor) -> Tensor:
        """Zeros [T, E]: a hash has no preference among experts. The input is still checked
        for NaN/inf under nan_policy "raise", as every learned router checks its logits."""
        self._check_finite(x, "got a NaN or inf input")
        return x.new_zeros(x.shape[0], self.num_experts, dtype=torch.float32)

    def route(self, logits: Tensor, token_ids=None, positions=None) -> Routing:
        """The experts of each token's hash; needs ``token_ids`` (key "token") and reads
        ``positions`` (key "position", 0..T-1 when not given)."""
        num_tokens, device = logits.shape[0], logits.device
        if self.key == "token":
            if token_ids is None:
                raise ValueError(
                    "HashRouter(key='token') needs token_ids: pass token_ids= to the MoE "
                    "forward, or use key='position'"
                )
            keys = token_ids
        else:
            keys = positions if positions is not None else torch.arange(num_tokens, device=device)
        if not isinstance(keys, Tensor) or keys.is_floating_point() or keys.dtype == torch.bool:
            raise ValueError(
                f"HashRouter(key={self.key!r}) needs integer token ids / positions, got "
                f"{getattr(keys, 'dtype', type(keys).__name__)}; pass a long tensor"
            )
        keys = keys.reshape(-1).long()
        if keys.shape[0] != num_tokens:
            raise ValueError(f"got {keys.shape[0]} token ids / positions for {num_tokens} tokens")
        first = hash_ids(keys) % self.num_experts
        offsets = torch.arange(self.top_k, device=device)
        experts = (first.unsqueeze(1) + offsets) % self.num_experts
        weights = torch.full(experts.shape, 1.0 / self.top_k, device=device)
        return Routing(logits, logits.softmax(dim=-1), experts, weights)


def hash_ids(keys: Tensor) -> Tensor:
    """A fixed 32-bit mixing hash of int64 keys (two multiply-xorshift rounds)."""
    h = keys & 0xFFFFFFFF
    for _ in range(2):
        h = ((h >> 16) ^ h) * 0x45D9F3B & 0xFFFFFFFF
    return (h >> 16) ^ h
