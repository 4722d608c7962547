"""Steer and prune (gatelab.edit) on HF models of every family and on gatelab models."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import hf_tiny  # noqa: E402
from lm_tiny import tiny_moe_lm  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from gatelab.edit import capture_routing, edit_routing, find_moe_blocks  # noqa: E402
from gatelab.edit.prune import (  # noqa: E402
    expert_importance,
    prune_model,
    restrict_experts,
    select_experts,
)
from gatelab.edit.steer import clamp_neurons, force_on, steer_experts, switch_off  # noqa: E402
from gatelab.inspect.access import has_hooks  # noqa: E402
from gatelab.routing import EMPTY, Routing  # noqa: E402

ATOL, RTOL = 1e-5, 1e-4


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _gatelab_lm(**changes):
    return tiny_moe_lm(**changes)


def _routing(experts, weights, num_experts=4):
    t = len(experts)
    logits = torch.randn(t, num_experts, generator=torch.Generator().manual_seed(0))
    return Routing(logits, logits.softmax(-1), torch.tensor(experts), torch.tensor(weights))


# -- steer ------------------------------------------------------------------------------------


def test_switch_off_and_force_on_edits():
    r = _routing([[0, 1], [2, 3]], [[0.6, 0.4], [0.7, 0.3]])
    off = switch_off([1, 2])(r)
    assert off.experts.tolist() == [[0, EMPTY], [EMPTY, 3]]
    torch.testing.assert_close(off.weights, torch.tensor([[0.6, 0.0], [0.0, 0.3]]))
    renorm = switch_off([1, 2], renormalize=True)(r)
    torch.testing.assert_close(renorm.weights.sum(1), r.weights.sum(1))
    on = force_on([3])(r)
    assert on.experts.tolist() == [[0, 1, 3], [2, 3, EMPTY]]
    assert on.weights[0, 2] == pytest.approx(float(r.scores[0, 3]))
    assert on.weights[1, 2] == 0
    torch.testing.assert_close(force_on([3], renormalize=True)(r).weights.sum(1), r.weights.sum(1))
    with pytest.raises(ValueError, match="out of range"):
        force_on([9])(r)


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_steer_hf_is_reversible_and_composes(name):
    model = hf_tiny.build(name)
    ids = hf_tiny.ids()
    before = _logits(model, ids)
    layer = find_moe_blocks(model)[-1].layer
    with capture_routing(model) as cap:
        _logits(model, ids)
    usage = cap.routing(layer).tokens_per_expert()
    rare = int(usage.argmin())
    with steer_experts(model, on={layer: [rare]}), capture_routing(model) as cap:
        forced = _logits(model, ids)
    assert (cap.routing(layer).experts == rare).any(dim=1).all()  # every token uses it
    assert not torch.allclose(forced, before, atol=1e-4)
    # composes with another edit handle; undoing both restores the model
    a = steer_experts(model, off={layer: [0]})
    b = edit_routing(model, switch_off([1]))
    with capture_routing(model) as cap:
        _logits(model, ids)
    assert not torch.isin(cap.routing(layer).experts, torch.tensor([0, 1])).any()
    a.remove()
    b.remove()
    torch.testing.assert_close(_logits(model, ids), before)


def test_steer_errors():
    model = _gatelab_lm()
    with pytest.raises(ValueError, match="both off and on"):
        steer_experts(model, off={0: [1]}, on={0: [1]})
    with pytest.raises(ValueError, match="out of range"):
        steer_experts(model, off={0: [6]})
    with pytest.raises(ValueError, match="MoE layers are"):
        steer_experts(model, off={1: [0]})
    with pytest.raises(ValueError, match="at least one"):
        steer_experts(model)


@pytest.mark.parametrize("name", ["gatelab", "qwen2_moe", "gpt_oss"])
def test_clamp_neurons_equals_zeroed_activation(name):
    model = _gatelab_lm() if name == "gatelab" else hf_tiny.build(name)
    ids = torch.randint(3, 50, (2, 9)) if name == "gatelab" else hf_tiny.ids()
    before = _logits(model, ids)
    block = find_moe_blocks(model)[0]
    weights = block.expert_weights()
    neurons = [(block.layer, 1, 0), (block.layer, 1, 3), (block.layer, 2, 5)]
    # reference: zero those neurons' activations by patching the activation function
    outer = clamp_neurons(model, neurons)
    inner = clamp_neurons(model, [{"layer": block.layer, "expert": 1, "neuron": 0}])
    clamped = _logits(model, ids)
    outer.remove()  # out of order: neuron (1, 0) stays clamped by `inner`
    assert bool((weights.w_out[1, :, 0] == 0).all())
    assert not bool((weights.w_out[1, :, 3] == 0).all())
    inner.remove()
    torch.testing.assert_close(_logits(model, ids), before)
    assert not torch.allclose(clamped, before)
    # the same by hand: scale the activation of those neurons by zero
    saved = block.expert_weights().w_out.detach().clone()
    with torch.no_grad():
        for _, e, n in neurons:
            block.expert_weights().w_out[e, :, n] = 0
    torch.testing.assert_close(clamped, _logits(model, ids))
    with torch.no_grad():
        block.expert_weights().w_out.copy_(saved)
    with pytest.raises(ValueError, match="value=0 only"):
        clamp_neurons(model, neurons, value=1.0)
    with pytest.raises(ValueError, match="out of range"):
        clamp_neurons(model, [(block.layer, 0, weights.w_out.shape[2])])


# -- prune ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", hf_tiny.FAMILIES)
def test_restrict_all_allowed_equals_router(name):
    """The masked original's selection rule, with every expert allowed, is the router's."""
    model = hf_tiny.build(name)
    ids = hf_tiny.ids(seed=5)
    blocks = find_moe_blocks(model)
    with capture_routing(model) as ref:
        _logits(model, ids)
    with restrict_experts(model, {b.layer: list(range(8)) for b in blocks}):
        with capture_routing(model) as got:
            _logits(model, ids)
    for block in blocks:
        a, b = ref.routing(block.layer), got.routing(block.layer)
        assert torch.equal(a.experts.sort(1).values, b.experts.sort(1).values)
        order_a, order_b = a.experts.argsort(1), b.experts.argsort(1)
        torch.testing.assert_close(a.weights.gather(1, order_a), b.weights.gather(1, order_b))


@pytest.mark.parametrize("name", hf_tiny.FAMILIES)
def test_pruned_hf_model_reloads_and_matches_masked(name, tmp_path):
    model = hf_tiny.build(name)
    ids = hf_tiny.ids()
    importance = expert_importance(model, [ids, ids[:, :4]], "easy_ep")
    keep = select_experts(model, importance, 4)
    with restrict_experts(model, keep), capture_routing(model) as cap:
        masked = _logits(model, ids)
    for layer, kept in keep.items():  # the masked original routes to kept experts only
        assert torch.isin(cap.routing(layer).experts, torch.tensor(kept)).all()
    pruned = prune_model(model, keep)
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    for block in find_moe_blocks(reloaded):
        assert block.num_experts == 4 and block.expert_weights().num_experts == 4
    size = sum(p.numel() for p in reloaded.parameters())
    assert size < sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(_logits(reloaded, ids), masked, atol=ATOL, rtol=RTOL)
    assert find_moe_blocks(model)[0].num_experts == 8  # the original is untouched


def test_pruned_gatelab_model_matches_masked():
    model = _gatelab_lm(router="sigmoid", router_kwargs={"n_group": 2, "topk_group": 2})
    with torch.no_grad():
        for block in find_moe_blocks(model):
            block.router.expert_bias.copy_(torch.rand(6))
    ids = torch.randint(3, 50, (2, 12))
    importance = expert_importance(model, ids, "frequency")
    keep = select_experts(model, importance, 4)
    assert all(sum(e < 3 for e in kept) == 2 for kept in keep.values())  # 2 per group
    with restrict_experts(model, keep):
        masked = _logits(model, ids)
    pruned = prune_model(model, keep)
    assert pruned.config.num_experts == 4
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(_logits(pruned, ids), masked, atol=ATOL, rtol=RTOL)


def _router_state(router):
    """What an edit must leave alone: the attribute names and the identity of every value,
    parameter and buffer of the router module."""
    return (
        {k: id(v) for k, v in vars(router).items()},
        {n: id(t) for n, t in router.named_parameters()},
        {n: id(t) for n, t in router.named_buffers()},
        {n: t.clone() for n, t in router.state_dict().items()},
    )


def _same_state(a, b):
    return a[:3] == b[:3] and all(torch.equal(a[3][n], b[3][n]) for n in a[3])


@pytest.mark.parametrize(
    "router, kwargs",
    [
        ("topk", {}),
        ("sigmoid", {"n_group": 2, "topk_group": 2}),
        ("temperature", {"temperature": 0.7}),
        ("top_p", {"top_p": 0.6}),
    ],
)
def test_restrict_gatelab_router_without_patching(router, kwargs):
    """Restricting a router installs no attribute on it, and removal restores it bitwise."""
    model = _gatelab_lm(router=router, router_kwargs=kwargs)
    blocks = find_moe_blocks(model)
    if router == "sigmoid":
        with torch.no_grad():
            for block in blocks:
                block.router.expert_bias.copy_(torch.rand(6))
    ids = torch.randint(3, 50, (2, 12))
    before = [_router_state(b.router) for b in blocks]
    with capture_routing(model) as ref:
        plain = _logits(model, ids)
    keep = {b.layer: [0, 2, 3, 5] for b in blocks}
    routers = [b.router for b in blocks]
    seen = []  # (router index, its state) whenever a router runs, edits included

    def spy(module, args):
        seen.append((routers.index(module), _router_state(module)))

    spies = [r.register_forward_pre_hook(spy) for r in routers]
    with restrict_experts(model, keep), capture_routing(model) as cap:
        _logits(model, ids)
    for handle in spies:
        handle.remove()
    assert seen and all(_same_state(before[i], state) for i, state in seen)
    for block in blocks:
        experts = cap.routing(block.layer).experts
        assert torch.isin(experts[experts != EMPTY], torch.tensor([0, 2, 3, 5])).all()
    first = blocks[0].layer  # the edit keeps the logits the router computed
    assert torch.equal(cap.routing(first).logits, ref.routing(first).logits)
    with restrict_experts(model, {b.layer: list(range(6)) for b in blocks}):
        assert torch.equal(_logits(model, ids), plain)  # all allowed: the router's own rule
    assert all(_same_state(s, _router_state(b.router)) for s, b in zip(before, blocks, strict=True))
    assert torch.equal(_logits(model, ids), plain)


def _easy_ep_by_hand(block, x, h, r):
    """EASY-EP's score, token by token: experts run on x, the weight compares h, h + moe."""
    w = block.expert_weights()

    def expert(e, v):
        return w.activate(v @ w.w_in[e].T) @ w.w_out[e].T

    expected = torch.zeros(block.num_experts, dtype=torch.float64)
    with torch.no_grad():
        for t in range(x.shape[0]):
            outs = [
                (int(e), float(g), expert(int(e), x[t]))
                for e, g in zip(r.experts[t], r.weights[t], strict=True)
            ]
            moe = sum(g * y for _, g, y in outs)
            contrib = max(1 - float(torch.cosine_similarity(h[t], h[t] + moe, dim=0)), 0.0)
            for e, g, y in outs:
                expected[e] += contrib * g * float(y.norm())
    return expected


