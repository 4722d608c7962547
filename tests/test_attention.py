"""GatedAttention: the G1 gate, GQA, RoPE, the reference's fused layout, and the LM option."""

from __future__ import annotations

import math

import pytest
import torch

from gatelab.layers import GatedAttention, apply_rope, rope_cache
from gatelab.layers.attention import fuse_q_gate, split_q_gate
from gatelab.models import LM, ConfigError, LMConfig
from gatelab.models import lm as lm_module

GATES = ("none", "headwise", "elementwise")


def reference_attention(
    x, q, k, v, o, num_heads, num_kv_heads, gate, gate_scores, cos=None, sin=None
):
    """Written from the paper's equations: explicit softmax, repeated KV heads, gate, o_proj."""
    b, s, _ = x.shape
    d = q.shape[0] // num_heads
    qh = (x @ q.T).view(b, s, num_heads, d).transpose(1, 2)
    kh = (x @ k.T).view(b, s, num_kv_heads, d).transpose(1, 2)
    vh = (x @ v.T).view(b, s, num_kv_heads, d).transpose(1, 2)
    if cos is not None:
        qh, kh = apply_rope(qh, cos, sin), apply_rope(kh, cos, sin)
    rep = num_heads // num_kv_heads
    kh, vh = kh.repeat_interleave(rep, dim=1), vh.repeat_interleave(rep, dim=1)
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    y = scores.softmax(-1) @ vh
    if gate != "none":
        y = y * gate_scores
    return y.transpose(1, 2).reshape(b, s, -1) @ o.T


def weights(m: GatedAttention):
    return m.q_proj.weight, m.k_proj.weight, m.v_proj.weight, m.o_proj.weight


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("heads,kv", [(4, 4), (4, 2), (6, 1)])
def test_matches_reference_with_rope_and_gqa(gate, heads, kv):
    m = GatedAttention(24, heads, kv, gate=gate).double()
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    cos, sin = rope_cache(m.head_dim, 16)
    g = m.gate_scores(x)
    want = reference_attention(x, *weights(m), heads, kv, gate, g, cos, sin)
    torch.testing.assert_close(m(x, cos, sin), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("gate", GATES)
def test_shapes_and_dtypes(gate, dtype):
    m = GatedAttention(16, 4, 2, gate=gate, bias=True, qk_norm=True).to(dtype)
    x = torch.randn(3, 5, 16, dtype=dtype)
    cos, sin = rope_cache(4, 8)
    y = m(x, cos, sin)
    assert y.shape == x.shape and y.dtype == dtype
    assert m.attention_weights(x, cos, sin).shape == (3, 4, 5, 5)


@pytest.mark.parametrize("gate", GATES)
def test_gradient_reaches_every_parameter(gate):
    m = GatedAttention(16, 4, 2, gate=gate, bias=True, qk_norm=True)
    x = torch.randn(2, 6, 16, requires_grad=True)
    cos, sin = rope_cache(4, 8)
    m(x, cos, sin).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("gate,width", [("none", 0), ("headwise", 1), ("elementwise", 8)])
@pytest.mark.parametrize("bias", [False, True])
def test_parameter_count(gate, width, bias):
    dim, heads, kv, hd = 32, 4, 2, 8
    m = GatedAttention(dim, heads, kv, gate=gate, bias=bias)
    q, k_v, g, o = heads * hd, kv * hd, heads * width, heads * hd
    expected = dim * (q + 2 * k_v + g) + o * dim
    if bias:
        expected += q + 2 * k_v + g + dim
    assert sum(p.numel() for p in m.parameters()) == expected


@pytest.mark.parametrize("gate", ["headwise", "elementwise"])
def test_gate_fixed_at_one_is_plain_attention(gate):
    gated = GatedAttention(16, 4, 2, gate=gate, bias=True)
    plain = GatedAttention(16, 4, 2, gate="none", bias=True)
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if "gate" not in k})
    with torch.no_grad():
        gated.gate_proj.weight.zero_()
        gated.gate_proj.bias.fill_(float("inf"))  # sigmoid(inf) = 1 exactly
    x = torch.randn(2, 5, 16)
    assert torch.equal(gated(x), plain(x))
    with torch.no_grad():
        gated.gate_proj.bias.zero_()  # sigmoid(0) = 1/2 halves every head: a real change
    torch.testing.assert_close(gated(x) - gated.o_proj.bias, (plain(x) - plain.o_proj.bias) / 2)


