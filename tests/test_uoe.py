"""Union of Experts: exact MLP decomposition, UoE routers, selective multi-head attention."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gatelab import experiments
from gatelab.convert import decompose_mlp, decompose_to_moe, uoe_mlp
from gatelab.layers import (
    GluMlp,
    Mlp,
    MoE,
    SelectiveMultiHeadAttention,
)
from gatelab.routing import EMPTY, ROUTERS, AllExpertsRouter, PatchSelectionRouter, UoERouter
from gatelab.routing.uoe import unit_weights


def _mlps(dim: int, hidden: int) -> dict[str, nn.Module]:
    return {
        "swiglu": GluMlp(dim, hidden),
        "glu_bias": GluMlp(dim, hidden, variant="geglu", bias=True),
        "mlp_bias": Mlp(dim, hidden, act="relu"),
        "sequential": nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(approximate="tanh"),
            nn.Dropout(0.0),
            nn.Linear(hidden, dim),
        ),
    }


def _randomise(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(std=0.3)  # non-zero biases too
    return module


# -- decomposition ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["swiglu", "glu_bias", "mlp_bias", "sequential"])
@pytest.mark.parametrize("num_experts", [1, 3, 12])
def test_sum_of_experts_is_the_dense_mlp_in_float64(kind, num_experts):
    mlp = _randomise(_mlps(6, 12)[kind]).double()
    x = torch.randn(4, 5, 6, dtype=torch.float64)
    bank = decompose_mlp(mlp, num_experts)
    assert bank.num_experts == num_experts and bank.hidden_dim == 12 // num_experts
    flat = x.reshape(-1, 6)
    total = sum(bank.forward_expert(i, flat) for i in range(num_experts))
    with torch.no_grad():
        assert torch.allclose(total.reshape(x.shape), mlp(x), atol=1e-12, rtol=0)
        moe = decompose_to_moe(mlp, num_experts)
        assert isinstance(moe, MoE) and moe.top_k == num_experts
        out = moe(x)
    assert out.dtype == torch.float64
    assert (out - mlp(x)).abs().max() < 1e-12
    assert bool((moe.last_routing.weights == 1).all())


def test_expert_i_owns_hidden_units_i_slice():
    mlp = _randomise(Mlp(4, 8, act="relu", bias=False)).double()
    bank = decompose_mlp(mlp, 4)
    assert torch.equal(bank.up_proj[1], mlp.up_proj.weight[2:4])
    assert torch.equal(bank.down_proj[3], mlp.down_proj.weight[:, 6:8])
    glu = _randomise(GluMlp(4, 8))
    gbank = decompose_mlp(glu, 2)
    gate, up = glu.gate_up_proj.weight.chunk(2)
    assert torch.equal(gbank.gate_up_proj[1], torch.cat([gate[4:8], up[4:8]]))


def test_decomposed_bank_is_a_copy():
    mlp = GluMlp(4, 8)
    before = mlp.gate_up_proj.weight.clone()
    bank = decompose_mlp(mlp, 2)
    with torch.no_grad():
        bank.gate_up_proj.add_(1.0)
    assert torch.equal(mlp.gate_up_proj.weight, before)


def test_bad_decompositions_raise_clear_errors():
    with pytest.raises(ValueError, match="not divisible by num_experts=5"):
        decompose_mlp(GluMlp(4, 8), 5)
    with pytest.raises(ValueError, match="num_experts must be a positive int"):
        decompose_mlp(GluMlp(4, 8), 0)
    with pytest.raises(ValueError, match="act='identity'"):
        decompose_mlp(GluMlp(4, 8, variant="bilinear"), 2)
    with pytest.raises(TypeError, match="cannot read Conv1d as a dense FFN"):
        decompose_mlp(nn.Conv1d(4, 4, 1), 2)
    with pytest.raises(ValueError, match="activation Tanh"):
        decompose_mlp(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4)), 2)
    with pytest.raises(ValueError, match="hidden_dim=10 is not divisible by num_experts=4"):
        uoe_mlp(4, 10, 4, 2)
    with pytest.raises(ValueError, match="top_k must equal num_experts"):
        AllExpertsRouter(4, 4, 2)
    assert "all_experts" not in ROUTERS.names()  # it takes no free top_k


# -- routed slices -----------------------------------------------------------------------


def test_uoe_router_at_k_equal_e_is_the_dense_mlp():
    mlp = _randomise(GluMlp(6, 12)).double()
    bank = decompose_mlp(mlp, 4)
    moe = MoE(6, 3, 4, top_k=4, router="uoe", experts=bank).double()
    x = torch.randn(7, 6, dtype=torch.float64)
    with torch.no_grad():
        assert (moe(x) - mlp(x)).abs().max() < 1e-12


def test_uoe_router_weights_are_one_and_carry_gradient():
    router = UoERouter(8, 4, 2)
    x = torch.randn(10, 8)
    routing = router(x)
    assert bool((routing.weights == 1).all())
    assert torch.equal(routing.experts, routing.scores.topk(2, dim=-1).indices)
    (routing.weights * torch.arange(2.0)).sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def _patch_reference(scores: torch.Tensor, k: int, cap: int):
    """Loops over experts and tokens: the rule PatchSelectionRouter documents."""
    t, e = scores.shape
    masked = torch.zeros_like(scores)
    for i in range(t):
        top = scores[i].topk(k)
        masked[i, top.indices] = top.values
    col = masked / masked.sum(0).clamp_min(1e-20) * cap
    taken = set()
    for j in range(e):
        order = sorted(range(t), key=lambda i: -float(col[i, j]))[:cap]
        taken |= {(i, j) for i in order if col[i, j] > 0}
    return col, taken


@pytest.mark.parametrize("tokens,k,factor", [(9, 2, 1.0), (16, 1, 0.5), (5, 3, 2.0)])
def test_patch_selection_matches_a_loop_reference(tokens, k, factor):
    router = PatchSelectionRouter(6, 4, k, capacity_factor=factor)
    routing = router(torch.randn(tokens, 6))
    cap = router.capacity(tokens)
    assert cap == min(math.ceil(factor * tokens * k / 4), tokens)
    col, taken = _patch_reference(routing.scores.detach(), k, cap)
    got = {(i, int(e)) for i in range(tokens) for e in routing.experts[i] if e != EMPTY}
    assert got == taken
    for i, j in got:
        slot = (routing.experts[i] == j).nonzero().item()
        assert torch.isclose(routing.weights[i, slot], col[i, j])
    counts = torch.bincount(routing.experts[routing.experts != EMPTY], minlength=4)
    assert int(counts.max()) <= cap
    assert int(routing.aux["dropped"]) == tokens * k - len(got)


def test_routed_variants_shapes_gradients_and_parameter_count():
    for router in ("uoe", "uoe_patch"):
        layer = uoe_mlp(8, 32, 4, 2, router=router).double()
        x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
        y = layer(x)
        assert y.shape == x.shape and y.dtype == torch.float64
        y.square().sum().backward()
        for name, p in layer.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (router, name)
        # 4 GLU slices of width 8: 3 * D * F weights in all, plus the router's E x D.
        assert sum(p.numel() for p in layer.parameters()) == 3 * 8 * 32 + 8 * 4


def test_zero_tokens_route_to_nothing():
    for router in ("uoe", "uoe_patch"):
        layer = uoe_mlp(8, 16, 4, 2, router=router)
        assert layer(torch.zeros(0, 8)).shape == (0, 8)
    assert decompose_to_moe(GluMlp(8, 16), 4)(torch.zeros(0, 8)).shape == (0, 8)


# -- selective multi-head attention ------------------------------------------------------


def _copy_to_mha(attn: SelectiveMultiHeadAttention) -> nn.MultiheadAttention:
    ref = nn.MultiheadAttention(attn.dim, attn.num_heads, batch_first=True).double()
    with torch.no_grad():
        ref.in_proj_weight.copy_(attn.qkv.weight)
        ref.in_proj_bias.copy_(attn.qkv.bias)
        ref.out_proj.weight.copy_(attn.proj.weight)
        ref.out_proj.bias.copy_(attn.proj.bias)
    return ref


@pytest.mark.parametrize("causal", [False, True])
def test_all_heads_selected_is_full_multi_head_attention(causal):
    attn = SelectiveMultiHeadAttention(12, 3, top_k=3, causal=causal).double()
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    mask = torch.triu(torch.ones(7, 7, dtype=torch.bool), 1) if causal else None
    want = _copy_to_mha(attn)(x, x, x, attn_mask=mask, need_weights=False)[0]
    assert (attn(x) - want).abs().max() < 1e-12


def _masked_reference(attn: SelectiveMultiHeadAttention, x: torch.Tensor) -> torch.Tensor:
    """Every head on every token, then masked: keys and queries to the selected tokens."""
    b, s, d = x.shape
    selected, weights = attn.select(x)
    q, k, v = attn.qkv(x).view(b, s, 3, attn.num_heads, attn.head_dim).unbind(2)
    out = attn.proj.bias.expand(b, s, d).clone()
    for h in range(attn.num_heads):
        logits = q[:, :, h] @ k[:, :, h].transpose(1, 2) / math.sqrt(attn.head_dim)
        allowed = selected[:, None, :, h].expand(b, s, s)
        if attn.causal:
            allowed = allowed & torch.ones(s, s, dtype=torch.bool).tril()
        probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num()
        o = (probs @ v[:, :, h]) @ attn.proj.weight[
            :, h * attn.head_dim : (h + 1) * attn.head_dim
        ].T
        out = out + o * (weights[..., h] * selected[..., h]).unsqueeze(-1)
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_selected_heads_match_masked_full_attention(causal):
    attn = SelectiveMultiHeadAttention(16, 4, top_k=2, causal=causal).double()
    x = torch.randn(3, 9, 16, dtype=torch.float64)
    assert (attn(x) - _masked_reference(attn, x)).abs().max() < 1e-12
    assert bool((attn.last_selection.sum(-1) == 2).all())


def test_smha_gradients_dtypes_parameter_count_and_empty_sequences():
    attn = SelectiveMultiHeadAttention(16, 4)  # top_k defaults to num_heads / 2
    assert attn.top_k == 2
    assert sum(p.numel() for p in attn.parameters()) == 4 * 16 * 16 + 4 * 16 + 16 * 4
    no_bias = SelectiveMultiHeadAttention(16, 4, bias=False)
    assert sum(p.numel() for p in no_bias.parameters()) == 4 * 16 * 16 + 16 * 4
    x = torch.randn(2, 6, 16, requires_grad=True)
    y = attn(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    y.square().sum().backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert attn(torch.zeros(2, 0, 16)).shape == (2, 0, 16)


def test_smha_bad_configuration_raises_clear_errors():
    with pytest.raises(ValueError, match="dim=10 is not divisible by num_heads=4"):
        SelectiveMultiHeadAttention(10, 4)
    with pytest.raises(ValueError, match=r"top_k must lie in \[1, num_heads=4\]"):
        SelectiveMultiHeadAttention(16, 4, top_k=5)
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        SelectiveMultiHeadAttention(16, 0)
    with pytest.raises(ValueError, match=r"expects \[B, S, dim=16\]"):
        SelectiveMultiHeadAttention(16, 4)(torch.randn(3, 8))


# -- experiment ------------------------------------------------------------------------


def test_uoe_experiment_smoke(tmp_path):
    result = experiments.get("uoe").run("smoke", out_dir=tmp_path)
    assert all(row["float64"] < 1e-12 for row in result["exactness"])
    dense = result["runs"]["dense"][0]["ffn_flops"]
    assert result["runs"]["uoe k=1"][0]["ffn_flops"] < dense
    assert "| uoe k=2 |" in result["table"]


def test_unit_weights_are_exactly_one_with_the_scores_gradient():
    x = torch.rand(50, 3, requires_grad=True)
    w = unit_weights(x)
    assert torch.equal(w, torch.ones_like(x))
    F.linear(w, torch.ones(1, 3)).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