def _loud_experts(model):
    """Scale the experts up so the routed output turns the stream by a measurable angle
    (the tiny LM's initial experts barely move it, and every score would be ~1e-10)."""
    with torch.no_grad():
        for block in find_moe_blocks(model):
            block.expert_weights().w_out.mul_(30.0)
    return model


def test_easy_ep_hand_computed():
    """EASY-EP's score on one layer, against a direct per-token computation; the token
    weight compares the residual stream (RUCAIBox/EASYEP Block.forward), not the normalised
    block input: the stream is what the FFN norm received, and the two scores differ."""
    model = _loud_experts(_gatelab_lm())
    ids = torch.randint(3, 50, (1, 7))
    block = find_moe_blocks(model)[0]
    seen = {}
    norm = model.blocks[block.layer].ffn_norm
    spy = norm.register_forward_hook(lambda m, a, out: seen.update(h=a[0], x=out))
    with capture_routing(model, hidden=True, stream=True) as cap:
        _logits(model, ids)
    spy.remove()
    x, h, r = cap.input(block.layer), cap.stream(block.layer), cap.routing(block.layer)
    assert torch.equal(h, seen["h"].reshape(h.shape)) and torch.equal(x, seen["x"].reshape(x.shape))
    expected = _easy_ep_by_hand(block, x, h, r)
    got = expert_importance(model, ids, "easy_ep", layers=[block.layer])[block.layer]
    assert expected.max() > 1e-3  # a test that can tell the formulas apart
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=0.0)
    old = expert_importance(model, ids, "easy_ep", [block.layer], contribution="ffn_input")
    torch.testing.assert_close(
        old[block.layer], _easy_ep_by_hand(block, x, x, r), rtol=1e-4, atol=0.0
    )
    assert not torch.allclose(old[block.layer], got, rtol=1e-2)
    freq = expert_importance(model, ids, "frequency", layers=[block.layer])[block.layer]
    assert freq.tolist() == r.tokens_per_expert().double().tolist()