def test_gqa_equals_attention_with_repeated_kv_heads():
    gqa = GatedAttention(24, 6, 2, gate="elementwise")
    mha = GatedAttention(24, 6, 6, gate="elementwise")
    state = gqa.state_dict()
    for name in ("k_proj.weight", "v_proj.weight"):  # [kv * d, D] -> [heads * d, D]
        state[name] = state[name].view(2, 4, 24).repeat_interleave(3, dim=0).reshape(24, 24)
    mha.load_state_dict(state)
    x = torch.randn(2, 9, 24)
    cos, sin = rope_cache(4, 9)
    torch.testing.assert_close(gqa(x, cos, sin), mha(x, cos, sin))


def test_attention_weights_are_causal_distributions_and_give_the_output():
    m = GatedAttention(16, 4, 2, gate="none").double()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    cos, sin = rope_cache(4, 6)
    w = m.attention_weights(x, cos, sin).double()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 6, dtype=torch.float64))
    assert torch.all(w.triu(1) == 0)
    v = m.v_proj(x).view(2, 6, 2, 4).transpose(1, 2).repeat_interleave(2, dim=1)
    y = (w @ v).transpose(1, 2).reshape(2, 6, 16)
    torch.testing.assert_close(m.o_proj(y), m(x, cos, sin))


def reference_fused_forward(state, x, heads, kv, hd, gate):
    """The reference's Qwen3Attention forward (no RoPE, no QK-norm) on its fused q_proj."""
    b, s, _ = x.shape
    group = heads // kv
    q = torch.nn.functional.linear(x, state["q_proj.weight"], state.get("q_proj.bias"))
    q = q.view(b, s, kv, -1)
    width = group if gate == "headwise" else hd * group
    q, g = torch.split(q, [hd * group, width], dim=-1)
    g = g.reshape(b, s, heads, -1)
    q = q.reshape(b, s, heads, hd).transpose(1, 2)
    k = torch.nn.functional.linear(x, state["k_proj.weight"], state.get("k_proj.bias"))
    v = torch.nn.functional.linear(x, state["v_proj.weight"], state.get("v_proj.bias"))
    k = k.view(b, s, kv, hd).transpose(1, 2).repeat_interleave(group, dim=1)
    v = v.view(b, s, kv, hd).transpose(1, 2).repeat_interleave(group, dim=1)
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    y = y.transpose(1, 2) * torch.sigmoid(g)
    return torch.nn.functional.linear(
        y.reshape(b, s, -1), state["o_proj.weight"], state.get("o_proj.bias")
    )


@pytest.mark.parametrize("gate", ["headwise", "elementwise"])
@pytest.mark.parametrize("bias", [False, True])
def test_reference_layout_round_trip(gate, bias):
    heads, kv, hd = 6, 2, 4
    m = GatedAttention(24, heads, kv, gate=gate, bias=bias)
    ref = m.reference_state_dict()
    assert "gate_proj.weight" not in ref
    extra = heads * (1 if gate == "headwise" else hd)
    assert ref["q_proj.weight"].shape == (heads * hd + extra, 24)
    x = torch.randn(2, 5, 24)
    # The reference's forward on the fused weights gives this module's output ...
    torch.testing.assert_close(reference_fused_forward(ref, x, heads, kv, hd, gate), m(x))
    # ... and a fresh module loads the fused layout into the split one.
    fresh = GatedAttention(24, heads, kv, gate=gate, bias=bias)
    fresh.load_state_dict(ref)
    assert torch.equal(fresh(x), m(x))


def test_fuse_and_split_are_inverse_and_interleave_per_group():
    q = torch.arange(8 * 3).view(8, 3)  # 4 heads of width 2, 2 KV groups
    g = 100 + torch.arange(4 * 3).view(4, 3)  # headwise gates
    fused = fuse_q_gate(q, g, num_kv_heads=2)
    # group 0: heads 0, 1 (rows 0-3), their gates (rows 0-1); then group 1
    assert torch.equal(fused, torch.cat([q[:4], g[:2], q[4:], g[2:]]))
    q2, g2 = split_q_gate(fused, 4, 2, 2, "headwise")
    assert torch.equal(q2, q) and torch.equal(g2, g)
    with pytest.raises(ValueError, match="has 12 rows"):
        split_q_gate(fused[:-1], 4, 2, 2, "headwise")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dim=30, num_heads=4), "dim=30 is not divisible by num_heads=4"),
        (dict(dim=24, num_heads=6, num_kv_heads=4), "num_heads=6 is not divisible by num_kv"),
        (dict(dim=24, num_heads=4, gate="sparse"), "gate must be one of"),
        (dict(dim=24, num_heads=0), "num_heads must be a positive int"),
        (dict(dim=24, num_heads=4, dropout=1.0), "dropout must lie in"),
    ],
)
def test_bad_configuration_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GatedAttention(**kwargs)


