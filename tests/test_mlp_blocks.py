"""MLP blocks: Mlp, the GLU family, Scaling-MLPs and hourglass blocks, their classifiers, the
LM's ``ffn`` option and the two experiments' smoke runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gatelab import experiments
from gatelab.layers import (
    MLPS,
    BottleneckBlock,
    BottleneckMLP,
    GluMlp,
    HourglassBlock,
    HourglassFFN,
    HourglassMLP,
    Mlp,
)
from gatelab.models import LM, ConfigError, LMConfig

# The blocks this file owns; other modules may register more in MLPS.
BLOCKS = ["mlp", "swiglu", "geglu", "reglu", "bilinear", "bottleneck", "hourglass", "hourglass_ffn"]


def count(module):
    return sum(p.numel() for p in module.parameters())


def build(name, dim=12, hidden=None, **kw):
    hidden = hidden or (6 if name.startswith("hourglass") else 20)
    return MLPS.get(name)(dim=dim, hidden_dim=hidden, **kw)


@pytest.mark.parametrize("name", BLOCKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_every_block_keeps_shape_and_dtype(name, dtype):
    block = build(name).to(dtype)
    for shape in [(5, 12), (2, 3, 12), (0, 12)]:
        y = block(torch.randn(*shape, dtype=dtype))
        assert y.shape == shape and y.dtype == dtype


@pytest.mark.parametrize("name", BLOCKS)
def test_gradient_reaches_every_parameter(name):
    block = build(name, bias=True)
    x = torch.randn(4, 3, 12, requires_grad=True)
    block(x).square().sum().backward()
    for pname, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("bias", [False, True])
def test_parameter_counts_follow_their_formulas(bias):
    d, h, o = 12, 20, 7
    assert count(Mlp(d, h, o, bias=bias)) == d * h + h * o + bias * (h + o)
    assert count(GluMlp(d, h, o, bias=bias)) == 2 * d * h + h * o + bias * (2 * h + o)
    block = d * h + h * d + bias * (h + d)
    assert count(BottleneckBlock(d, h, bias=bias)) == 2 * d + block  # LayerNorm: weight + bias
    assert count(BottleneckBlock(d, h, bias=bias, norm="rms")) == d + block
    narrow = 2 * d * 5 + bias * (5 + d)
    assert count(HourglassFFN(d, 5, num_blocks=3, bias=bias)) == 3 * (d + narrow)


def test_default_widths():
    assert Mlp(12).hidden_dim == 48 and BottleneckBlock(12).hidden_dim == 48
    assert HourglassBlock(12).hidden_dim == 6
    glu, mlp = GluMlp(24, bias=False), Mlp(24, bias=False)
    assert glu.hidden_dim == 64 and count(glu) == count(mlp)  # Shazeer's 8/3 * dim


@pytest.mark.parametrize(
    "variant,act",
    [("swiglu", F.silu), ("geglu", F.gelu), ("reglu", F.relu), ("bilinear", lambda t: t)],
)
def test_glu_variants_compute_their_formula(variant, act):
    m = MLPS.get(variant)(dim=8, hidden_dim=10).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    w_gate, w_up = m.gate_up_proj.weight.chunk(2, dim=0)
    want = (act(x @ w_gate.T) * (x @ w_up.T)) @ m.down_proj.weight.T
    torch.testing.assert_close(m(x), want)
    assert m.variant == variant


def test_residual_blocks_compute_their_formula():
    b = BottleneckBlock(8, 32).double()
    x = torch.randn(3, 8, dtype=torch.float64)
    h = F.layer_norm(x, (8,), b.norm.weight, b.norm.bias)
    want = x + b.mlp.down_proj(F.gelu(b.mlp.up_proj(h)))
    torch.testing.assert_close(b(x), want)


def test_hourglass_ffn_returns_the_update_of_its_stacked_blocks():
    ffn = HourglassFFN(12, 5, num_blocks=3, bias=True).double()
    x = torch.randn(4, 12, dtype=torch.float64)
    h = x
    for block in ffn.blocks:
        h = block(h)
    torch.testing.assert_close(x + ffn(x), h)


@pytest.mark.parametrize("cls", [BottleneckMLP, HourglassMLP])
def test_classifiers(cls):
    hidden = 8 if cls is HourglassMLP else None
    model = cls(16, 32, num_blocks=2, num_classes=10, hidden_dim=hidden)
    x = torch.randn(5, 1, 4, 4)
    assert model(x).shape == (5, 10)
    h = model.blocks[0].hidden_dim
    per_block = 2 * 32 + 2 * 32 * h + h + 32
    assert count(model) == (16 * 32 + 32) + 2 * per_block + (32 * 10 + 10)


def test_hourglass_refuses_a_lift_that_narrows():
    """The hourglass lifts the input to a wider residual stream (arXiv 2510.01796)."""
    with pytest.raises(ValueError, match="dim=33 is narrower than input_dim=64"):
        HourglassMLP(64, 33, num_blocks=1, num_classes=10, hidden_dim=8)
    with pytest.raises(ValueError, match="BottleneckMLP"):
        HourglassMLP(64, 45, 1, 10, hidden_dim=11, fixed_lift=True)
    assert HourglassMLP(64, 64, 1, 10, hidden_dim=16).dim == 64  # equal width is no shrink
    assert BottleneckMLP(64, 33, 1, 10).dim == 33  # the narrow stream is the bottleneck's


def test_fixed_lift_is_a_saved_buffer_that_does_not_train():
    model = HourglassMLP(64, 80, num_blocks=1, num_classes=10, hidden_dim=8, fixed_lift=True)
    assert "lift_weight" in model.state_dict() and model.lift is None
    assert count(model) == count(HourglassMLP(64, 80, 1, 10, hidden_dim=8)) - (64 * 80 + 80)
    before = model.lift_weight.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(torch.randn(4, 64)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    assert torch.equal(model.lift_weight, before)
    assert before.std().item() == pytest.approx(1 / 8, rel=0.2)  # N(0, 1 / input_dim)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: HourglassBlock(8, 8), "hidden_dim=8 must be narrower than dim=8"),
        (lambda: HourglassFFN(8, 12), "must be narrower"),
        (lambda: Mlp(0), "dim must be a positive int"),
        (lambda: GluMlp(8, variant="swish"), "unknown variant 'swish'"),
        (lambda: Mlp(8, act="swish"), "unknown act 'swish'"),
        (lambda: Mlp(8, dropout=1.5), "dropout must lie in"),
        (lambda: BottleneckBlock(8, norm="batch"), "norm must be one of"),
        (lambda: BottleneckMLP(64, 8, -1, 10), "num_blocks must be an int >= 0"),
        (lambda: MLPS.get("nope"), "unknown mlp block 'nope'; valid names are: .*hourglass_ffn"),
    ],
)
def test_bad_configuration_is_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"inputs \[..., dim=8\]"):
        Mlp(8)(torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"\[batch, 64\]"):
        BottleneckMLP(64, 8, 1, 10)(torch.randn(3, 63))
    with pytest.raises(TypeError, match="float tensor"):
        BottleneckMLP(64, 8, 1, 10)(torch.zeros(3, 64, dtype=torch.long))


# -- The LM's ffn option ------------------------------------------------------------------


def small_lm(**kw):
    base = dict(vocab_size=32, dim=32, num_layers=2, num_heads=4, max_seq_len=16)
    base.update(moe_layers="none", ffn_hidden_dim=64)
    return LMConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "ffn,kwargs,hidden",
    [
        ("geglu", {}, 64),
        ("bilinear", {}, 64),
        ("mlp", {"act": "relu"}, 64),
        ("hourglass", {"num_blocks": 3}, 16),
    ],
)
def test_lm_ffn_kinds(ffn, kwargs, hidden):
    model = LM(small_lm(ffn=ffn, ffn_kwargs=kwargs, ffn_hidden_dim=hidden))
    block = model.blocks[0]
    assert block.ffn.hidden_dim == hidden
    if ffn == "hourglass":
        assert isinstance(block.ffn, HourglassFFN) and len(block.ffn.blocks) == 3
        assert isinstance(block.ffn_norm, torch.nn.Identity)
    ids = torch.randint(0, 32, (2, 16))
    model(ids, ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_lm_ffn_config_errors():
    with pytest.raises(ConfigError, match="ffn_hidden_dim=64: the hourglass FFN is narrow"):
        small_lm(ffn="hourglass")
    with pytest.raises(ConfigError, match="unknown key 'blocks'.*did you mean 'num_blocks'"):
        small_lm(ffn="hourglass", ffn_hidden_dim=16, ffn_kwargs={"blocks": 2})
    with pytest.raises(ConfigError, match="did you mean 'geglu'"):
        small_lm(ffn="gelglu")
    with pytest.raises(ConfigError, match="swiglu FFN takes no options"):
        small_lm(ffn_kwargs={"act": "gelu"})


def test_lm_default_ffn_is_unchanged():
    model = LM(small_lm())
    assert (
        type(model.blocks[0].ffn).__name__ == "GluMlp" and model.blocks[0].ffn.variant == "swiglu"
    )
    assert "blocks.0.ffn_norm.weight" in model.state_dict()


# -- Experiments (smoke scale) ------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp-blocks", "gated-attention"])
def test_experiment_smoke(name, tmp_path):
    result = experiments.get(name).run("smoke", seed=0, out_dir=tmp_path)
    assert result["table"].startswith("|") and result["rows"]


# -- The MLP classifier's block option ----------------------------------------------------


@pytest.mark.parametrize(
    "block,cls,hidden", [("bottleneck", BottleneckMLP, 0), ("hourglass", HourglassMLP, 8)]
)
def test_classifier_block_kind_builds_the_paper_model(block, cls, hidden):
    from gatelab.models import build_model

    table = {"hidden_dims": [80, 80, 80], "block": block, "block_hidden_dim": hidden}
    _, model = build_model("mlp", table)
    reference = cls(64, 80, 2, 10, hidden_dim=hidden or None)
    assert count(model) == count(reference)
    torch.manual_seed(0)
    reference = cls(64, 80, 2, 10, hidden_dim=hidden or None)
    model.layers[0].load_state_dict(reference.lift.state_dict())
    for i in (1, 2):
        model.layers[i].load_state_dict(reference.blocks[i - 1].state_dict())
    model.head.load_state_dict(reference.readout.state_dict())
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(model(x).logits, reference(x))


def test_classifier_block_errors():
    from gatelab.models import MLPConfig

    with pytest.raises(ConfigError, match="block_hidden_dim=80: hourglass blocks are narrow"):
        MLPConfig(hidden_dims=[80, 80], block="hourglass", block_hidden_dim=80)
    with pytest.raises(ConfigError, match=r"hidden_dims\[0\]=32 is narrower than input_dim=64"):
        MLPConfig(hidden_dims=[32, 32], block="hourglass")
    assert MLPConfig(hidden_dims=[32, 32], block="bottleneck").block == "bottleneck"
    with pytest.raises(ConfigError, match="block"):
        MLPConfig(block="gmlp")
