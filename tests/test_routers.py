"""Each router against a hand-computed case.

Routers get D = E and an identity weight (``identity_router``), so the input rows are the
logits and every expected value below follows from them by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import identity_router

from gatelab import MoE
from gatelab.routing import (
    EMPTY,
    ROUTERS,
    ExpertChoiceRouter,
    HashRouter,
    SigmoidRouter,
    TopKRouter,
    TopKSoftmaxRouter,
    attach_bias_update,
    update_expert_bias,
)
from gatelab.routing.routers import top_k


def softmax(row):
    exps = [math.exp(v) for v in row]
    return [v / sum(exps) for v in exps]


def sigmoid(v):
    return 1 / (1 + math.exp(-v))


def test_registry_names():
    # Other modules register more routers (routing/temperature.py, ...); these must stay.
    core = {"expert_choice", "hash", "sigmoid", "topk", "topk_softmax"}
    assert core <= set(ROUTERS.names())


# -- topk -------------------------------------------------------------------------------

LOGITS = [[1.0, 2.0, 3.0, 0.0], [0.0, -1.0, 5.0, 1.0], [0.5, 0.7, -2.0, 2.5]]


@pytest.mark.parametrize("normalize", [False, True])
def test_topk(normalize):
    router = identity_router(TopKRouter(4, 4, top_k=2, normalize=normalize))
    r = router(torch.tensor(LOGITS))
    assert r.experts.tolist() == [[2, 1], [2, 3], [3, 1]]
    for t, row in enumerate(LOGITS):
        probs = softmax(row)
        chosen = [probs[e] for e in r.experts[t].tolist()]
        if normalize:
            chosen = [p / sum(chosen) for p in chosen]
        assert r.weights[t].tolist() == pytest.approx(chosen, rel=1e-6)
        assert r.scores[t].tolist() == pytest.approx(probs, rel=1e-6)
    torch.testing.assert_close(r.logits, torch.tensor(LOGITS))


def test_topk_k1_normalized_weight_is_one():
    r = identity_router(TopKRouter(4, 4, top_k=1, normalize=True))(torch.tensor(LOGITS))
    assert r.experts[:, 0].tolist() == [2, 2, 3]
    assert r.weights.tolist() == [[1.0], [1.0], [1.0]]


def test_top_k_of_one_is_topk_with_ties_to_the_first_expert():
    """k = 1 takes torch.max: topk's values, indices and gradient where no scores tie,
    the first of tied experts where they do, and NaN as the largest score."""
    scores = torch.randn(64, 16, dtype=torch.float64, requires_grad=True)
    values, experts = top_k(scores, 1)
    want = scores.topk(1, dim=-1)
    assert torch.equal(experts, want.indices) and torch.equal(values, want.values)
    g = torch.randn(64, 1, dtype=torch.float64)
    (got,) = torch.autograd.grad(values, scores, g)
    (ref,) = torch.autograd.grad(want.values, scores, g)
    assert torch.equal(got, ref)
    assert top_k(torch.zeros(1, 16), 1)[1].tolist() == [[0]]
    assert top_k(torch.tensor([[1.0, 3.0, 3.0, 2.0]]), 1)[1].tolist() == [[1]]
    nan = float("nan")
    assert top_k(torch.tensor([[1.0, nan, 3.0, nan]]), 1)[1].tolist() == [[1]]
    two = top_k(torch.tensor(LOGITS), 2)
    assert torch.equal(two.indices, torch.tensor(LOGITS).topk(2, dim=-1).indices)


def test_topk_jitter_only_in_training():
    x = torch.tensor(LOGITS)
    plain = identity_router(TopKRouter(4, 4, top_k=2))(x)
    router = identity_router(TopKRouter(4, 4, top_k=2, jitter=0.1))
    router.eval()
    r = router(x)
    assert torch.equal(r.logits, plain.logits) and torch.equal(r.weights, plain.weights)
    router.train()
    noisy = [router(x).logits for _ in range(3)]
    assert not torch.equal(noisy[0], plain.logits)
    assert not torch.equal(noisy[0], noisy[1])
    for logits in noisy:
        nonzero = x != 0
        ratio = logits[nonzero] / x[nonzero]
        assert bool(((ratio >= 0.9 - 1e-6) & (ratio <= 1.1 + 1e-6)).all())
        assert (logits[~nonzero] == 0).all()


def test_topk_without_jitter_is_deterministic_in_training():
    router = identity_router(TopKRouter(4, 4, top_k=2)).train()
    x = torch.tensor(LOGITS)
    assert torch.equal(router(x).weights, router(x).weights)


# -- topk_softmax ---------------------------------------------------------------------------


def test_topk_softmax_without_bias():
    router = identity_router(TopKSoftmaxRouter(4, 4, top_k=2, bias=False))
    r = router(torch.tensor(LOGITS))
    assert r.experts[:2].tolist() == [[2, 1], [2, 3]]
    for t, row in enumerate(LOGITS):
        chosen = r.experts[t].tolist()
        assert r.weights[t].tolist() == pytest.approx(softmax([row[e] for e in chosen]), rel=1e-6)
        dense = r.dense_weights()[t]
        for e in range(4):
            if e not in chosen:
                assert dense[e].item() == 0.0  # exactly zero, not just small
        assert r.scores[t].tolist() == pytest.approx(softmax(row), rel=1e-6)


def test_topk_softmax_bias_moves_selection_and_weights():
    router = identity_router(TopKSoftmaxRouter(4, 4, top_k=2, bias=True))
    with torch.no_grad():
        router.bias.copy_(torch.tensor([3.0, 0.0, 0.0, 0.0]))
    row = [1.0, 2.0, 3.0, 0.0]  # shifted: [4, 2, 3, 0] -> experts 0 and 2
    r = router(torch.tensor([row]))
    assert r.experts.tolist() == [[0, 2]]
    assert r.weights[0].tolist() == pytest.approx(softmax([4.0, 3.0]), rel=1e-6)
    torch.testing.assert_close(r.logits, torch.tensor([row]))  # logits stay raw


def test_topk_softmax_bias_is_trained():
    router = identity_router(TopKSoftmaxRouter(4, 4, top_k=2))
    r = router(torch.tensor(LOGITS))
    (r.weights * torch.tensor([1.0, 0.0])).sum().backward()
    assert router.bias.grad is not None and router.bias.grad.abs().sum() > 0


# -- sigmoid (DeepSeek-V3) -------------------------------------------------------------------


def test_sigmoid_plain():
    router = identity_router(SigmoidRouter(4, 4, top_k=2, normalize=False))
    r = router(torch.tensor(LOGITS))
    for t, row in enumerate(LOGITS):
        want = sorted(range(4), key=lambda e, row=row: -row[e])[:2]
        assert r.experts[t].tolist() == want
        assert r.weights[t].tolist() == pytest.approx([sigmoid(row[e]) for e in want], rel=1e-6)
        assert r.scores[t].tolist() == pytest.approx([sigmoid(v) for v in row], rel=1e-6)


def test_sigmoid_normalize_and_scaling():
    router = identity_router(
        SigmoidRouter(4, 4, top_k=2, normalize=True, routed_scaling_factor=2.5)
    )
    row = LOGITS[0]
    r = router(torch.tensor([row]))
    s = [sigmoid(row[2]), sigmoid(row[1])]
    assert r.experts.tolist() == [[2, 1]]
    assert r.weights[0].tolist() == pytest.approx([2.5 * v / sum(s) for v in s], rel=1e-6)


def test_sigmoid_bias_changes_selection_only():
    router = identity_router(SigmoidRouter(4, 4, top_k=2, normalize=False))
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.9]))
    row = [1.0, 2.0, 3.0, 0.0]
    # biased: sigmoid(row) + bias = [0.731, 0.881, 0.953, 1.4] -> experts 3 and 2
    r = router(torch.tensor([row]))
    assert r.experts.tolist() == [[3, 2]]
    # ...but the weights are the unbiased scores
    assert r.weights[0].tolist() == pytest.approx([sigmoid(0.0), sigmoid(3.0)], rel=1e-6)
    assert r.scores[0].tolist() == pytest.approx([sigmoid(v) for v in row], rel=1e-6)
    assert torch.equal(r.aux["expert_bias"], router.expert_bias)


def test_sigmoid_group_limited_selection():
    # 8 experts in 4 groups of 2; keep the best 2 groups; choose 2 experts among them.
    row = [5.0, -5.0, 1.0, 0.8, 0.6, 0.5, -1.0, -1.2]
    s = [sigmoid(v) for v in row]
    # group score = sum of the group's two best: g0 = 1.000, g1 = 1.421, g2 = 1.268, g3 = 0.500
    assert s[2] + s[3] > s[4] + s[5] > s[0] + s[1] > s[6] + s[7]
    router = identity_router(SigmoidRouter(8, 8, top_k=2, n_group=4, topk_group=2))
    r = router(torch.tensor([row]))
    assert r.experts.tolist() == [[2, 3]]  # expert 0 has the best score but its group lost
    assert r.weights[0].tolist() == pytest.approx([s[2] / (s[2] + s[3]), s[3] / (s[2] + s[3])])
    # Without the group limit, expert 0 wins.
    flat = identity_router(SigmoidRouter(8, 8, top_k=2))(torch.tensor([row]))
    assert flat.experts.tolist() == [[0, 2]]
    # topk_group=3 lets group 0 back in, and the k best of groups 0, 1, 2 are 0 and 2.
    wide = identity_router(SigmoidRouter(8, 8, top_k=2, n_group=4, topk_group=3))
    assert wide(torch.tensor([row])).experts.tolist() == [[0, 2]]


def test_sigmoid_groups_are_ranked_with_the_bias():
    row = [5.0, -5.0, 1.0, 0.8, 0.6, 0.5, -1.0, -1.2]
    router = identity_router(SigmoidRouter(8, 8, top_k=2, n_group=4, topk_group=1))
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([0, 0, 0, 0, 0, 0, 1.0, 1.0]))
    # biased group 3 = 2 + s(-1) + s(-1.2) = 2.5 beats all others: experts 6 and 7.
    r = router(torch.tensor([row]))
    assert r.experts.tolist() == [[6, 7]]
    s6, s7 = sigmoid(-1.0), sigmoid(-1.2)
    assert r.weights[0].tolist() == pytest.approx([s6 / (s6 + s7), s7 / (s6 + s7)])


def loads_router(rate=0.1):
    """E = 4, k = 1; the batch below sends 3 tokens to expert 0 and 1 to expert 1."""
    return identity_router(SigmoidRouter(4, 4, top_k=1, bias_update_rate=rate))


LOAD_BATCH = torch.tensor(
    [[3.0, 0, 0, 0], [2.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 2.0, 0, 0]]
)  # loads [3, 1, 0, 0], mean 1


def test_bias_update_sign_rule():
    model = torch.nn.Sequential(loads_router())
    model.train()
    model(LOAD_BATCH)
    assert model[0].tokens_seen.tolist() == [3, 1, 0, 0]
    assert update_expert_bias(model) == 1
    # delta = 0.1 * sign(1 - load) = [-0.1, 0, 0.1, 0.1], centred by its mean 0.025
    want = [-0.125, -0.025, 0.075, 0.075]
    assert model[0].expert_bias.tolist() == pytest.approx(want)
    assert model[0].tokens_seen.tolist() == [0, 0, 0, 0]
    # No tokens seen since: a second update changes nothing.
    update_expert_bias(model)
    assert model[0].expert_bias.tolist() == pytest.approx(want)


def test_bias_is_not_counted_in_eval_or_without_rate():
    router = loads_router().eval()
    router(LOAD_BATCH)
    assert router.tokens_seen.sum() == 0
    frozen = loads_router(rate=0.0).train()
    frozen(LOAD_BATCH)
    assert update_expert_bias(frozen) == 0
    assert frozen.expert_bias.abs().sum() == 0


def test_bias_update_balances_load():
    torch.manual_seed(0)
    router = SigmoidRouter(8, 8, top_k=2, bias_update_rate=0.01).train()
    x = torch.randn(128, 8) + torch.tensor([2.0, 1.0, 0, 0, 0, 0, 0, 0])
    first = router(x).tokens_per_expert().float()
    for _ in range(100):
        router(x)
        update_expert_bias(router)
    last = router(x).tokens_per_expert().float()
    assert (last.max() - last.min()) < (first.max() - first.min()) / 2


def test_attach_bias_update_runs_after_optimizer_step():
    moe = MoE(4, 8, 4, 1, router=loads_router())
    opt = torch.optim.SGD(moe.parameters(), lr=0.0)
    handle = attach_bias_update(opt, moe)
    moe.train()
    moe(LOAD_BATCH)
    assert moe.router.expert_bias.abs().sum() == 0  # forward alone never moves the bias
    opt.step()
    assert moe.router.expert_bias.tolist() == pytest.approx([-0.125, -0.025, 0.075, 0.075])
    handle.remove()
    moe(LOAD_BATCH)
    opt.step()
    assert moe.router.expert_bias.tolist() == pytest.approx([-0.125, -0.025, 0.075, 0.075])


# -- expert choice ---------------------------------------------------------------------------

# Token 0 is uniform (1/3 per expert); token i > 0 strongly prefers expert i - 1.
EC_LOGITS = [[0.0, 0.0, 0.0], [4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0]]


def test_expert_choice_token_gets_all_experts():
    # C = ceil(T * k * cf / E) = ceil(4 / 3) = 2: expert e takes token e + 1, then token 0.
    router = identity_router(ExpertChoiceRouter(3, 3, top_k=1, capacity_factor=1.0))
    r = router(torch.tensor(EC_LOGITS))
    assert router.capacity(4) == 2 and int(r.aux["capacity"]) == 2
    assert r.num_slots == 3
    assert r.experts.tolist() == [
        [0, 1, 2],
        [0, EMPTY, EMPTY],
        [EMPTY, 1, EMPTY],
        [EMPTY, EMPTY, 2],
    ]
    probs = [softmax(row) for row in EC_LOGITS]
    for t in range(4):
        want = [probs[t][e] if r.experts[t, e] != EMPTY else 0.0 for e in range(3)]
        assert r.weights[t].tolist() == pytest.approx(want, rel=1e-6)
    assert r.tokens_per_expert().tolist() == [2, 2, 2]


def test_expert_choice_token_gets_no_expert():
    # C = ceil(4 * 0.5 / 3) = 1: each expert takes only its favourite; token 0 gets nothing.
    router = identity_router(ExpertChoiceRouter(3, 3, top_k=1, capacity_factor=0.5))
    r = router(torch.tensor(EC_LOGITS))
    assert int(r.aux["capacity"]) == 1
    assert r.experts.tolist() == [
        [EMPTY, EMPTY, EMPTY],
        [0, EMPTY, EMPTY],
        [EMPTY, 1, EMPTY],
        [EMPTY, EMPTY, 2],
    ]
    assert r.weights[0].tolist() == [0.0, 0.0, 0.0]


def test_expert_choice_capacity_is_capped_by_tokens():
    router = ExpertChoiceRouter(4, 4, top_k=4, capacity_factor=2.0)
    assert router.capacity(3) == 3
    r = router(torch.randn(3, 4))
    assert r.valid.all()  # every expert takes every token


def test_expert_choice_random_matches_definition():
    router = ExpertChoiceRouter(6, 5, top_k=2, capacity_factor=1.25)
    x = torch.randn(17, 6)
    r = router(x)
    c = math.ceil(17 * 2 * 1.25 / 5)
    for e in range(5):
        column = r.scores[:, e].tolist()
        best = sorted(range(17), key=lambda t, col=column: -col[t])[:c]
        assert sorted(torch.nonzero(r.experts[:, e] == e).squeeze(1).tolist()) == sorted(best)
    assert r.tokens_per_expert().tolist() == [c] * 5


# -- hash -------------------------------------------------------------------------------------


def py_hash(key: int) -> int:
    """The 32-bit multiply-xorshift hash, in plain Python integers."""
    h = key & 0xFFFFFFFF
    for _ in range(2):
        h = (((h >> 16) ^ h) * 0x45D9F3B) & 0xFFFFFFFF
    return (h >> 16) ^ h


def test_hash_token_ids():
    router = HashRouter(4, 5, top_k=2)
    ids = [0, 1, 2, 12345, 7, 7]
    r = router(torch.randn(6, 4), token_ids=torch.tensor(ids))
    want = [[py_hash(i) % 5, (py_hash(i) % 5 + 1) % 5] for i in ids]
    assert r.experts.tolist() == want
    assert r.weights.tolist() == [[0.5, 0.5]] * 6
    assert (r.logits == 0).all()
    torch.testing.assert_close(r.scores, torch.full((6, 5), 0.2))


def test_hash_is_deterministic_and_ignores_x():
    ids = torch.randint(0, 1000, (2, 9))
    a = HashRouter(4, 7)(torch.randn(18, 4), token_ids=ids)
    b = HashRouter(4, 7)(torch.randn(18, 4), token_ids=ids)
    assert torch.equal(a.experts, b.experts)
    assert a.experts[:, 0].tolist() == [py_hash(i) % 7 for i in ids.reshape(-1).tolist()]


def test_hash_positions():
    router = HashRouter(4, 3, top_k=1, key="position")
    r = router(torch.randn(5, 4))
    assert r.experts[:, 0].tolist() == [py_hash(p) % 3 for p in range(5)]
    r = router(torch.randn(3, 4), positions=torch.tensor([4, 4, 0]))
    assert r.experts[:, 0].tolist() == [py_hash(4) % 3, py_hash(4) % 3, py_hash(0) % 3]


def test_hash_positions_in_moe_repeat_per_sequence():
    moe = MoE(4, 8, 3, 1, router="hash", router_kwargs={"key": "position"})
    moe(torch.randn(2, 5, 4))
    experts = moe.last_routing.experts[:, 0].tolist()
    want = [py_hash(p) % 3 for p in range(5)]
    assert experts == want + want


def test_hash_needs_token_ids():
    with pytest.raises(ValueError, match="needs token_ids"):
        HashRouter(4, 3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="3 token ids / positions for 2 tokens"):
        HashRouter(4, 3)(torch.randn(2, 4), token_ids=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="key must be 'token' or 'position'"):
        HashRouter(4, 3, key="vocab")


def test_hash_has_no_parameters():
    assert list(HashRouter(4, 3).parameters()) == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_hash_router_refuses_non_finite_input_like_learned_routers(bad):
    """A NaN input raised in every learned router but passed through the hash router."""
    x = torch.randn(4, 8)
    x[1, 2] = bad
    ids = torch.arange(4)
    for name in ("topk", "hash"):
        with pytest.raises(FloatingPointError, match="NaN or inf"):
            ROUTERS.get(name)(8, 4, 1)(x, token_ids=ids)
    ROUTERS.get("hash")(8, 4, 1, nan_policy="ignore")(x, token_ids=ids)  # opted out


def test_hash_router_refuses_float_token_ids():
    with pytest.raises(ValueError, match="integer token ids"):
        ROUTERS.get("hash")(8, 4, 1)(torch.randn(3, 8), token_ids=torch.tensor([0.5, 1.2, 2.9]))


def test_all_experts_router_refuses_non_finite_input():
    from gatelab.routing.uoe import AllExpertsRouter

    x = torch.randn(4, 8)
    x[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        AllExpertsRouter(8, 4)(x)
    AllExpertsRouter(8, 4, nan_policy="ignore")(x)


@pytest.mark.parametrize(
    "bad", [None, float("nan"), float("inf"), float("-inf"), (float("inf"), float("-inf"))]
)
def test_finite_check_is_exact_where_the_sum_overflows(bad):
    """The check reads the logits' sum first: finite logits whose sum overflows must pass,
    and every non-finite value (inf and -inf together sum to NaN) must still be caught."""
    router = ROUTERS.get("topk")(8, 4, 1)
    logits = torch.full((6, 4), 3e38)  # finite; their float32 sum is inf
    if bad is None:
        router._check_logits(logits)
        return
    for i, value in enumerate(bad if isinstance(bad, tuple) else (bad,)):
        logits[i, 1] = value
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        router._check_logits(logits)