@pytest.mark.parametrize("name", hf_tiny.FAMILIES)
def test_residual_stream_of_hf_blocks(name):
    """The stream captured for an HF block is the input of the norm that feeds it."""
    model = hf_tiny.build(name)
    blocks = find_moe_blocks(model)
    layer = model.model.layers[blocks[-1].layer]
    seen = {}
    spy = layer.post_attention_layernorm.register_forward_hook(
        lambda m, a, out: seen.update(h=a[0], x=out)
    )
    with capture_routing(model, layers=[blocks[-1].layer], hidden=True, stream=True) as cap:
        _logits(model, hf_tiny.ids())
    spy.remove()
    h, x = cap.stream(blocks[-1].layer), cap.input(blocks[-1].layer)
    assert torch.equal(h, seen["h"].reshape(h.shape)) and torch.equal(x, seen["x"].reshape(x.shape))
    assert not torch.allclose(h, x)


def test_residual_stream_refusals():
    """A bare MoE block has no stream; a block fed by a non-norm module names none, and
    nothing is left installed after a refusal."""
    from gatelab.layers import MoE

    moe = MoE(8, 16, num_experts=4, top_k=2)
    with pytest.raises(ValueError, match="whole model.*hidden=True"):
        capture_routing(moe, stream=True)
    assert not has_hooks(find_moe_blocks(moe)[0])

    class Projected(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.moe = torch.nn.Linear(8, 8), MoE(8, 16, num_experts=4, top_k=2)

        def forward(self, x):
            return x + self.moe(self.proj(x))

    model = Projected()
    with capture_routing(model, stream=True), pytest.raises(ValueError, match="residual stream"):
        model(torch.randn(1, 3, 8))


def test_prune_bad_input():
    model = _gatelab_lm()
    importance = {0: torch.rand(6), 2: torch.rand(6)}
    with pytest.raises(ValueError, match="exceeds the 6 experts"):
        select_experts(model, importance, 7)
    with pytest.raises(ValueError, match="below top_k=2"):
        select_experts(model, importance, 1)
    nan = {0: torch.tensor([float("nan"), 1, 2, 3, 4, 5.0]), 2: torch.rand(6)}
    with pytest.raises(ValueError, match="layer 0 has non-finite values"):
        select_experts(model, nan, 3)  # topk used to rank the NaN expert first
    with pytest.raises(ValueError, match="missing \\[2\\]"):
        prune_model(model, {0: [0, 1, 2]})
    with capture_routing(model), pytest.raises(ValueError, match="before prune_model"):
        prune_model(model, {0: [0, 1, 2], 2: [0, 1, 2]})
    with pytest.raises(ValueError, match="demonstrations.*empty"):
        expert_importance(model, [])
    with pytest.raises(ValueError, match="longer than the model's context of 32"):
        expert_importance(model, torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="method must be one of"):
        expert_importance(model, torch.zeros(1, 3, dtype=torch.long), method="magic")
    deepseek = hf_tiny.build("deepseek_v3")
    with pytest.raises(ValueError, match="multiple of 2"):
        select_experts(deepseek, {1: torch.rand(8)}, 5)