def test_bad_input_is_named():
    m = GatedAttention(16, 4)
    with pytest.raises(ValueError, match=r"x \[batch, seq, dim=16\]"):
        m(torch.randn(2, 5, 12))
    with pytest.raises(ValueError, match="both cos and sin"):
        m(torch.randn(2, 5, 16), rope_cache(4, 5)[0], None)
    with pytest.raises(ValueError, match="RoPE tables"):
        m(torch.randn(2, 5, 16), *rope_cache(4, 3))


def test_zero_length_sequence():
    m = GatedAttention(16, 4, 2)
    assert m(torch.randn(2, 0, 16)).shape == (2, 0, 16)


# -- The LM option ------------------------------------------------------------------------


def small_lm(**kw):
    base = dict(vocab_size=32, dim=32, num_layers=2, num_heads=4, max_seq_len=16)
    base.update(moe_layers="none", ffn_hidden_dim=64)
    return LMConfig(**{**base, **kw})


def test_lm_default_attention_is_plain_causal_gated_attention():
    # The former CausalSelfAttention is GatedAttention without a gate; its fused qkv/proj
    # checkpoints load through a key map (tests/test_legacy_checkpoints.py).
    model = LM(small_lm())
    attn = model.blocks[0].attn
    assert isinstance(attn, GatedAttention) and attn.gate == "none" and attn.causal
    assert attn.num_kv_heads == attn.num_heads and attn.fused_qkv
    assert "blocks.0.attn.qkv_proj.weight" in model.state_dict()
    assert lm_module.rope_cache is rope_cache and lm_module.apply_rope is apply_rope


@pytest.mark.parametrize("gate,kv", [("elementwise", 0), ("headwise", 2), ("none", 1)])
def test_lm_with_gated_attention_trains(gate, kv):
    model = LM(small_lm(attn_gate=gate, num_kv_heads=kv))
    attn = model.blocks[1].attn
    assert isinstance(attn, GatedAttention)
    assert attn.gate == gate and attn.num_kv_heads == (kv or 4)
    ids = torch.randint(0, 32, (2, 16))
    out = model(ids, ids)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    # o_proj writes into the residual stream: it gets the scaled residual init.
    assert attn.o_proj.weight.std() < attn.q_proj.weight.std()


def test_lm_attention_config_errors():
    with pytest.raises(ConfigError, match="num_kv_heads=3 must divide num_heads=4"):
        small_lm(num_kv_heads=3)
    with pytest.raises(ConfigError, match="attn_gate"):
        small_lm(attn_gate="sparse")


def test_gated_attention_experiment_puts_bos_first():
    from gatelab.data import EOS
    from gatelab.data.text import LMBatch
    from gatelab.experiments.gated_attention import with_bos

    x = torch.arange(10).view(2, 5)
    batch = with_bos(LMBatch(x, x + 1, torch.zeros_like(x)))
    assert torch.equal(batch.inputs[:, 0], torch.full((2,), EOS))
    assert torch.equal(batch.inputs[:, 1:], x[:, :-1])
    # every target is still the byte after its input
    assert torch.equal(batch.targets[:, 1:], batch.inputs[:, 1:] + 1)
    assert torch.equal(batch.targets[:, 0], x[:, 0])


@pytest.mark.parametrize("kv", [None, 2])
def test_fused_qkv_computes_the_split_layout(kv):
    torch.manual_seed(0)
    split = GatedAttention(32, 4, kv, gate="none")
    fused = GatedAttention(32, 4, kv, gate="none", fused_qkv=True)
    w = torch.cat([split.q_proj.weight, split.k_proj.weight, split.v_proj.weight])
    state = {"qkv_proj.weight": w, "o_proj.weight": split.o_proj.weight}
    fused.load_state_dict(state)
    cos, sin = rope_cache(8, 16)
    x = torch.randn(2, 16, 32)
    torch.testing.assert_close(fused(x, cos, sin), split(x, cos, sin), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        fused.attention_weights(x, cos, sin), split.attention_weights(x, cos, sin)
    )
    with pytest.raises(ValueError, match="fused_qkv=True is plain attention"):
        GatedAttention(32, 4, gate="headwise", fused_qkv=True)


def test_former_lm_attention_state_dict_loads_fused_and_split():
    # CausalSelfAttention (before issue 14) wrote qkv.weight [3D, D] and proj.weight.
    torch.manual_seed(0)
    qkv, proj = torch.randn(96, 32), torch.randn(32, 32)
    fused = GatedAttention(32, 4, gate="none", fused_qkv=True)
    split = GatedAttention(32, 4, gate="none")
    for m in (fused, split):
        m.load_state_dict({"qkv.weight": qkv.clone(), "proj.weight": proj.clone()})
    assert torch.equal(fused.qkv_proj.weight, qkv) and torch.equal(split.o_proj.weight, proj)
    assert torch.equal(split.k_proj.weight, qkv[32:64])
