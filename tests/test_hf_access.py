"""The access layer on HF MoE models of every family and on gatelab models."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import hf_tiny  # noqa: E402
from lm_tiny import tiny_moe_lm  # noqa: E402

import gatelab.hf  # noqa: E402
from gatelab.edit import (  # noqa: E402
    NoMoEBlocksError,
    capture_routing,
    compose,
    edit_routing,
    find_moe_blocks,
)
from gatelab.hf.access import fill_empty_slots  # noqa: E402
from gatelab.routing import EMPTY  # noqa: E402

ATOL, RTOL = 1e-5, 1e-4
FAMILIES = hf_tiny.FAMILIES


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each family saved once with save_pretrained; tests reload it."""
    root = tmp_path_factory.mktemp("hf")
    for name in FAMILIES:
        hf_tiny.build(name).save_pretrained(root / name)
    return root


def _load(saved, name, implementation="eager"):
    return gatelab.hf.load_pretrained(saved / name, experts_implementation=implementation)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("name", FAMILIES)
def test_blocks_found(saved, name):
    model = _load(saved, name)
    blocks = find_moe_blocks(model)
    layers = [1] if name == "deepseek_v3" else [0, 1]  # DeepSeek's first layer is dense
    assert [b.layer for b in blocks] == layers
    for block in blocks:
        assert block.num_experts == 8 and block.top_k == 2
        assert block.family == name
        assert block.has_shared == (name in ("qwen2_moe", "deepseek_v3"))
        assert block.expert_weights().num_experts == 8


@pytest.mark.parametrize("name", FAMILIES)
def test_capture_equals_router_output(saved, name):
    model = _load(saved, name)
    blocks = find_moe_blocks(model)
    raw = {b.layer: [] for b in blocks}
    handles = [
        b.router.register_forward_hook(lambda m, a, out, layer=b.layer: raw[layer].append(out))
        for b in blocks
    ]
    ids = hf_tiny.ids()
    with capture_routing(model, hidden=True) as cap:
        _logits(model, ids)
        _logits(model, ids[:, :5])
    for h in handles:
        h.remove()
    for block in blocks:
        routing = cap.routing(block.layer)
        logits = torch.cat([out[0] for out in raw[block.layer]])
        weights = torch.cat([out[1] for out in raw[block.layer]])
        index = torch.cat([out[2] for out in raw[block.layer]])
        assert routing.num_tokens == ids.numel() + 2 * 5
        torch.testing.assert_close(routing.logits, logits.float())
        assert torch.equal(routing.experts, index.long())
        torch.testing.assert_close(routing.weights, weights.float())
        assert cap.input(block.layer).shape == (routing.num_tokens, 32)
        assert cap.output(block.layer).shape == (routing.num_tokens, 32)
    # the hooks are gone with the capture
    assert all(not b.router._forward_hooks for b in blocks)


def _hand_masked(model, keep):
    """Zero every expert outside ``keep`` (its output, biases included): an independent
    reference for switching those experts off without renormalising."""
    with torch.no_grad():
        for block in find_moe_blocks(model):
            off = [e for e in range(block.num_experts) if e not in keep]
            experts = block.experts
            experts.down_proj[off] = 0.0
            if getattr(experts, "down_proj_bias", None) is not None:
                experts.down_proj_bias[off] = 0.0


@pytest.mark.parametrize("implementation", ["eager", "gatelab"])
@pytest.mark.parametrize("name", FAMILIES)
def test_switch_off_equals_hand_masked(saved, name, implementation):
    model = _load(saved, name, implementation)
    ids = hf_tiny.ids()
    before = _logits(model, ids)
    keep = [1, 4, 6]
    off = [e for e in range(8) if e not in keep]
    with edit_routing(model, lambda r: r.mask_experts(off)), capture_routing(model) as cap:
        edited = _logits(model, ids)
    for layer in cap.layers:  # the capture sees the routing the experts ran with
        used = cap.routing(layer).experts
        assert not torch.isin(used, torch.tensor(off)).any()
        assert (used == EMPTY).any()
    torch.testing.assert_close(_logits(model, ids), before)  # removed: back to the original
    _hand_masked(model, keep)
    torch.testing.assert_close(edited, _logits(model, ids), atol=ATOL, rtol=RTOL)
    assert not torch.allclose(edited, before, atol=1e-3)


def test_edits_compose_in_order_and_remove_independently(saved):
    model = _load(saved, "mixtral")
    ids = hf_tiny.ids()
    first = edit_routing(model, lambda r: r.mask_experts([0, 1]))
    second = edit_routing(model, {1: lambda r: r.mask_experts([2])})
    with capture_routing(model) as cap:
        both = _logits(model, ids)
    assert not torch.isin(cap.routing(0).experts, torch.tensor([0, 1])).any()
    assert not torch.isin(cap.routing(1).experts, torch.tensor([0, 1, 2])).any()
    assert torch.isin(cap.routing(0).experts, torch.tensor([2])).any()
    with edit_routing(
        model,
        {
            0: lambda r: r.mask_experts([0, 1]),
            1: compose(lambda r: r.mask_experts([0, 1]), lambda r: r.mask_experts([2])),
        },
    ):
        pass
    first.remove()
    first.remove()  # idempotent
    with capture_routing(model) as cap:
        _logits(model, ids)
    assert torch.isin(cap.routing(0).experts, torch.tensor([0, 1])).any()
    second.remove()
    with edit_routing(
        model,
        {
            0: lambda r: r.mask_experts([0, 1]),
            1: compose(lambda r: r.mask_experts([0, 1]), lambda r: r.mask_experts([2])),
        },
    ):
        torch.testing.assert_close(_logits(model, ids), both)


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_run_experts_reproduces_the_block(saved, name):
    """block.run_experts on the captured input and routing is the block's routed output."""
    model = _load(saved, name)
    with capture_routing(model, hidden=True) as cap:
        _logits(model, hf_tiny.ids())
    for block in find_moe_blocks(model):
        x, routing = cap.input(block.layer), cap.routing(block.layer)
        with torch.no_grad():
            routed = block.run_experts(x, routing)
            shared = block.module.shared_experts(x) if block.has_shared else 0
        torch.testing.assert_close(routed + shared, cap.output(block.layer), atol=ATOL, rtol=RTOL)


def test_fill_empty_slots():
    experts = torch.tensor([[3, EMPTY, EMPTY], [EMPTY, 0, 1], [2, 1, 0]])
    filled = fill_empty_slots(experts, 4)
    assert filled[0, 0] == 3 and filled[2].tolist() == [2, 1, 0]
    for row in filled:
        assert len(set(row.tolist())) == 3 and all(0 <= e < 4 for e in row.tolist())


def _gatelab_lm(shared: int = 0):
    return tiny_moe_lm(router_std=None, shared_expert_dim=shared)


def test_gatelab_model_same_calls():
    model = _gatelab_lm()
    blocks = find_moe_blocks(model)
    assert [(b.layer, b.name, b.num_experts, b.top_k, b.family) for b in blocks] == [
        (0, "blocks.0.ffn", 6, 2, "gatelab"),
        (2, "blocks.2.ffn", 6, 2, "gatelab"),
    ]
    ids = torch.randint(0, 50, (2, 10))
    with torch.no_grad(), capture_routing(model, hidden=True) as cap:
        before = model(ids).logits
    for block in blocks:
        assert torch.equal(cap.routing(block.layer).experts, block.module.last_routing.experts)
        assert cap.input(block.layer).shape == (20, 32)
    # the caller's own routing_edit still runs, before the access layer's edits
    seen = []
    with torch.no_grad(), edit_routing(model, {2: lambda r: seen.append(r) or r.mask_experts([5])}):
        edited = model(ids).logits
        x = torch.randn(3, 32)
        blocks[1].module(x, routing_edit=lambda r: r.mask_experts([4]))
    assert seen[-1].num_tokens == 3 and not (seen[-1].experts == 4).any()
    assert not (blocks[1].module.last_routing.experts == 5).any()
    assert not torch.allclose(edited, before)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before)
    assert all(not b.module._forward_pre_hooks for b in blocks)


def test_no_moe_blocks_error():
    with pytest.raises(NoMoEBlocksError, match="gatelab.layers.MoE.*gate_up_proj"):
        find_moe_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(TypeError, match="nn.Module"):
        find_moe_blocks("not a model")
    with pytest.raises(ValueError, match="MoE layers are"):
        capture_routing(_gatelab_lm(), layers=[1])


def test_hf_model_without_moe_blocks():
    import transformers

    config = transformers.LlamaConfig(
        **{k: v for k, v in hf_tiny.COMMON.items()}, intermediate_size=32
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(NoMoEBlocksError, match="LlamaForCausalLM has no MoE blocks"):
        find_moe_blocks(model)
